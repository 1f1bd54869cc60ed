"""`linear --shards rows`: fused linear cross-entropy over row shards (one HIDDEN, LABELS and
--grad-hidden file per data-parallel rank) with ONE WEIGHT (and BIAS) and ONE --grad-weight and
--grad-bias for the whole batch, the sum over the shards an all-reduce produces.

- pass 1: each shard's denominator D_i ('mean': its weighted count of targets) -> D = fsum D_i.
- pass 2: each shard's streaming pass (`linear_pass`) on its rows with the scale 1/D and the
  seed of the whole batch, so every shard draws the SAME projection matrices R (dL/dW) and S
  (dL/dH) as `check_linear` on the concatenated batch. dL/dH is judged on the shard's own rows;
  the shard returns its partial sums of the weight side: G_i^T [1, H_i R, |h|_2] and
  P_i^T [1, |h|_2] (V x (k + 4) numbers), its loss sum and floor.
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
  pass makes over its row blocks and its bounds allow; then `_fd_checks` as in one process.
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
from typing import Any, cast

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.numerics import loss_sum
from ce_cli.models.linear import LinearCE
from ce_cli.verify.compare import Comparison
from ce_cli.verify.checks import shift_labels
from ce_cli.verify.linear import (BiasDirection, LinearSettings, Probes, Projection, UserArray,
                                  WeightFD, _bias_column, _cmp, _echo, _fd_checks, _join,
                                  _loss_check, _problem, _ranges, _transposed, _user_loss,
                                  choose_probes, exact_all, exact_hidden_rows, exact_weight_rows, linear_pass,
                                  projection_result, user_arrays)
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, InputInfo, Report
from ce_cli.verify.shards import (LOCAL_WARNINGS, UNSHARDED, LocalMapper, Mapper, Shard, ShardedReport, ShardFiles,
                                  ShardSummary, cut_part, describe, load, make_plan, merge_checks,
                                  shard_labels)
from ce_cli.verify.tolerance import Tolerance, resolve_tolerance


@dataclass(frozen=True)
class LinearBatch:
    """What every shard shares: the one WEIGHT, BIAS and class-weight files, the settings,
    and whether the weight side's projections are wanted (a --grad-weight was given)."""

    weight: str
    bias: str | None = None
    class_weight: str | None = None
    settings: LinearSettings = LinearSettings()
    weight_side: bool = False
    n_rows: int = 0                     # the batch's rows (the probes are drawn over them)
    fd_tols: tuple[Tolerance | None, Tolerance | None] = (None, None)  # your dL/dW's, dL/db's
    sample_weight: tuple[str, ...] = ()  # one file of the batch's tokens, or one per shard
    loss_files: tuple[str, ...] = ()    # per-token losses (reduction none), likewise
    batch_shape: tuple[int, ...] = ()   # the batch's tokens: (N,), or (B, T) of (B, T, H) shards


@dataclass(frozen=True)
class ShardFD:
    """One shard's finite differences: its own hidden probes whole (global rows) with your
    dL/dH's moves along them; the weight and bias probes' partial sums over its rows (fd, ref,
    bound, got_bound; the atol term is the client's, once); the bias direction's (fd, bound)."""

    hidden: Probes
    hidden_got: np.ndarray | None
    weight: Probes
    bias: Probes
    direction: tuple[float, float]


@dataclass(frozen=True)
class LinearPart:
    """One shard's pass 2: its dL/dH check (passing) or its failing rows (global row, worst
    ratio to the allowance: the batch's worst are opened in a second pass), loss sum and floor, the weight side's partial sums
    (wa: G^T [1, H R, |h|_2], wp: P^T [1, |h|_2]), R, and its lse and logit error per row
    (for the exact rows of a failing dL/dW)."""

    hidden: CheckResult | None
    failing: np.ndarray
    loss_total: float
    loss_floor: float
    n_rows: int
    n_ignored: int
    wa: np.ndarray
    wp: np.ndarray
    r: np.ndarray | None
    lse: np.ndarray
    herr: np.ndarray
    gh_tol: Any
    warnings: tuple[str, ...]
    inputs: tuple[InputInfo, ...]
    fd: ShardFD | None = None
    exact_w: tuple[np.ndarray, np.ndarray] | None = None  # `exact`: G_i^T H_i and its floor
    loss_check: CheckResult | None = None  # your per-token losses on the shard's tokens


