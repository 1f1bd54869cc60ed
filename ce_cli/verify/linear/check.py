"""`check_linear`: the problem, the pass, then the checks in the report's order (gradients,
finite differences, the loss)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.arrays import api_array, compared_array
from ce_cli.io.stored import stored_notes
from ce_cli.kernels.numerics import loss_sum
from ce_cli.models.linear import LinearCE, build_linear_ce
from ce_cli.verify.checks import shift_labels
from ce_cli.verify.compare import Comparison
from ce_cli.verify.linear.arrays import (FD_SAFETY, LINEAR_FIELDS, LinearSettings, UserArray, floor_terms,
                                        resolve_exact, user_arrays)
from ce_cli.verify.linear.exact import (exact_all, exact_hidden_rows, exact_weight_rows,
                                        projection_result, user_comparison)
from ce_cli.verify.linear.probes import Probes
from ce_cli.verify.linear.stream import Pass, bias_column, run_pass
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, InputInfo, Report, verdict_line
from ce_cli.verify.stages import computed_16, computed_note
from ce_cli.verify.tolerance import (SIXTEEN_BIT, Tolerance, loss_rule, per_sample_16, reduction_floor,
                                     resolve_tolerance)


ROLES = ("hidden", "weight", "labels", "bias", "class_weight", "sample_weight", "grad_hidden",
         "grad_weight", "grad_bias", "loss")


def check_linear(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    grad_hidden: Any = None,
    grad_weight: Any = None,
    grad_bias: Any = None,
    loss: Any = None,
    class_weight: Any = None,
    sample_weight: Any = None,
    options: CheckOptions | None = None,
    linear: LinearSettings | None = None,
    sources: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    **settings: Any,
) -> Report:
    """Verify fused linear cross-entropy: `F.cross_entropy(F.linear(hidden, weight, bias), labels)`.

    hidden (N, H) or (B, T, H); weight (V, H) (`weight_layout="HV"` for (H, V)); your gradients
    w.r.t. hidden, weight and bias, and your loss, are each optional. Settings: `options` and/or
    CheckOptions field names, and `linear` and/or LinearSettings field names (`exact=True`)."""
    lin = replace(linear or LinearSettings(), **{k: settings.pop(k) for k in list(settings)
                                                  if k in LINEAR_FIELDS})
    opts = CheckOptions.build(options, **settings)
    refuse_not_linear(opts)
    src = {**{r: r for r in ROLES}, **(sources or {})}
    hidden, weight, labels, bias, class_weight, sample_weight = map(
        api_array, (hidden, weight, labels, bias, class_weight, sample_weight))
    grad_hidden, grad_weight, grad_bias, loss = map(
        compared_array, (grad_hidden, grad_weight, grad_bias, loss))
    problem, warnings, labels = linear_problem(hidden, weight, labels, bias, class_weight,
                                               sample_weight, opts, lin, src)
    grads = {"grad_hidden": grad_hidden, "grad_weight": grad_weight, "grad_bias": grad_bias}
    warnings += stored_notes({src[r]: a for r, a in {**grads, "loss": loss}.items()})
    problem = problem.with_budget(sum(int(np.asarray(a).nbytes) for a in
                                      (hidden, weight, grad_hidden, grad_weight) if a is not None))
    users = user_arrays(problem, grads, src, opts, lin.weight_layout)
    problem, lin = _settled(problem, lin, users)
    given_loss = user_loss(problem, loss, src["loss"], opts)
    run, mode, (hp, wp, bias_probes) = run_pass(problem, users, lin, opts, progress, exact_hidden=True)
    ranked = _gradient_checks(problem, users, run, lin, opts.worst)
    ranked += fd_checks(problem, users, (hp, wp, bias_probes), opts.worst, run.bdir.u)
    ref_loss = problem.reduce(loss_sum(run.loss))
    ranked += _loss_ranked(problem, run, given_loss, ref_loss, opts, users)
    checks = tuple(c for _, c in sorted(ranked, key=lambda rc: rc[0]))
    ok = all(c.ok for c in checks)
    arrays = {"hidden": hidden, "weight": weight, "labels": labels, "bias": bias,
              "class_weight": class_weight, "sample_weight": sample_weight, **grads, "loss": loss}
    return Report(
        kind="linear", ok=ok, loss=float(ref_loss), verdict=verdict_line(ok, checks, ()),
        loss_per_sample_shape=problem.batch_shape if problem.reduction == "none" else None,
        shape=tuple(np.shape(hidden)), n_rows=problem.n_rows, n_classes=problem.n_classes,
        n_ignored=int(problem.n_rows - np.count_nonzero(problem.valid)),
        reduction=problem.reduction, target_kind="index", checks=checks,
        inputs=tuple(InputInfo(r, src[r], tuple(np.shape(a)), str(np.asarray(a).dtype))
                     for r, a in arrays.items() if a is not None),
        warnings=tuple(warnings), fd_mode=mode, fd_evaluations=2 * (hp.owner.size + wp.owner.size + bias_probes.owner.size),
        options=report_echo(problem, lin, opts, users))


# CheckOptions fields that mean nothing without the (N, V) logits: refused, never ignored
NOT_LINEAR = ("class_axis", "two_class", "vocab_offset", "vocab_size", "kl_loss")


def refuse_not_linear(opts: CheckOptions) -> None:
    """One line for a setting of check_grad / check_binary that check_linear does not take."""
    defaults = CheckOptions()
    for name in NOT_LINEAR:
        if getattr(opts, name) != getattr(defaults, name):
            raise CeCheckError(f"`{name}`: not taken by check_linear (fused linear "
                               "cross-entropy has no logits array)")


def linear_problem(hidden: Any, weight: Any, labels: Any, bias: Any, class_weight: Any,
             sample_weight: Any, opts: CheckOptions, lin: LinearSettings, src: dict[str, str]
             ) -> tuple[LinearCE, list[str], Any]:
    """The problem with the training-code semantics (and the labels, shifted with
    `shift_labels`)."""
    if opts.shift_labels:
        labels = shift_labels(np.asarray(hidden), np.asarray(labels), opts.ignore_index, src["labels"])
    semantics = opts.semantics(sample_weight)
    problem, warnings = build_linear_ce(
        hidden, weight, labels, bias=bias, class_weight=class_weight, reduction=opts.reduction.value,
        ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
        weight_layout=lin.weight_layout, sources=src, semantics=semantics)
    return problem, warnings, labels


def report_echo(problem: LinearCE, lin: LinearSettings, opts: CheckOptions,
          users: dict[str, UserArray]) -> dict[str, Any]:
    """The report's `options`: the settings that shaped the check."""
    return {"hidden_size": problem.hidden_size, "weight_layout": lin.weight_layout,
            "bias": problem.bias is not None, "exact": lin.exact,
            "projections": None if lin.exact else lin.projections,
            "false_pass_at_10x": None if lin.exact else lin.false_pass(),
            "ignore_index": opts.ignore_index, "label_smoothing": opts.label_smoothing,
            "weighted": problem.class_weight is not None,
            "precision": next((u.tol.precision for u in users.values()), None),
            **problem.sm.sem.to_echo(), **({"shift_labels": True} if opts.shift_labels else {})}


