"""`linear --shards rows`, the client's side: the shards' parts (`linear.py`) merged into one
report, with ONE --grad-weight and --grad-bias for the whole batch, the sum over the shards an
all-reduce produces.

- merge: the partials add in shard order (plain float adds, as the single-process pass adds its
  row blocks: each entry's sum of n terms rounds within (n - 1) eps of the sum of |terms|, which
  the projections' rounding allowance 4 eps (sqrt N + sqrt H) already covers), then ONE
  comparison with your dL/dW projections (GW R) and your dL/db. Failing vocabulary rows (the 16
  worst) are computed exactly by a second mapped pass: each shard's G_i[:, v]^T H_i, summed.
- the loss is `math.fsum` of the shards' exactly rounded row-loss sums, divided by D: within
  (2 + shards) eps/2 relative of the single-process loss for non-negative row losses.
- finite differences: the client and each shard make `check_linear`'s draws over the batch's N
  rows (`_batch_probes`), so the probes, R and S are the batch's. A hidden probe is evaluated
  on its row's shard and returned at its global row with your dL/dH along it (`ShardFD`); a
  weight or bias probe and the bias direction move every row's logits: the shards' partial
  sums (loss differences, G.2u, their bounds with the batch's log2 N factor, your tolerance's
  terms without its atol term) add exactly rounded (`_fsum`, math.fsum), within the shards'
  own block rounding plus eps/2 of the exact sum of the row terms, the error the single-process
  pass makes over its row blocks and its bounds allow; then `fd_checks` as in one process.
- `exact`: each shard compares its dL/dH entry by entry and returns its G_i^T H_i and floor
  (V x H each); the client adds them in shard order and compares your dL/dW once.

The client reads WEIGHT (and BIAS, class weights), --grad-weight and --grad-bias, and the first
row of shard 0 (the stand-in problem that carries V, H, the scale and the tolerances); the
hidden states and their gradients are read only by the shard tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.models.linear import LinearCE
from ce_cli.verify.linear.arrays import UserArray, user_arrays
from ce_cli.verify.linear.check import fd_checks, loss_check, report_echo, transposed, user_loss
from ce_cli.verify.linear.exact import projection_result, user_comparison
from ce_cli.verify.linear.probes import (BiasDirection, Probes, Projection, WeightFD, choose_probes,
                                         row_ranges)
from ce_cli.verify.linear.stream import bias_column, join_probes
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, InputInfo, Report
from ce_cli.verify.shards.files import describe, load
from ce_cli.verify.shards.linear import (LinearBatch, LinearPart, ShardFD, linear_denominator,
                                         linear_exact_rows, linear_hidden_rows, linear_shard,
                                         shard_problem)
from ce_cli.verify.shards.merge import merge_checks
from ce_cli.verify.shards.plan import (LocalMapper, Mapper, Shard, ShardedReport, ShardFiles,
                                       ShardSummary, make_plan, one_or_per_shard)
from ce_cli.verify.shards.run import refuse_unsharded


def check_linear_options(options: CheckOptions, batch: LinearBatch) -> None:
    """What linear shards do not carry: refused, one line each, never ignored. The row-local
    training-code options are carried (each shard's problem is built with them; `shift_labels`
    on (B, T, H) shards, `sequences`)."""
    refuse_unsharded(options, 1, "linear `shards`")


def sequences(shapes: Sequence[tuple[int, ...]], options: CheckOptions) -> int | None:
    """T of (B, T, H) shards (each whole sequences: the same T in every shard), None for
    (N, H) shards, which `shift_labels` cannot take (they could cut a sequence between two)."""
    dims = {len(s) for s in shapes}
    if dims == {2}:
        if options.shift_labels:
            raise CeCheckError("`shift_labels`: linear row shards need (B, T, H) hidden states, "
                               "each shard whole sequences ((N, H) shards could cut a sequence "
                               "between two)")
        return None
    if dims == {3} and len({s[1] for s in shapes}) == 1:
        return shapes[0][1]
    raise CeCheckError(f"`shards`: linear shards need (N, H) hidden states, or (B, T, H) with "
                       f"the same T in every shard; got {', '.join(map(str, shapes[:3]))}")


def run_linear_shards(files: Sequence[ShardFiles], options: CheckOptions, batch: LinearBatch, *,
                      grad_weight: str | None = None, grad_bias: str | None = None,
                      loss: Any = None, loss_source: str = "loss", mapper: Mapper | None = None,
                      progress: Callable[[int, int], None] | None = None) -> ShardedReport:
    """Describe, pass 1, pass 2, the weight side's merge and comparison (module docstring)."""
    mapper = mapper or LocalMapper()
    check_linear_options(options, batch)
    if loss is not None and options.reduction.value == "none":
        raise CeCheckError("`loss`: per-token losses are files with linear `shards` (one for the "
                           "batch or one per shard: `loss_files`)")
    # sharded: projections unless --exact (`resolve_exact`'s default needs every shard's dtype)
    batch = replace(batch, weight_side=grad_weight is not None,
                    settings=replace(batch.settings, exact=bool(batch.settings.exact)))
    shapes = mapper.map(describe, [f.logits for f in files], ("hidden",))
    T = sequences(shapes, options)
    flat = [(s[0] * s[1], s[2]) if T else s for s in shapes]  # the plan counts token rows
    plan = make_plan(files, flat, mapper.map(describe, list(dict.fromkeys(f.labels for f in files)),
                                             ("labels",)), "rows")
    _check_token_files(plan, batch, options)
    batch = replace(batch, batch_shape=(plan.shape[0] // T, T) if T else (plan.shape[0],))
    D = None
    if options.reduction.value == "mean":
        D = math.fsum(mapper.map(linear_denominator, plan.shards, (batch, options)))
    stand = _stand_in(plan, batch, options, D)
    users, inputs = _client_users(stand, batch, options,
                                  {"grad_weight": grad_weight, "grad_bias": grad_bias})
    rng = np.random.default_rng(options.seed)  # the batch's draws, as `check_linear` makes them
    probes = choose_probes(stand, options, rng)
    direction = BiasDirection(stand, rng, probes[0] != "off")
    batch = replace(batch, n_rows=plan.shape[0], fd_tols=tuple(  # type: ignore[arg-type]
        users[k].tol if k in users else None for k in ("grad_weight", "grad_bias")))
    parts = mapper.map(linear_shard, plan.shards, (options, batch, D), progress)
    if parts[0].gh_tol is not None:
        users = {"grad_hidden": UserArray(None, parts[0].gh_tol,
                                          lambda r, c: stand.batch_index(r) + (c,)), **users}
    checks = _batch_checks(plan, parts, stand, users, batch, options, mapper, D)
    fd, evaluations = _fd_merge(parts, probes, direction, stand, users, options.worst)
    return _merge(plan, parts, stand, batch, options, (users, checks + fd, inputs),
                  (loss, loss_source), (probes[0], evaluations))


def _check_token_files(plan: Any, batch: LinearBatch, options: CheckOptions) -> None:
    """One file of the batch's tokens or one per shard; per-token losses need reduction none."""
    for role, given in (("sample_weight", batch.sample_weight), ("loss", batch.loss_files)):
        if given:
            one_or_per_shard(f"`{role}`", len(given), len(plan.shards), "hidden")
    if batch.loss_files and options.reduction.value != "none":
        raise CeCheckError("`loss`: files of per-token losses need reduction none")


def _stand_in(plan: Any, batch: LinearBatch, options: CheckOptions, D: float | None) -> LinearCE:
    """The client's problem: shard 0's first row broadcast to the batch's N rows (no data, a
    zero-stride view): it carries N, V, H, the class weights, 1/D and so the tolerances."""
    problem, _, _ = shard_problem(plan.shards[0], batch, options, D, slice(0, 1))
    N, H = plan.shape
    return replace(problem, hidden=np.broadcast_to(problem.hidden[:1], (N, H)),
                   batch_shape=batch.batch_shape or (N,))


def _client_users(stand: LinearCE, batch: LinearBatch, options: CheckOptions,
                  files: dict[str, str | None]) -> tuple[dict[str, UserArray], tuple[InputInfo, ...]]:
    """Your dL/dW and dL/db (read here, once) and the batch-wide files' descriptions."""
    grads = {k: load(v, k) for k, v in files.items() if v is not None}
    shared = {"weight": batch.weight, "bias": batch.bias, "class_weight": batch.class_weight, **files}
    inputs = tuple(InputInfo(r, f"{r} file '{f}'", tuple(a.shape), str(a.dtype))
                   for r, f in shared.items() if f is not None
                   for a in [grads[r] if r in grads else load(f, r)])
    src = {**{r: r for r in ("hidden", "grad_hidden", "loss")},
           **{k: f"{k} file '{v}'" for k, v in files.items()}}
    return user_arrays(stand, grads, src, options, batch.settings.weight_layout), inputs


def _batch_checks(plan: Any, parts: list[LinearPart], stand: LinearCE,
                  users: dict[str, UserArray], batch: LinearBatch, options: CheckOptions,
                  mapper: Mapper, D: float | None) -> list[tuple[int, CheckResult]]:
    """dL/dH merged over the shards; dL/dW and dL/db from the summed partials, compared once
    (ranked as `check_linear` ranks them: gradients 1)."""
    wa = np.sum(np.stack([p.wa for p in parts]), axis=0)
    wp = np.sum(np.stack([p.wp for p in parts]), axis=0)
    checks = []
    if parts[0].gh_tol is not None:
        checks.append(_hidden_check(plan, parts, batch, options, mapper, D))
    if "grad_weight" in users and batch.settings.exact:  # `check_linear`'s order: dL/dW first
        checks.insert(0, _exact_weight_check(parts, stand, users["grad_weight"], options.worst))
    elif "grad_weight" in users:
        checks.append(_weight_check(plan, parts, stand, users["grad_weight"], wa, wp, batch,
                                    options, mapper, D))
    if "grad_bias" in users:
        gb = users["grad_bias"]
        cmp = user_comparison("grad_bias_vs_reference", gb, options.worst)
        cmp.update(0, wa[None, :, 0], gb.rows, wp[None, :, 0] * gb.tol.floor_coef)
        checks.append(cmp.result())
    return [(1, c) for c in checks]


def _fsum(arrays: list[np.ndarray]) -> np.ndarray:
    """Entry by entry, the exactly rounded sum of the shards' partials (math.fsum)."""
    return np.array([math.fsum(col) for col in np.stack(arrays).T.tolist()], dtype=np.float64)


def _fd_merge(parts: list[LinearPart], probes: tuple[str, Probes, Probes, Probes],
              direction: BiasDirection, stand: LinearCE, users: dict[str, UserArray],
              worst: int) -> tuple[list[tuple[int, CheckResult]], int]:
    """The batch's finite differences: the shards' hidden probes concatenated (global rows, in
    order), the weight and bias probes' and the bias direction's partial sums added by `_fsum`,
    then `check_linear`'s comparisons; and the number of loss evaluations."""
    mode, hp, wprobe, bprobe = probes
    fds = [p.fd for p in parts if p.fd is not None]
    if mode == "off" or not fds:
        return [], 0
    hidden = _hidden_probes(fds, hp.direction)
    _add_partials(fds, wprobe, bprobe, stand, users)
    if direction.on:
        direction.fd, direction.bound = (math.fsum(fd.direction[i] for fd in fds) for i in (0, 1))
        db = _fsum([p.wa[:, 0] for p in parts])  # the summed dL/db, as the gradient check's
        db_floor = _fsum([p.wp[:, 0] for p in parts])
        bprobe = join_probes(direction.probes(db, db_floor, users.get("grad_bias")), bprobe)
    moves = ({"hidden": np.concatenate([fd.hidden_got for fd in fds if fd.hidden_got is not None])}
             if "grad_hidden" in users else None)
    checks = fd_checks(stand, users, (hidden, wprobe, bprobe), worst, direction.u, moves)
    return checks, 2 * (hidden.owner.size + wprobe.owner.size + bprobe.owner.size)


def _hidden_probes(fds: list[ShardFD], direction: np.ndarray) -> Probes:
    """The shards' hidden probes, complete, in shard order: the batch's (owner, entry) order."""
    return Probes(*(direction if f.name == "direction" else
                    np.concatenate([getattr(fd.hidden, f.name) for fd in fds])
                    for f in fields(Probes)))


def _add_partials(fds: list[ShardFD], wprobe: Probes, bprobe: Probes, stand: LinearCE,
                  users: dict[str, UserArray]) -> None:
    """The weight and bias probes' sums over the batch: the shards' partials added, then the
    atol term of your gradients' bound once (`WeightFD.finish`)."""
    for merged, side in ((wprobe, "weight"), (bprobe, "bias")):
        for f in ("fd", "ref", "bound", "got_bound"):
            setattr(merged, f, _fsum([getattr(getattr(fd, side), f) for fd in fds]))
    WeightFD(stand, wprobe, users.get("grad_weight")).finish()
    WeightFD(stand, bprobe, bias_column(users.get("grad_bias"))).finish()


def _hidden_check(plan: Any, parts: list[LinearPart], batch: LinearBatch, options: CheckOptions,
                  mapper: Mapper, D: float | None) -> CheckResult:
    """dL/dH: the shards' passing verdicts merged; or, as `projection_result` on the batch,
    its worst `max_open_rows` failing rows (by ratio, then row) computed exactly on their
    shards and compared, the failing rows counted over the batch."""
    failing = np.concatenate([p.failing for p in parts])
    if failing.size == 0:
        return _token_index(merge_checks([(s, p.hidden) for s, p in zip(plan.shards, parts)
                                          if p.hidden is not None], options.worst), batch)
    order = np.lexsort((failing[:, 0], -failing[:, 1]))
    rows = failing[order, 0].astype(np.int64)
    opened = np.sort(rows[:batch.settings.max_open_rows])
    items = [(s, p.lse, p.herr) for s, p in zip(plan.shards, parts)]
    got = mapper.map(linear_hidden_rows, items, (options, batch, D, opened))
    res = merge_checks([(s, c) for s, c in zip(plan.shards, got) if c is not None], options.worst)
    k = batch.settings.projections
    note = (f"{k} Gaussian projections per token row (Freivalds); a row whose error is 10x its "
            f"threshold passes with probability <= {batch.settings.false_pass():.1g}"
            f"; {rows.size} of {plan.shape[0]} token rows fail: {row_ranges(rows)}; exact entries "
            f"of {opened.size} worst rows: {res.mismatches} of {res.total} over tolerance")
    return replace(_token_index(res, batch), ok=False, mismatches=max(res.mismatches, int(rows.size)),
                   note=note)


def _token_index(check: CheckResult, batch: LinearBatch) -> CheckResult:
    """The check's entries at their tokens: a token row r of (B, T, H) shards is (b, t)."""
    if len(batch.batch_shape) < 2:
        return check
    worst = tuple(replace(e, index=tuple(int(i) for i in np.unravel_index(
        e.index[0], batch.batch_shape)) + tuple(e.index[1:])) for e in check.worst)
    return replace(check, worst=worst)


def _weight_check(plan: Any, parts: list[LinearPart], stand: LinearCE, user: UserArray,
                  wa: np.ndarray, wp: np.ndarray, batch: LinearBatch, options: CheckOptions,
                  mapper: Mapper, D: float | None) -> CheckResult:
    """Your dL/dW projected on the shards' R against the summed G^T (H R); failing rows exact."""
    r = parts[0].r
    assert r is not None
    V, k = stand.n_classes, r.shape[1]
    proj = Projection("grad_weight_vs_reference", user, V, k, np.random.default_rng(0),
                      stand.hidden_size)
    proj.r, proj.r_norm = r, np.sqrt(np.einsum("ij,ij->j", r, r))
    proj.ref, proj.rel, proj.floor = wa[:, 1:1 + k], wa[:, 1 + k], wp[:, 1]
    proj.project_user()
    items = [(s, p.lse, p.herr) for s, p in zip(plan.shards, parts)]

    def exact(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        got = mapper.map(linear_exact_rows, items, (options, batch, D, cols))
        return (np.sum(np.stack([g[0] for g in got]), axis=0),
                np.sum(np.stack([g[1] for g in got]), axis=0))

    res = projection_result(proj, exact, batch.settings, options.worst,
                            math.sqrt(stand.n_rows) + math.sqrt(stand.hidden_size), "vocabulary")
    return transposed(res, stand) if user.transposed else res


def _exact_weight_check(parts: list[LinearPart], stand: LinearCE, user: UserArray,
                        worst: int) -> CheckResult:
    """`exact`: every entry of your dL/dW against the sum of the shards' G_i^T H_i (in shard
    order, plain adds: within (shards - 1) eps of the sum of their absolute values), its floor
    the sum of theirs."""
    ref = np.sum(np.stack([p.exact_w[0] for p in parts if p.exact_w is not None]), axis=0)
    floor = np.sum(np.stack([p.exact_w[1] for p in parts if p.exact_w is not None]), axis=0)
    cmp = user_comparison("grad_weight_vs_reference", user, worst, "exact: every entry")
    cmp.update(0, ref, user.rows, floor * user.tol.floor_coef)
    res = cmp.result()
    return transposed(res, stand) if user.transposed else res


def _merge(plan: Any, parts: list[LinearPart], stand: LinearCE, batch: LinearBatch,
           options: CheckOptions,
           users_checks: tuple[dict[str, UserArray], list[tuple[int, CheckResult]],
                               tuple[InputInfo, ...]],
           loss_in: tuple[Any, str], fd: tuple[str, int]) -> ShardedReport:
    """The merged report: the single-process report's fields, its checks in its order
    (finite differences vs the reference, gradients, loss, finite differences vs yours)."""
    users, ranked, client_inputs = users_checks
    loss, loss_source = loss_in
    ref_loss = stand.reduce(math.fsum(p.loss_total for p in parts))
    ranked += _loss_checks(plan, parts, stand, batch, options, loss_in, ref_loss)
    checks = tuple(c for _, c in sorted(ranked, key=lambda rc: rc[0]))
    report = Report(
        kind="linear", ok=all(c.ok for c in checks), loss=float(ref_loss),
        loss_per_sample_shape=batch.batch_shape if stand.reduction == "none" else None,
        shape=batch.batch_shape + plan.shape[1:], n_rows=plan.shape[0], n_classes=stand.n_classes,
        n_ignored=sum(p.n_ignored for p in parts), reduction=stand.reduction,
        target_kind="index", checks=checks,
        inputs=tuple(i for p in parts for i in p.inputs) + client_inputs
        + ((InputInfo("loss", loss_source, tuple(np.shape(loss)), str(np.asarray(loss).dtype)),)
           if loss is not None else ()),
        warnings=tuple(dict.fromkeys(w for p in parts for w in p.warnings)), fd_mode=fd[0],
        fd_evaluations=fd[1], options=report_echo(stand, batch.settings, options, users))
    return ShardedReport("rows", report, tuple(_summary(s, p, stand) for s, p in zip(plan.shards, parts)))


def _loss_checks(plan: Any, parts: list[LinearPart], stand: LinearCE, batch: LinearBatch,
                 options: CheckOptions, loss_in: tuple[Any, str],
                 ref_loss: float) -> list[tuple[int, CheckResult]]:
    """Your reduced loss against the merged one (the shards' floors summed), or the shards'
    per-token loss checks merged at global tokens."""
    given = user_loss(stand, loss_in[0], loss_in[1], options)
    if given is not None:
        run = _FloorSum(np.array([math.fsum(p.loss_floor for p in parts)]))
        return [(2, loss_check(stand, run, given, ref_loss, options))]  # type: ignore[arg-type]
    per_token = [(s, p.loss_check) for s, p in zip(plan.shards, parts) if p.loss_check is not None]
    return [(2, _token_index(merge_checks(per_token, options.worst), batch))] if per_token else []


def _summary(shard: Shard, part: LinearPart, stand: LinearCE) -> ShardSummary:
    """The shard's line: its dL/dH verdict (failing rows counted) and its part of the loss."""
    bad = int(part.failing.shape[0])
    ok = bad == 0 and (part.hidden is None or part.hidden.ok)
    return ShardSummary(shard.index, shard.name, shard.offset, shard.size, ok,
                        "PASS" if ok else "FAIL", bad, stand.reduce(part.loss_total))


@dataclass
class _FloorSum:
    """The loss check's view of the merged pass: the rows' floors, summed over the shards."""

    loss_floor: np.ndarray