def _sources(shard: Shard, batch: LinearBatch) -> dict[str, str]:
    return {"hidden": f"hidden file '{shard.files.logits}'",
            "labels": f"labels file '{shard.files.labels}'",
            "grad_hidden": f"grad_hidden file '{shard.files.grad}'",
            "weight": f"weight file '{batch.weight}'", "bias": f"bias file '{batch.bias}'",
            "class_weight": f"class_weight file '{batch.class_weight}'",
            "grad_weight": "grad_weight", "grad_bias": "grad_bias", "loss": "loss",
            "sample_weight": "sample_weight"}


def shard_problem(shard: Shard, batch: LinearBatch, options: CheckOptions,
                  denominator: float | None, rows: slice | None = None
                  ) -> tuple[LinearCE, list[str], dict[str, np.ndarray]]:
    """The shard's problem (its `rows`, all by default) scaled by the batch's 1/D for 'mean';
    (B, T, H) shards as their B*T token rows, the labels shifted within their sequences."""
    h = load(shard.files.logits, "hidden")
    src = _sources(shard, batch)
    h_rows, y = _token_rows(shard, h, options, src["labels"])
    sw = _sample_weight(shard, batch)
    if rows is not None:
        h_rows, y, sw = h_rows[rows], y[rows], sw[rows] if sw is not None else None
    arrays = {"hidden": h, "labels": y, "weight": load(batch.weight, "weight")}
    for role in ("bias", "class_weight"):
        if getattr(batch, role) is not None:
            arrays[role] = load(getattr(batch, role), role)
    vectors = {k: v.reshape(-1) if k in ("bias", "class_weight") else v for k, v in arrays.items()}
    problem, warnings, _ = _problem(h_rows, vectors["weight"], y, vectors.get("bias"),
                                    vectors.get("class_weight"), sw,
                                    replace(options, shift_labels=False), batch.settings, src)
    if denominator is not None and problem.reduction == "mean":
        problem = replace(problem, denominator=denominator,
                          sm=replace(problem.sm, denominator=denominator))
    return problem, warnings, arrays


def _token_rows(shard: Shard, h: np.ndarray, options: CheckOptions,
                source: str) -> tuple[np.ndarray, np.ndarray]:
    """The shard's hidden states and labels as token rows: (N, H) as they are, (B, T, H) as
    B*T rows with the labels (the shard's own (B, T), or its tokens of the batch's file)
    shifted within each sequence for `shift_labels`."""
    if h.ndim != 3:
        return h, shard_labels(shard)
    y = load(shard.files.labels, "labels")
    if shard.labels_range is not None:  # the plan counts tokens
        y = cut_part(np.asarray(y).reshape(-1), 0, *shard.labels_range, source)
    if y.size != h.shape[0] * h.shape[1]:
        raise CeCheckError(f"{source}: shape {y.shape} does not match the hidden states' "
                           f"tokens {h.shape[:2]}")
    y = np.asarray(y).reshape(h.shape[:2])
    if options.shift_labels:
        y = shift_labels(h, y, options.ignore_index, source)
    return h.reshape(-1, h.shape[-1]), y.reshape(-1)


def _sample_weight(shard: Shard, batch: LinearBatch) -> np.ndarray | None:
    """The shard's tokens' sample weights (None without)."""
    return _token_values(shard, batch.sample_weight, "sample_weight") if batch.sample_weight else None


def _token_values(shard: Shard, files: Sequence[str], role: str) -> np.ndarray:
    """One value a token of the shard: its own file, or its tokens of the batch's file."""
    if len(files) > 1:
        return np.asarray(load(files[shard.index], role)).reshape(-1)
    values = np.asarray(load(files[0], role)).reshape(-1)
    return cut_part(values, 0, shard.offset, shard.offset + shard.size, f"{role} file '{files[0]}'")


def _flat_grad(gh: np.ndarray) -> np.ndarray:
    """Your dL/dH of (B, T, H) shards as token rows."""
    return gh.reshape(-1, gh.shape[-1]) if gh.ndim == 3 else gh


