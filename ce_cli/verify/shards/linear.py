"""`linear --shards rows`, the shard's side: fused linear cross-entropy over row shards (one
HIDDEN, LABELS and --grad-hidden file per data-parallel rank) with ONE WEIGHT (and BIAS) for
the whole batch; the tasks each shard runs (the client's side: `linear_run.py`).

- pass 1: each shard's denominator D_i ('mean': its weighted count of targets) -> D = fsum D_i.
- pass 2: each shard's streaming pass (`linear_pass`) on its rows with the scale 1/D and the
  seed of the whole batch, so every shard draws the SAME projection matrices R (dL/dW) and S
  (dL/dH) as `check_linear` on the concatenated batch. dL/dH is judged on the shard's own rows;
  the shard returns its partial sums of the weight side: G_i^T [1, H_i R, |h|_2] and
  P_i^T [1, |h|_2] (V x (k + 4) numbers), its loss sum and floor.
- finite differences: each shard makes `check_linear`'s draws over the batch's N rows
  (`_batch_probes`), so the probes, R and S are the batch's. A hidden probe is evaluated on its
  row's shard and returned at its global row with your dL/dH along it (`ShardFD`); a weight or
  bias probe and the bias direction return the shard's partial sums.
- `exact`: each shard compares its dL/dH entry by entry and returns its G_i^T H_i and floor
  (V x H each).
- the second mapped pass of a failing check: the batch's worst dL/dH rows and dL/dW rows
  computed exactly on their shards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.numerics import loss_sum
from ce_cli.models.linear import LinearCE
from ce_cli.verify.checks import shift_labels
from ce_cli.verify.compare import Comparison
from ce_cli.verify.linear.arrays import LinearSettings, UserArray, user_arrays
from ce_cli.verify.linear.check import linear_problem, loss_check, user_loss
from ce_cli.verify.linear.exact import (exact_all, exact_hidden_rows, exact_weight_rows,
                                        projection_result)
from ce_cli.verify.linear.probes import Probes, choose_probes
from ce_cli.verify.linear.stream import linear_pass
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, InputInfo
from ce_cli.verify.shards.files import load
from ce_cli.verify.shards.inputs import cut_part, file_name, shard_labels
from ce_cli.verify.shards.plan import Shard
from ce_cli.verify.shards.rows import LOCAL_WARNINGS
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
    problem, warnings, _ = linear_problem(h_rows, vectors["weight"], y, vectors.get("bias"),
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
    token_check = _token_losses(shard, batch, problem, run, options, arrays)
    inputs = tuple(InputInfo(r, src.get(r, f"{r} file '{file_name(batch.loss_files, shard)}'"),
                             tuple(a.shape), str(a.dtype)) for r, a in arrays.items()
                   if r in ("hidden", "labels", "grad_hidden", "loss"))
    return LinearPart(hidden, failing, loss_sum(run.loss), math.fsum(run.loss_floor.tolist()), N,
                      int(N - np.count_nonzero(problem.valid)), run.wa, run.wp,
                      run.pw.r if run.pw is not None else None, run.lse, run.herr,
                      users["grad_hidden"].tol if "grad_hidden" in users else None,
                      tuple(w for w in warnings if denominator == 0 or not w.startswith(LOCAL_WARNINGS)),
                      inputs, _shard_fd(run, users, shard), exact_w, token_check)


def _token_losses(shard: Shard, batch: LinearBatch, problem: LinearCE, run: Any,
                  options: CheckOptions, arrays: dict[str, np.ndarray]) -> CheckResult | None:
    """Your per-token losses (reduction none) on the shard's tokens, compared as
    `check_linear` compares them (local token rows)."""
    if not batch.loss_files:
        return None
    got = _token_values(shard, batch.loss_files, "loss")
    arrays["loss"] = got
    user = user_loss(problem, got, f"loss file '{file_name(batch.loss_files, shard)}'", options)
    assert user is not None
    return loss_check(problem, run, user, 0.0, options)


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