def _gradient_checks(problem: LinearCE, users: dict[str, UserArray], run: Pass,
                     lin: LinearSettings, worst: int) -> list[tuple[int, CheckResult]]:
    out: list[tuple[int, CheckResult]] = []
    if lin.exact:
        weight = {k: u for k, u in users.items() if k == "grad_weight" or run.exact_h is None}
        out += [(1, c) for c in exact_all(problem, weight, run.lse, run.herr, worst)]
        if run.exact_h is not None:
            out.append((1, run.exact_h.cmp.result()))
    if run.ph is not None:
        out.append((1, projection_result(
            run.ph, lambda rows: exact_hidden_rows(problem, rows, run.lse, run.herr), lin, worst,
            math.sqrt(problem.n_classes) + math.sqrt(problem.hidden_size), "token")))
    if run.pw is not None:
        out.append((1, projection_result(
            run.pw, lambda cols: exact_weight_rows(problem, cols, run.lse, run.herr), lin, worst,
            math.sqrt(problem.n_rows) + math.sqrt(problem.hidden_size), "vocabulary")))
    gb = users.get("grad_bias")
    if gb is not None:
        cmp = user_comparison("grad_bias_vs_reference", gb, worst)
        cmp.update(0, run.db[None, :], gb.rows, run.db_floor[None, :] * gb.tol.floor_coef)
        out.append((1, cmp.result()))
    gw = users.get("grad_weight")
    if gw is not None and gw.transposed:
        out = [(r, transposed(c, problem)) if c.name == "grad_weight_vs_reference" else (r, c)
               for r, c in out]
    return out