def linear_denominator(shard: Shard, batch: LinearBatch, options: CheckOptions) -> float:
    """Pass 1: the shard's denominator of 'mean' (its targets' weighted count)."""
    problem, _, _ = shard_problem(shard, batch, options, None)
    return float(problem.denominator)


def linear_shard(shard: Shard, options: CheckOptions, batch: LinearBatch,
                 denominator: float | None) -> LinearPart:
    """Pass 2 on one shard (module docstring)."""
    with np.errstate(all="ignore"):
        problem, warnings, arrays = shard_problem(shard, batch, options, denominator)
        src = _sources(shard, batch)
        gh = load(shard.files.grad, "grad_hidden") if shard.files.grad is not None else None
        users = user_arrays(problem, {"grad_hidden": None if gh is None else _flat_grad(gh)}, src,
                            options, batch.settings.weight_layout)
        _placeholders(users, batch)
        run = linear_pass(problem, users, batch.settings, options,
                          choose=_batch_probes(shard, batch.n_rows or shard.size),
                          rows_total=batch.n_rows or None)
        N = problem.n_rows
        hidden, failing = _shard_hidden(run, problem, users, batch, options, shard)
        exact_w = (exact_weight_rows(problem, np.arange(problem.n_classes), run.lse, run.herr)
                   if batch.settings.exact and batch.weight_side else None)
    if gh is not None:
        arrays["grad_hidden"] = gh
    loss_check = _token_losses(shard, batch, problem, run, options, arrays)
    inputs = tuple(InputInfo(r, src.get(r, f"{r} file '{_name(batch.loss_files, shard)}'"),
                             tuple(a.shape), str(a.dtype)) for r, a in arrays.items()
                   if r in ("hidden", "labels", "grad_hidden", "loss"))
    return LinearPart(hidden, failing, loss_sum(run.loss), math.fsum(run.loss_floor.tolist()), N,
                      int(N - np.count_nonzero(problem.valid)), run.wa, run.wp,
                      run.pw.r if run.pw is not None else None, run.lse, run.herr,
                      users["grad_hidden"].tol if "grad_hidden" in users else None,
                      tuple(w for w in warnings if denominator == 0 or not w.startswith(LOCAL_WARNINGS)),
                      inputs, _shard_fd(run, users, shard), exact_w, loss_check)


def _token_losses(shard: Shard, batch: LinearBatch, problem: LinearCE, run: Any,
                  options: CheckOptions, arrays: dict[str, np.ndarray]) -> CheckResult | None:
    """Your per-token losses (reduction none) on the shard's tokens, compared as
    `check_linear` compares them (local token rows)."""
    if not batch.loss_files:
        return None
    got = _token_values(shard, batch.loss_files, "loss")
    arrays["loss"] = got
    user = _user_loss(problem, got, f"loss file '{_name(batch.loss_files, shard)}'", options)
    assert user is not None
    return _loss_check(problem, run, user, 0.0, options)


def _name(files: Sequence[str], shard: Shard) -> str:
    return files[shard.index] if len(files) > 1 else files[0] if files else ""


def _shard_hidden(run: Any, problem: LinearCE, users: dict[str, UserArray], batch: LinearBatch,
                  options: CheckOptions, shard: Shard) -> tuple[CheckResult | None, np.ndarray]:
    """The shard's dL/dH: every entry (`exact`), a passing projection verdict, or its failing
    rows (global row, worst ratio to the allowance) for the batch's second pass."""
    V, H = problem.n_classes, problem.hidden_size
    if batch.settings.exact and "grad_hidden" in users:
        gh = {"grad_hidden": users["grad_hidden"]}
        return exact_all(problem, gh, run.lse, run.herr, options.worst)[0], np.zeros((0, 2))
    if run.ph is None:
        return None, np.zeros((0, 2))
    dev, allowed, rows = run.ph.verdict(math.sqrt(V) + math.sqrt(H))
    if rows.size == 0:  # the passing verdict needs no exact row
        return projection_result(
            run.ph, lambda r: exact_hidden_rows(problem, r, run.lse, run.herr),
            batch.settings, options.worst, math.sqrt(V) + math.sqrt(H), "token"), np.zeros((0, 2))
    ratio = np.where(allowed > 0, dev / np.where(allowed > 0, allowed, 1.0), np.inf)
    return None, np.stack([rows + shard.offset, np.nan_to_num(ratio[rows].max(axis=1), nan=np.inf)],
                          axis=1)


