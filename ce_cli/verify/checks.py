"""`check_grad`: one streaming pass over row chunks that computes the float64 reference, compares
the user's gradient and loss, and proves the reference with finite differences."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ce_cli.kernels.allocator import keep_chunk_buffers
from ce_cli.verify.compare import Comparison
from ce_cli.errors import CeCheckError
from ce_cli.verify.finite_diff import (choose_mode, directional_chunk, fd_entries, fd_full, localize,
                                sample_entries)
from ce_cli.kernels.compiled import FusedKernel
from ce_cli.kernels.numerics import EPS, sigmoid
from ce_cli.verify.results import CheckResult, InputInfo, Report
from ce_cli.models.sigmoid import build_sigmoid_bce
from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.tolerance import Tolerance, resolve_tolerance

CHUNK_ELEMENTS = 1 << 17   # float64 entries per row chunk: 1 MB buffers stay in L2 (2x faster than 2 MB)
FUSED_CHUNK_ELEMENTS = 1 << 21  # the compiled kernel keeps one row in cache: chunks only bound Python overhead
FD_SAFETY = 2.0            # the finite-difference bound is rigorous; 2x covers the bound's own rounding


def row_chunks(n_rows: int, n_classes: int, elements: int = CHUNK_ELEMENTS):
    step = max(1, elements // max(1, n_classes))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


@dataclass(frozen=True)
class Reference:
    """The float64 reference: reduced loss, per-sample losses (batch shape), gradient (logits' shape)."""

    loss: float
    per_sample: np.ndarray
    grad: np.ndarray


def reference(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    class_axis: int = -1,
) -> Reference:
    """Loss and gradient of `F.cross_entropy(logits, labels, ...)` in float64, in memory.

    For reduction 'none' the gradient is that of the sum of per-sample losses.
    """
    problem, _ = build_softmax_ce(
        np.asarray(logits), np.asarray(labels), weight=weight, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, class_axis=class_axis)
    N, C = problem.n_rows, problem.n_classes
    grad = np.empty((N, C))
    per_sample = np.empty(N)
    for start, stop in row_chunks(N, C):
        ev = problem.evaluate(start, stop)
        grad[start:stop] = ev.grad
        per_sample[start:stop] = ev.loss
    layout = problem.layout
    return Reference(
        loss=problem.reduce(_total(per_sample)),
        per_sample=per_sample.reshape(layout.batch_shape),
        grad=layout.from_rows(grad),
    )


def _total(row_loss: np.ndarray) -> float:
    """Sum of row losses: exactly rounded (fsum) up to 2**20 rows, pairwise beyond."""
    return math.fsum(row_loss.tolist()) if row_loss.size <= 1 << 20 else float(np.sum(row_loss))


def check_grad(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    grad: np.ndarray | None = None,
    loss: np.ndarray | float | None = None,
    weight: np.ndarray | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    class_axis: int = -1,
    rtol: float | None = None,
    atol: float | None = None,
    precision: str | None = None,
    floor_factor: float | None = None,
    loss_atol: float = 0.0,
    fd: str = "auto",
    samples: int = 256,
    seed: int = 0,
    worst: int = 5,
    out_grad: str | Path | None = None,
    sources: dict[str, str] | None = None,
    chunk_elements: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra_checks: tuple[CheckResult, ...] = (),
) -> Report:
    """Verify softmax cross-entropy (PyTorch `F.cross_entropy` semantics) on arrays.

    Returns a `Report`; raises `CeCheckError` for invalid input. `loss_atol` widens the loss
    check (a number typed with few digits). `progress(done_rows, total_rows)` is called per chunk.
    """
    src = {"logits": "logits", "labels": "labels", "grad": "grad", "loss": "loss", "weight": "weight"}
    src.update(sources or {})
    logits = np.asarray(logits) if not isinstance(logits, np.ndarray) else logits
    labels = np.asarray(labels) if not isinstance(labels, np.ndarray) else labels
    problem, warnings = build_softmax_ce(
        logits, labels, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, class_axis=class_axis, source=src["logits"],
        labels_source=src["labels"], weight_source=src["weight"],
    )
    if problem.n_classes == 2:
        warnings.append("two classes: softmax CE over [z0, z1] equals sigmoid BCE on z1 - z0; "
                        "binary `two_class` checks the correspondence")
    return verify(
        problem, warnings, kind="multiclass", logits=logits, labels=labels, grad=grad, loss=loss,
        rtol=rtol, atol=atol, precision=precision, floor_factor=floor_factor, loss_atol=loss_atol,
        fd=fd, samples=samples, seed=seed, worst=worst, out_grad=out_grad, sources=src,
        chunk_elements=chunk_elements, progress=progress,
        options={"ignore_index": ignore_index, "label_smoothing": label_smoothing,
                 "class_axis": problem.layout.class_axis, "weighted": weight is not None},
        extra_checks=extra_checks,
    )


def verify(
    problem,
    warnings: list[str],
    *,
    kind: str,
    logits: np.ndarray,
    labels: np.ndarray,
    grad: np.ndarray | None,
    loss,
    rtol: float | None,
    atol: float | None,
    precision: str | None,
    floor_factor: float | None,
    loss_atol: float,
    fd: str,
    samples: int,
    seed: int,
    worst: int,
    out_grad,
    sources: dict[str, str],
    chunk_elements: int | None,
    progress,
    options: dict,
    extra_checks: tuple[CheckResult, ...] = (),
) -> Report:
    """The checks shared by every loss model: one streaming pass, then finite differences."""
    keep_chunk_buffers()
    src = sources
    reduction = problem.reduction
    layout = problem.layout
    N, C = problem.n_rows, problem.n_classes
    if samples < 1:
        raise CeCheckError(f"`samples`: must be at least 1, got {samples}")
    if worst < 0:
        raise CeCheckError(f"`worst`: must be >= 0, got {worst}")
    mode = choose_mode(fd, N, C)

    grad_rows, grad_tol = None, None
    if grad is not None:
        grad = np.asarray(grad) if not isinstance(grad, np.ndarray) else grad
        if grad.dtype.kind != "f":
            raise CeCheckError(f"{src['grad']}: dtype {grad.dtype} is not floating point")
        if grad.shape != logits.shape:
            raise CeCheckError(
                f"{src['grad']}: shape {grad.shape} does not match the logits {logits.shape}"
            )
        grad_rows = layout.to_rows(grad)
        grad_tol = resolve_tolerance(grad.dtype, precision, rtol, atol, floor_factor)
        # each rounding of a subnormal errs by up to tiny/2; exp, /sum and *w chain three of them
        # and a weight Q multiplies the earlier ones: (k/2)*(1 + Q*scale) tiny covers it
        grad_tol = replace(grad_tol, tiny=grad_tol.tiny * max(
            1.0, grad_tol.floor_factor / 2.0 * (1.0 + problem.max_target_weight * abs(problem.grad_scale))))

    loss_arr, loss_tol = None, None
    if loss is not None:
        loss_arr = np.asarray(loss)
        if loss_arr.dtype.kind not in "iuf":
            raise CeCheckError(f"{src['loss']}: dtype {loss_arr.dtype} is not numeric")
        if reduction == "none":
            loss_arr = problem.match_per_sample(loss_arr, src["loss"])
        elif loss_arr.size != 1:
            raise CeCheckError(
                f"{src['loss']}: shape {loss_arr.shape}; reduction '{reduction}' gives a scalar loss "
                "(use `reduction=none` for per-sample losses)"
            )
        loss_tol = resolve_tolerance(
            loss_arr.dtype if loss_arr.dtype.kind == "f" else np.float64, precision, rtol, atol, floor_factor
        )

    out_rows, finish_out_grad, discard_out_grad = _open_out_grad(out_grad, logits.shape, layout)
    ref64 = resolve_tolerance(np.float64)
    grad_cmp = fd_ref_cmp = fd_user_cmp = None
    if grad_rows is not None:
        grad_cmp = Comparison("grad_vs_reference", grad_tol, layout.original_index,
                              expected_label="reference", got_label="yours", n_worst=worst)
    if mode == "full":
        fd_ref_cmp = Comparison("fd_vs_reference", ref64, layout.original_index,
                                expected_label="finite diff", got_label="reference", n_worst=worst)
        if grad_rows is not None:
            fd_user_cmp = Comparison("fd_vs_grad", grad_tol, layout.original_index,
                                     expected_label="finite diff", got_label="yours", n_worst=worst)
    dir_ref_cmp = dir_user_cmp = None
    if mode == "directional":
        def row_index(r, _c):
            return layout.batch_index(r)

        dir_rng = np.random.default_rng(seed)
        dir_ref_cmp = Comparison("fd_rows_vs_reference", ref64, row_index, expected_label="finite diff",
                                 got_label="reference", n_worst=worst,
                                 note="one random direction per row")
        if grad_rows is not None:
            dir_user_cmp = Comparison("fd_rows_vs_grad", grad_tol, row_index,
                                      expected_label="finite diff", got_label="yours", n_worst=worst,
                                      note="one random direction per row")

    # the compiled kernel compares on the way, without the (R, C) reference and floor arrays
    fused = FusedKernel.plan(problem) if mode == "sample" and out_rows is None else None
    row_loss = np.empty(N)
    per_sample = np.empty((N,) + problem.per_sample_cols) if loss_tol is not None else None
    loss_floor = np.empty_like(per_sample) if loss_tol is not None else None
    fd_skipped = 0
    fd_evaluations = 0
    floor_coef = grad_tol.floor_coef if grad_tol is not None else None
    try:
        step = chunk_elements or (FUSED_CHUNK_ELEMENTS if fused is not None else CHUNK_ELEMENTS)
        for start, stop in row_chunks(N, C, step):
            ev = None
            if fused is not None:
                ev = fused.evaluate(problem.z[start:stop], np.arange(start, stop), cmp=grad_cmp,
                                    g_rows=None if grad_rows is None else grad_rows[start:stop])
            user_tol = None
            if ev is None:
                ev = problem.evaluate(start, stop, grad=True, floor_coef=floor_coef)
                if grad_cmp is not None:
                    user_tol = grad_cmp.update(start, ev.grad, grad_rows[start:stop], ev.floor)
            row_loss[start:stop] = ev.loss
            if loss_floor is not None:
                per_sample[start:stop] = problem.per_sample(ev)
                loss_floor[start:stop] = problem.loss_floor(ev, loss_tol.floor_coef)
            if mode == "directional":
                dc = directional_chunk(problem, start, stop, ev.grad, dir_rng,
                                       None if grad_rows is None else grad_rows[start:stop], user_tol)
                fd_evaluations += 2 * (stop - start)
                dir_ref_cmp.update(start, dc.fd, dc.ref, FD_SAFETY * dc.bound)
                if dir_user_cmp is not None:
                    dir_user_cmp.update(start, dc.fd, dc.got, FD_SAFETY * dc.bound + dc.got_bound)
            if out_rows is not None:
                out_rows[start:stop] = ev.grad
            if mode == "full":
                fdv, bound, skipped = fd_full(problem, start, stop)
                fd_skipped += skipped
                fd_evaluations += 2 * (stop - start) * C
                fdv, bound = _settle_skipped(fdv, bound, ev.grad)
                fd_ref_cmp.update(start, fdv, ev.grad, FD_SAFETY * bound)
                if fd_user_cmp is not None:
                    fd_user_cmp.update(start, fdv, grad_rows[start:stop], FD_SAFETY * bound + ev.floor)
            if progress is not None:
                progress(stop, N)
        finish_out_grad()
    except BaseException:
        discard_out_grad()  # no half-written gradient after an input error
        raise

    total = problem.reduce(_total(row_loss))
    checks: list[CheckResult] = []
    if grad_cmp is not None:
        checks.append(grad_cmp.result())
    if loss_arr is not None:
        checks.append(_check_loss(problem, loss_arr, loss_tol, loss_atol, per_sample, loss_floor,
                                  total, worst))
    if mode == "directional":
        checks.insert(0, dir_ref_cmp.result())
        if dir_user_cmp is not None:
            result, used = _localize_failures(problem, dir_user_cmp.result(), dir_user_cmp.positions(),
                                              grad_rows, grad_tol, seed)
            fd_evaluations += used
            checks.append(result)
    if mode in ("sample", "directional"):
        extra = grad_cmp.positions() if grad_cmp is not None else []
        rows, cols = sample_entries(problem, samples, seed, extra)
        res = fd_entries(problem, rows, cols, grad_tol.floor_coef if grad_tol is not None else None)
        fd_skipped += res.skipped
        fd_evaluations += res.evaluations
        checks += _check_sampled_fd(problem, res, grad_rows, grad_tol, ref64, worst)
    elif mode == "full":
        checks.insert(0, fd_ref_cmp.result())
        if fd_user_cmp is not None:
            checks.append(fd_user_cmp.result())
    checks += extra_checks
    if fd_skipped:
        warnings.append(f"finite differences skipped {fd_skipped} entries at -inf logits or "
                        "in rows whose loss is infinite")

    n_ignored = int(N - np.count_nonzero(problem.valid))
    infos = [InputInfo("logits", src["logits"], tuple(logits.shape), str(logits.dtype)),
             InputInfo("labels", src["labels"], tuple(labels.shape), str(labels.dtype))]
    if grad is not None:
        infos.append(InputInfo("grad", src["grad"], tuple(grad.shape), str(grad.dtype)))
    if loss_arr is not None:
        infos.append(InputInfo("loss", src["loss"], tuple(np.shape(loss)), str(loss_arr.dtype)))
    return Report(
        kind=kind,
        ok=all(c.ok for c in checks),
        loss=float(total),
        loss_per_sample_shape=problem.per_sample_shape if reduction == "none" else None,
        shape=tuple(logits.shape),
        n_rows=N,
        n_classes=C,
        n_ignored=n_ignored,
        reduction=reduction,
        target_kind=problem.target_kind,
        checks=tuple(checks),
        inputs=tuple(infos),
        warnings=tuple(warnings),
        fd_mode=mode,
        fd_evaluations=fd_evaluations,
        options={**options, "precision": grad_tol.precision if grad_tol else None,
                 "kernel": "compiled" if FusedKernel.plan(problem) is not None else "numpy"},
    )


def _localize_failures(problem, result: CheckResult, positions, grad_rows, grad_tol, seed,
                       max_rows: int = 3) -> tuple[CheckResult, int]:
    """Bisection over column blocks in the worst failing rows; the finds go into the note."""
    if result.ok:
        return result, 0
    found, used = [], 0
    failing = [r for (r, _c), e in zip(positions, result.worst) if not e.ok][:max_rows]
    for row in failing:
        ev = problem.evaluate_rows(np.asarray(problem.z[row:row + 1]), np.array([row]),
                                   floor_coef=grad_tol.floor_coef)
        got = np.asarray(grad_rows[row], dtype=np.float64)
        tol = np.abs(ev.grad[0]) * grad_tol.rtol + grad_tol.atol + grad_tol.tiny + ev.floor[0]
        col, n = localize(problem, row, got, tol, seed + row)
        used += n
        where = problem.layout.original_index(row, col) if col is not None else "not isolated"
        found.append(f"row {problem.layout.batch_index(row)} -> entry {where}")
    note = "; ".join([result.note, "bisection: " + ", ".join(found)]) if found else result.note
    return replace(result, note=note), used


def _settle_skipped(fdv: np.ndarray, bound: np.ndarray, ref: np.ndarray):
    """Entries finite differences cannot probe (NaN), or whose reference is NaN (0/0 means),
    compare as equal to the reference."""
    skip = np.isnan(fdv) | np.isnan(ref)
    if skip.any():
        fdv = np.where(skip, ref, fdv)
        bound = np.where(skip, 0.0, bound)
    return fdv, bound


def _check_loss(problem, loss_arr, tol: Tolerance, loss_atol, per_sample, loss_floor, total,
                worst) -> CheckResult:
    if problem.reduction == "none":
        cmp = Comparison("loss_vs_reference", tol, problem.per_sample_index,
                         expected_label="reference", got_label="yours", n_worst=worst,
                         extra_atol=loss_atol)
        cmp.update(0, per_sample, loss_arr, loss_floor)
        return cmp.result()
    scale = problem.grad_scale
    n = max(1, problem.n_rows)
    # a reduction in the user's precision adds about log2(N) roundings of the total
    floor = float(np.sum(loss_floor)) * scale + tol.floor_coef * math.log2(n + 1) * abs(total)
    cmp = Comparison("loss_vs_reference", tol, lambda r, c: (), expected_label="reference",
                     got_label="yours", n_worst=1, extra_atol=loss_atol)
    got = np.asarray(loss_arr, dtype=np.float64).reshape(1)
    cmp.update(0, np.array([total]), got, np.array([floor]) if np.isfinite(floor) else None)
    return cmp.result()


def _check_sampled_fd(problem, res, grad_rows, grad_tol, ref64, worst) -> list[CheckResult]:
    rows, cols = res.rows, res.cols
    fdv, bound = _settle_skipped(res.fd, res.bound, res.reference)
    layout = problem.layout

    def index_of(i, _c):
        return layout.original_index(int(rows[i]), int(cols[i]))

    note = f"{rows.size} sampled entries"
    cmp = Comparison("fd_vs_reference", ref64, index_of, expected_label="finite diff",
                     got_label="reference", n_worst=worst, note=note)
    cmp.update(0, fdv, res.reference, FD_SAFETY * bound)
    out = [cmp.result()]
    if grad_rows is not None:
        cmp = Comparison("fd_vs_grad", grad_tol, index_of, expected_label="finite diff",
                         got_label="yours", n_worst=worst, note=note)
        cmp.update(0, fdv, np.asarray(grad_rows[rows, cols]), FD_SAFETY * bound + res.floor)
        out.append(cmp.result())
    return out


def _open_out_grad(path, shape, layout):
    """Rows to write the reference gradient into, and a function that finishes the file.

    Written to a temporary file beside `path` and renamed on success, so a run that stops on
    an input error leaves no half-written gradient. Class axis last: a memory-mapped .npy
    filled chunk by chunk; otherwise rows gathered in memory and transposed back on save.
    """
    if path is None:
        return None, lambda: None, lambda: None
    final = Path(path)
    tmp = final.with_name(f".{final.name}.partial.npy")
    try:
        if layout.class_axis == len(shape) - 1:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=tuple(shape))
            rows = mm.reshape(layout.n_rows, layout.n_classes)
        else:
            mm, rows = None, np.empty((layout.n_rows, layout.n_classes))
            tmp.touch()
    except OSError as exc:
        raise CeCheckError(f"`out_grad` '{path}': cannot write ({exc.strerror or exc})") from None
    def finish():
        if mm is not None:
            mm.flush()
        else:
            np.save(tmp, layout.from_rows(rows))
        os.replace(tmp, final)

    return rows, finish, lambda: tmp.unlink(missing_ok=True)