def transposed(result: CheckResult, problem: LinearCE) -> CheckResult:
    verdict = "correct once transposed" if result.ok else "wrong even transposed"
    note = (f"your weight gradient has the transposed shape ({problem.hidden_size}, "
            f"{problem.n_classes}) of the weight's; it was compared as its transpose: {verdict}")
    return replace(result, ok=False, mismatches=max(1, result.mismatches),
                   note="; ".join(x for x in (note, result.note) if x))


def fd_checks(problem: LinearCE, users: dict[str, UserArray], probes: tuple[Probes, Probes, Probes],
               worst: int, bias_u: np.ndarray | None = None,
               moves: dict[str, np.ndarray] | None = None) -> list[tuple[int, CheckResult]]:
    """Finite differences against the reference (rank 0) and against your gradients (rank 3);
    `moves`: a side's gradient moves already taken (row shards: where your rows are)."""
    out: list[tuple[int, CheckResult]] = []
    ref64 = resolve_tolerance(np.dtype(np.float64))
    hp, wp, bp = probes
    gw = users.get("grad_weight")
    sides = (("hidden", hp, users.get("grad_hidden"), lambda r: problem.batch_index(r),
              lambda r, j: problem.batch_index(r) + (j,)),
             ("weight", wp, gw, lambda r: (r,), gw.index_of if gw is not None else lambda r, j: (r, j)),
             ("bias", bp, bias_column(users.get("grad_bias")), lambda r: (), lambda r, _j: (r,)))
    for name, p, user, row_index, entry_index in sides:
        if p.owner.size == 0:
            continue
        n_rows = int(np.count_nonzero(p.entry < 0))
        along = ("the whole vocabulary along a random direction" if name == "bias"
                 else f"{n_rows} rows along a random direction")
        note = f"{along}, {p.owner.size - n_rows} entries"

        def index_of(i: int, _c: int, p: Probes = p, ri=row_index, ei=entry_index) -> tuple[int, ...]:
            return p.index(i, ri, ei)

        cmp = Comparison(f"fd_{name}_vs_reference", ref64, index_of, expected_label="finite diff",
                         got_label="reference", n_worst=worst, note=note)
        cmp.update(0, p.fd, p.ref, FD_SAFETY * p.bound)
        out.append((0, cmp.result()))
        if user is not None:
            got = moves[name] if moves and name in moves else _user_moves(p, user, bias_u)
            cmp = Comparison(f"fd_{name}_vs_grad", user.tol, index_of, expected_label="finite diff",
                             n_worst=worst, note=note)
            cmp.update(0, p.fd, got, FD_SAFETY * p.bound + p.got_bound)
            out.append((3, cmp.result()))
    return out


def _user_moves(p: Probes, user: UserArray, whole_u: np.ndarray | None) -> np.ndarray:
    """Your gradient along every probe's 2u; a probe with owner -1 moves the whole of it by
    `whole_u` (the bias direction)."""
    whole = p.owner < 0
    if not whole.any() or whole_u is None:
        return p.user_moves(user.rows)
    got = np.zeros(p.owner.size)
    part = replace(p, owner=p.owner[~whole], entry=p.entry[~whole], step=p.step[~whole])
    got[~whole] = part.user_moves(user.rows)
    got[whole] = np.asarray(user.rows, dtype=np.float64).reshape(-1) @ (2.0 * whole_u)
    return got