def _placeholders(users: dict[str, UserArray], batch: LinearBatch) -> None:
    """Your dL/dW and dL/db are the client's: the shard pass gets their tolerances only (R's
    partial sums, the probes' got_bound partials without the atol term, added once)."""
    f64 = resolve_tolerance(np.dtype(np.float64))
    gw, gb = (replace(t, atol=0.0, tiny=0.0) if t is not None else None for t in batch.fd_tols)
    if batch.weight_side:
        users["grad_weight"] = UserArray(None, gw or f64, lambda v, j: (v, j))
    if gb is not None:
        users["grad_bias"] = UserArray(None, gb, lambda v, j: (j,))


class _BatchRows:
    """The batch's hidden states as `choose_probes` sees them from one shard: the shard's rows
    at their global indices, zeros elsewhere (the shard keeps only its own rows' probes)."""

    def __init__(self, rows: np.ndarray, offset: int, n: int) -> None:
        self.rows, self.offset, self.shape = rows, offset, (n, rows.shape[1])

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = np.asarray(idx)
        out = np.zeros((idx.size, self.shape[1]))
        mine = (idx >= self.offset) & (idx < self.offset + self.rows.shape[0])
        out[mine] = self.rows[idx[mine] - self.offset]
        return out


def _select(p: Probes, keep: np.ndarray, shift: int) -> Probes:
    """Probes `keep`, their owners moved by `shift` (local <-> global rows)."""
    return Probes(p.owner[keep] + shift, p.entry[keep], p.step[keep], p.direction, p.fd[keep],
                  p.ref[keep], p.bound[keep], p.got_bound[keep])


def _batch_probes(shard: Shard, n_batch: int) -> Any:
    """`choose_probes` over the batch's rows, with its draws (so the same R, S, weight and bias
    probes as `check_linear` on the batch): the hidden probes of this shard's rows, local."""
    def choose(problem: LinearCE, opts: CheckOptions, rng: np.random.Generator
               ) -> tuple[str, Probes, Probes, Probes]:
        rows = _BatchRows(problem.hidden, shard.offset, n_batch)
        mode, hp, wp, bp = choose_probes(replace(problem, hidden=cast(np.ndarray, rows)), opts, rng)
        mine = (hp.owner >= shard.offset) & (hp.owner < shard.offset + shard.size)
        return mode, _select(hp, mine, -shard.offset), wp, bp
    return choose


def _shard_fd(run: Any, users: dict[str, UserArray], shard: Shard) -> ShardFD:
    hp = run.hfd.p
    got = hp.user_moves(users["grad_hidden"].rows) if "grad_hidden" in users else None
    return ShardFD(_select(hp, np.ones(hp.owner.size, dtype=bool), shard.offset), got,
                   run.wfd.p, run.bfd.p, (run.bdir.fd, run.bdir.bound))


def linear_hidden_rows(item: tuple[Shard, np.ndarray, np.ndarray], options: CheckOptions,
                       batch: LinearBatch, denominator: float | None, rows: np.ndarray
                       ) -> CheckResult | None:
    """The second mapped pass of a failing dL/dH: the shard's rows among the batch's worst
    `rows` (global) computed exactly and compared entry by entry (local indices)."""
    shard, lse, herr = item
    mine = rows[(rows >= shard.offset) & (rows < shard.offset + shard.size)] - shard.offset
    if mine.size == 0 or shard.files.grad is None:
        return None
    problem, _, _ = shard_problem(shard, batch, options, denominator)
    gh = _flat_grad(load(shard.files.grad, "grad_hidden"))
    user = user_arrays(problem, {"grad_hidden": gh}, _sources(shard, batch), options,
                       batch.settings.weight_layout)["grad_hidden"]
    with np.errstate(all="ignore"):
        ref, floor = exact_hidden_rows(problem, mine, lse, herr)
        cmp = Comparison("grad_hidden_vs_reference", user.tol, lambda i, j: (int(mine[i]), j),
                         n_worst=options.worst)
        cmp.update(0, ref, np.asarray(user.rows[mine]), floor * user.tol.floor_coef)
    return cmp.result()