def check_binary(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    grad: np.ndarray | None = None,
    loss: np.ndarray | float | None = None,
    weight: np.ndarray | None = None,
    pos_weight: np.ndarray | float | None = None,
    reduction: str = "mean",
    two_class: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    precision: str | None = None,
    floor_factor: float | None = None,
    loss_atol: float = 0.0,
    fd: str = "auto",
    samples: int = 256,
    seed: int = 0,
    worst: int = 5,
    out_grad: str | Path | None = None,
    sources: dict[str, str] | None = None,
    chunk_elements: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Verify sigmoid binary cross-entropy (PyTorch `BCEWithLogitsLoss` semantics) on arrays.

    Labels in [0, 1] with the logits' shape; `weight` broadcasts to the logits, `pos_weight`
    along the last axis. The report always carries the two-class bridge: softmax CE over
    [0, z] with targets [1 - y, y] equals BCE(z, y), and d/dz1 = s(z) - y = -d/dz0.
    With `two_class=True` the logits are (..., 2) softmax logits with class-index (or
    probability) labels: the multiclass checks run on them, and the bridge on z = z1 - z0.
    """
    src = {"logits": "logits", "labels": "labels", "grad": "grad", "loss": "loss",
           "weight": "weight", "pos_weight": "pos_weight"}
    src.update(sources or {})
    logits = np.asarray(logits) if not isinstance(logits, np.ndarray) else logits
    labels = np.asarray(labels) if not isinstance(labels, np.ndarray) else labels
    common = dict(grad=grad, loss=loss, rtol=rtol, atol=atol, precision=precision,
                  floor_factor=floor_factor, loss_atol=loss_atol, fd=fd, samples=samples, seed=seed,
                  worst=worst, out_grad=out_grad, chunk_elements=chunk_elements, progress=progress)
    if two_class:
        if pos_weight is not None:
            raise CeCheckError("`pos_weight`: not used with `two_class` (give `weight`, 2 class weights)")
        if logits.ndim < 1 or logits.shape[-1] != 2:
            raise CeCheckError(f"{src['logits']}: shape {logits.shape}; `two_class` needs (..., 2) logits")
        report = check_grad(logits, labels, weight=weight, reduction=reduction, sources=src, **common)
        with np.errstate(invalid="ignore"):
            x = np.asarray(logits[..., 1], dtype=np.float64) - np.asarray(logits[..., 0], dtype=np.float64)
        if labels.shape == logits.shape:
            y = np.asarray(labels[..., 1], dtype=np.float64)
            ignored = np.zeros(x.shape, dtype=bool)
        else:
            y = np.asarray(labels, dtype=np.float64).reshape(x.shape)
            ignored = y == report.options["ignore_index"]
        # a -inf logit makes z1 - z0 = +-inf, where the identity only holds as a limit
        masked = ~np.isfinite(x) | ignored
        problem, _ = build_sigmoid_bce(np.where(masked, 0.0, x), np.where(masked, 0.0, y),
                                       source=src["logits"], labels_source=src["labels"])
        skipped = int(np.count_nonzero(masked))
        bridge = two_class_bridge(problem, worst, note=f"{skipped} masked or ignored rows left out"
                                  if skipped else "")
        return replace(report, checks=report.checks + (bridge,), ok=report.ok and bridge.ok,
                       warnings=tuple(w for w in report.warnings if "two classes" not in w))
    problem, warnings = build_sigmoid_bce(
        logits, labels, weight=weight, pos_weight=pos_weight, reduction=reduction,
        source=src["logits"], labels_source=src["labels"], weight_source=src["weight"],
        pos_weight_source=src["pos_weight"])
    plain = problem if weight is None and pos_weight is None else build_sigmoid_bce(logits, labels)[0]
    bridge = two_class_bridge(plain, worst, note="" if plain is problem else
                              "identity checked without weight/pos_weight")
    return verify(
        problem, warnings, kind="binary", logits=logits, labels=labels, sources=src,
        options={"weighted": weight is not None, "pos_weighted": pos_weight is not None},
        extra_checks=(bridge,), **common)


BRIDGE_ELEMENTS = 1 << 16


def two_class_bridge(problem, worst: int = 5, note: str = "") -> CheckResult:
    """Softmax CE over [0, x] with targets [1 - y, y] against sigmoid BCE(x, y), element by
    element (the first 2^16 elements): losses, d/dz1 against s(x) - y, -d/dz0 against the same.
    Both sides are float64 references, so the rule is 1e-12 relative."""
    K = problem.n_classes
    rows = max(1, min(problem.n_rows, BRIDGE_ELEMENTS // K))
    ev = problem.evaluate_rows(problem.z[:rows], np.arange(rows))
    x = np.asarray(problem.z[:rows], dtype=np.float64).reshape(-1)
    y = np.asarray(problem.targets[:rows], dtype=np.float64).reshape(-1)
    pair = np.stack([np.zeros_like(x), x], axis=1)
    ce = reference(pair, np.stack([1.0 - y, y], axis=1), reduction="none")
    scale = problem.grad_scale
    bce = np.stack([ev.items.reshape(-1), ev.grad.reshape(-1) / scale, ev.grad.reshape(-1) / scale], 1)
    mine = np.stack([ce.per_sample, ce.grad[:, 1], -ce.grad[:, 0]], axis=1)
    # both sides are float64 references: 1e-12 relative, plus their own rounding. CE's targets
    # [1 - y, y] and their sum Q round, so dz1 = Q a1 - y errs by eps*(s + y), dz0 = Q a0 - (1 - y)
    # by eps*((1 - s) + (1 - y)); the loss by eps*(|loss| + |x|)
    s_x = sigmoid(x)
    floor = 8.0 * EPS * np.stack([np.abs(bce[:, 0]) + np.abs(x), s_x + y, (1.0 - s_x) + (1.0 - y)], 1)
    tol = Tolerance("f64", EPS, 2.0**-1074, rtol=1e-12, atol=0.0, floor_factor=8.0)
    layout = problem.layout
    parts = ("loss", "d/dz1", "-d/dz0")

    def index_of(i, part):
        return layout.original_index(*divmod(int(i), K)) + (parts[part],)

    cmp = Comparison("two_class_bridge", tol, index_of, expected_label="sigmoid BCE",
                     got_label="softmax CE [0, z]", n_worst=worst,
                     note=note or f"{x.size} elements: CE([0, z]) = BCE(z), d/dz1 = s(z) - y = -d/dz0")
    cmp.update(0, bce, mine, floor)
    return cmp.result()