def user_loss(problem: LinearCE, loss: Any, source: str, opts: CheckOptions
               ) -> tuple[np.ndarray, Tolerance] | None:
    if loss is None:
        return None
    arr = np.asarray(loss)
    if arr.dtype.kind not in "iuf":
        raise CeCheckError(f"{source}: dtype {arr.dtype} is not numeric")
    if problem.reduction == "none":
        if arr.shape != problem.batch_shape and arr.shape != (problem.n_rows,):
            raise CeCheckError(f"{source}: shape {arr.shape}; reduction 'none' gives per-sample "
                               f"losses {problem.batch_shape}")
        arr = arr.reshape(-1)
    elif arr.size != 1:
        raise CeCheckError(f"{source}: shape {arr.shape}; reduction '{problem.reduction}' gives a "
                           "scalar loss (use `reduction=none` for per-sample losses)")
    return arr, opts.tolerance(arr.dtype)


def _settled(problem: LinearCE, lin: LinearSettings, users: dict[str, UserArray]
             ) -> tuple[LinearCE, LinearSettings]:
    """The problem's floor and the settings' `exact` for your gradients' tolerances."""
    tols = [u.tol for u in users.values()]
    return problem.with_floor(*floor_terms(tols)), resolve_exact(lin, problem, tols)


def _loss_ranked(problem: LinearCE, run: Pass, given: tuple[np.ndarray, Tolerance] | None,
                 ref_loss: float, opts: CheckOptions, users: dict[str, UserArray]
                 ) -> list[tuple[int, CheckResult]]:
    """Your loss's check, ranked (none without a loss)."""
    if given is None:
        return []
    computed = computed_16(given[1], [u.tol for u in users.values()], opts.precision is not None)
    return [(2, loss_check(problem, run, given, ref_loss, opts, computed))]


def loss_check(problem: LinearCE, run: Pass, user: tuple[np.ndarray, Tolerance], ref_loss: float,
               opts: CheckOptions, computed: str | None = None) -> CheckResult:
    """Your loss against the reference: held to its precision's rule, a 16-bit one as a 16-bit
    computation's per-sample losses (`loss_rule`, `grad`'s too); one that fails its own rule
    and was not declared, once more as the per-sample losses of your gradients' 16-bit
    precision `computed` reduced wider (LossStage's second rule)."""
    got, tol = user
    floor16 = getattr(run, "loss_floor16", None)  # None: float32 gradients, or a merged shard run
    if tol.precision in SIXTEEN_BIT and floor16 is not None:
        return _loss_compare(problem, run, floor16, got, loss_rule(tol), ref_loss, opts)
    result = _loss_compare(problem, run, run.loss_floor, got, tol, ref_loss, opts)
    if result.ok or computed is None or floor16 is None:
        return result
    wide_tol = per_sample_16(tol, computed)
    wide = _loss_compare(problem, run, floor16, got, wide_tol, ref_loss, opts)
    return replace(wide, note=computed_note(wide_tol, tol, wide.note)) if wide.ok else result


def _loss_compare(problem: LinearCE, run: Pass, row_floor: np.ndarray, got: np.ndarray,
                  tol: Tolerance, ref_loss: float, opts: CheckOptions) -> CheckResult:
    """Your loss held to `tol` with the rows' floors `row_floor` (against the pass's per-sample
    losses for 'none', else `ref_loss`)."""
    if problem.reduction == "none":
        cmp = Comparison("loss_vs_reference", tol, lambda r, c: problem.batch_index(r),
                         n_worst=opts.worst, extra_atol=opts.loss_atol, beyond_range=True)
        cmp.update(0, run.loss, got, tol.floor_coef * row_floor)
        return cmp.result()
    floor = tol.floor_coef * float(row_floor.sum()) + reduction_floor(tol, problem.n_rows, ref_loss)
    cmp = Comparison("loss_vs_reference", tol, lambda r, c: (), n_worst=1, extra_atol=opts.loss_atol,
                     beyond_range=True)
    cmp.update(0, np.array([ref_loss]), np.asarray(got, dtype=np.float64).reshape(1),
               np.array([floor]) if np.isfinite(floor) else None)
    return cmp.result()