def linear_exact_rows(item: tuple[Shard, np.ndarray, np.ndarray], options: CheckOptions,
                      batch: LinearBatch, denominator: float | None, cols: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The second mapped pass: the shard's part of dL/dW rows `cols` and their floors."""
    shard, lse, herr = item
    problem, _, _ = shard_problem(shard, batch, options, denominator)
    with np.errstate(all="ignore"):
        return exact_weight_rows(problem, cols, lse, herr)


# ---------------------------------------------------------------- the run

def check_linear_options(options: CheckOptions, batch: LinearBatch) -> None:
    """What linear shards do not carry: refused, one line each, never ignored. The row-local
    training-code options are carried (each shard's problem is built with them; `shift_labels`
    on (B, T, H) shards, `sequences`)."""
    if options.class_axis not in (-1, 1):
        raise CeCheckError("`class_axis`: shards need the classes on the last axis")
    plain = CheckOptions()
    for name in UNSHARDED:
        if getattr(options, name) != getattr(plain, name):
            raise CeCheckError(f"`{name}`: not supported with linear `shards`")


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
    batch = replace(batch, weight_side=grad_weight is not None)
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
        if len(given) not in (0, 1, len(plan.shards)):
            raise CeCheckError(f"`{role}`: {len(given)} files for {len(plan.shards)} hidden shards "
                               "(give one per shard, or one file for the whole batch)")
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
        cmp = _cmp("grad_bias_vs_reference", gb, options.worst)
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
        bprobe = _join(direction.probes(db, db_floor, users.get("grad_bias")), bprobe)
    moves = ({"hidden": np.concatenate([fd.hidden_got for fd in fds if fd.hidden_got is not None])}
             if "grad_hidden" in users else None)
    checks = _fd_checks(stand, users, (hidden, wprobe, bprobe), worst, direction.u, moves)
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
    WeightFD(stand, bprobe, _bias_column(users.get("grad_bias"))).finish()


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
            f"; {rows.size} of {plan.shape[0]} token rows fail: {_ranges(rows)}; exact entries "
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
    return _transposed(res, stand) if user.transposed else res


def _exact_weight_check(parts: list[LinearPart], stand: LinearCE, user: UserArray,
                        worst: int) -> CheckResult:
    """`exact`: every entry of your dL/dW against the sum of the shards' G_i^T H_i (in shard
    order, plain adds: within (shards - 1) eps of the sum of their absolute values), its floor
    the sum of theirs."""
    ref = np.sum(np.stack([p.exact_w[0] for p in parts if p.exact_w is not None]), axis=0)
    floor = np.sum(np.stack([p.exact_w[1] for p in parts if p.exact_w is not None]), axis=0)
    cmp = _cmp("grad_weight_vs_reference", user, worst, "exact: every entry")
    cmp.update(0, ref, user.rows, floor * user.tol.floor_coef)
    res = cmp.result()
    return _transposed(res, stand) if user.transposed else res


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
        fd_evaluations=fd[1], options=_echo(stand, batch.settings, options, users))
    return ShardedReport("rows", report, tuple(_summary(s, p, stand) for s, p in zip(plan.shards, parts)))


def _loss_checks(plan: Any, parts: list[LinearPart], stand: LinearCE, batch: LinearBatch,
                 options: CheckOptions, loss_in: tuple[Any, str],
                 ref_loss: float) -> list[tuple[int, CheckResult]]:
    """Your reduced loss against the merged one (the shards' floors summed), or the shards'
    per-token loss checks merged at global tokens."""
    user_loss = _user_loss(stand, loss_in[0], loss_in[1], options)
    if user_loss is not None:
        run = _FloorSum(np.array([math.fsum(p.loss_floor for p in parts)]))
        return [(2, _loss_check(stand, run, user_loss, ref_loss, options))]  # type: ignore[arg-type]
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
