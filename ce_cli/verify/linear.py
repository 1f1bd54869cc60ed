"""`check_linear`: fused linear cross-entropy (logits = H W^T + b never materialised whole).

One streaming pass over row blocks (models/linear.py) gives the loss, dL/db, the finite
differences and, unless `exact`, randomised projections of your dL/dW and dL/dH (Freivalds):
with Gaussian R (H x k) and S (H x k),

    GW R  vs  G^T (H R)        GH S  vs  G (W S)

row by row. A row passes a projection when |yours.r - ref.r| <= c * T + rounding, where T bounds
the row's tolerance vector |t|_2 (t_j = rtol |ref_j| + atol + tiny + k eps floor_j, each term
bounded by a sum over the row's products); a correct row (|e_j| <= t_j) fails with probability
<= 2 exp(-c^2 / 2), and a row whose error e has |e|_2 >= L * c * T passes one projection with
probability <= sqrt(2/pi) / L (e.r ~ N(0, |e|^2)), all k with that to the k-th. Failing rows are
then computed exactly and compared entry by entry, to list the worst entries with their index.
`exact` instead computes every entry: dL/dH row block by row block inside the pass, dL/dW in a
second pass (vocabulary blocks outer, the row blocks' logits recomputed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX, loss_sum
from ce_cli.models.linear import LinearCE, RowBlock, build_linear_ce
from ce_cli.models.semantics import Semantics
from ce_cli.verify.checks import shift_labels
from ce_cli.verify.compare import Comparison
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, Entry, InputInfo, Report
from ce_cli.verify.tolerance import Tolerance, resolve_tolerance

CONFIDENCE = 8.0       # c: a correct row fails a projection with probability <= 2 exp(-32)
FD_SAFETY = 2.0
EXACT_BLOCK_BYTES = 32 << 20   # --exact's dL/dW: each float64 block (vocabulary, rows or both)
FD_AUTO_DIRECTIONAL = 1 << 28  # N * V * H up to which `auto` probes every row
GAUSS_DENSITY = math.sqrt(2.0 / math.pi)
ACCUMULATE_EPS = float(np.finfo(np.float32).eps)  # kernels accumulate in float32 at least


@dataclass(frozen=True)
class LinearSettings:
    """Settings only `linear` has: `exact` computes every gradient entry; `projections` (k) is
    the number of random projections per row; `weight_layout` VH (nn.Linear's (V, H)) or HV;
    `max_open_rows`: failing rows computed exactly to list the worst entries."""

    exact: bool = False
    projections: int = 8
    weight_layout: str = "VH"
    max_open_rows: int = 16

    def __post_init__(self) -> None:
        if self.projections < 1:
            raise CeCheckError(f"`projections`: must be at least 1, got {self.projections}")
        if self.weight_layout not in ("VH", "HV"):
            raise CeCheckError(f"`weight_layout`: unknown value '{self.weight_layout}' (use VH or HV)")

    def false_pass(self, ratio: float = 10.0) -> float:
        """Probability that a row whose error norm is `ratio` times its threshold passes."""
        return min(1.0, GAUSS_DENSITY / ratio) ** self.projections


LINEAR_FIELDS = frozenset(f.name for f in fields(LinearSettings))


@dataclass
class UserArray:
    """One of your gradients as rows, the tolerance it is held to, and how to name an entry."""

    rows: Any
    tol: Tolerance
    index_of: Callable[[int, int], tuple[int, ...]]
    transposed: bool = False


def _tolerance(dtype: np.dtype, opts: CheckOptions, problem: LinearCE, n_terms: int) -> Tolerance:
    """`grad`'s tolerance of your gradient, its default floor widened by the accumulation of
    the n_terms products each entry sums (rows for dL/dW and dL/db, the vocabulary for dL/dH):
    4 log2(n) units of the accumulating precision (float32 for float32 and narrower outputs),
    as a blocked or pairwise GEMM of a correct kernel rounds that much of sum |G| |x|."""
    tol = opts.tolerance(dtype)
    cw = float(np.abs(problem.class_weight).max()) if problem.class_weight is not None else 1.0
    tol = replace(tol, tiny=tol.tiny * max(1.0, tol.floor_factor / 2.0 * (1.0 + cw * problem.grad_scale)))
    if opts.floor_factor is not None or tol.eps <= 0:
        return tol
    acc = max(EPS, min(tol.eps, ACCUMULATE_EPS))
    widen = math.ceil(4.0 * acc / tol.eps * math.log2(max(2, n_terms)) - 1e-9)
    return replace(tol, floor_factor=tol.floor_factor + widen)


def _float_array(arr: Any, source: str) -> np.ndarray:
    a = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise CeCheckError(f"{source}: dtype {a.dtype} is not floating point")
    return a


def user_arrays(problem: LinearCE, grads: dict[str, Any], src: dict[str, str], opts: CheckOptions,
                layout: str) -> dict[str, UserArray]:
    """Your gradients, shape-checked against the problem (a transposed dL/dW is kept, flagged)."""
    out: dict[str, UserArray] = {}
    N, V, H = problem.n_rows, problem.n_classes, problem.hidden_size
    if grads.get("grad_hidden") is not None:
        gh = _float_array(grads["grad_hidden"], src["grad_hidden"])
        want = problem.batch_shape + (H,)
        if gh.shape != want:
            raise CeCheckError(f"{src['grad_hidden']}: shape {gh.shape} does not match the hidden "
                               f"states {want}")
        out["grad_hidden"] = UserArray(gh.reshape(N, H), _tolerance(gh.dtype, opts, problem, V),
                                       lambda r, c: problem.batch_index(r) + (c,))
    if grads.get("grad_weight") is not None:
        out["grad_weight"] = _user_weight(problem, grads["grad_weight"], src["grad_weight"], opts, layout)
    if grads.get("grad_bias") is not None:
        gb = _float_array(grads["grad_bias"], src["grad_bias"])
        if problem.bias is None:
            raise CeCheckError(f"{src['grad_bias']}: a bias gradient needs the bias (`bias`)")
        if gb.shape != (V,):
            raise CeCheckError(f"{src['grad_bias']}: shape {gb.shape}; expected ({V},)")
        out["grad_bias"] = UserArray(gb.reshape(1, V), _tolerance(gb.dtype, opts, problem, N),
                                     lambda r, c: (c,))
    return out


def _user_weight(problem: LinearCE, arr: Any, source: str, opts: CheckOptions, layout: str) -> UserArray:
    gw = _float_array(arr, source)
    V, H = problem.n_classes, problem.hidden_size
    want = (V, H) if layout == "VH" else (H, V)
    tol = _tolerance(gw.dtype, opts, problem, problem.n_rows)
    if gw.shape == want:
        rows = gw if layout == "VH" else gw.T
        transposed = False
    elif gw.shape == want[::-1]:
        rows = gw.T if layout == "VH" else gw
        transposed = True
    else:
        raise CeCheckError(f"{source}: shape {gw.shape} does not match the weight; expected {want}")

    def index_of(v: int, j: int) -> tuple[int, ...]:
        vh = (v, j) if layout == "VH" else (j, v)
        return vh[::-1] if transposed else vh

    return UserArray(rows, tol, index_of, transposed)


# --- projections (Freivalds) -----------------------------------------------------------------

class Projection:
    """Per-row projections of one gradient (rows of dL/dW: V, or of dL/dH: N) against R (H, k)."""

    def __init__(self, name: str, user: UserArray, n_rows: int, k: int, rng: np.random.Generator,
                 H: int) -> None:
        self.name, self.user, self.H = name, user, H
        self.r = rng.standard_normal((H, k))
        self.ref = np.zeros((n_rows, k))
        self.r_norm = np.sqrt(np.einsum("ij,ij->j", self.r, self.r))
        self.rel = np.zeros(n_rows)            # sum |G| |x_row|_2: bounds |ref row|_2 and,
        #                                        times |r|_2, sum |G| |x| |r| (its rounding)
        self.floor = np.zeros(n_rows)          # sum phi |x_row|_2: bounds |floor row|_2
        self.got = np.zeros((n_rows, k))
        self.got_abs = np.zeros((n_rows, k))

    def project_user(self, step: int = 1024) -> None:
        rows = self.user.rows
        for a in range(0, rows.shape[0], step):
            g = np.asarray(rows[a:a + step], dtype=np.float64)
            self.got[a:a + step] = g @ self.r
            # sum_j |g_j r_j| <= |g|_2 |r|_2 (Cauchy-Schwarz): no |g| |r| product
            self.got_abs[a:a + step] = np.sqrt(np.einsum("ij,ij->i", g, g))[:, None] * self.r_norm

    def verdict(self, sums: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(deviation, allowed) per row and projection, and the failing rows (worst first)."""
        tol = self.user.tol
        T = tol.rtol * self.rel + tol.floor_coef * self.floor + (tol.atol + tol.tiny) * math.sqrt(self.H)
        ref_abs = self.rel[:, None] * self.r_norm
        rounding = 4.0 * EPS * (sums * ref_abs + math.sqrt(self.H) * self.got_abs)
        allowed = CONFIDENCE * T[:, None] + rounding
        with np.errstate(invalid="ignore"):
            dev = np.abs(self.got - self.ref)
            ratio = np.where(np.isfinite(dev), dev / np.where(allowed > 0, allowed, np.inf), np.inf)
        ratio = np.where(np.isnan(ratio) | ((dev > 0) & (allowed == 0)), np.inf, ratio)
        worst = ratio.max(axis=1)
        failing = np.flatnonzero(~(worst <= 1.0))
        return dev, allowed, failing[np.argsort(-worst[failing], kind="stable")]


def _ranges(rows: np.ndarray, limit: int = 6) -> str:
    """1, 2, 3, 7 -> '1-3, 7'."""
    if rows.size == 0:
        return ""
    s = np.sort(rows)
    breaks = np.flatnonzero(np.diff(s) != 1)
    starts, ends = np.r_[s[0], s[breaks + 1]], np.r_[s[breaks], s[-1]]
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts.tolist(), ends.tolist())]
    more = f", ... ({len(parts) - limit} more ranges)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


# --- finite differences ----------------------------------------------------------------------

@dataclass
class Probes:
    """Finite-difference probes of one side (rows of width `width`): row `owner[i]` moves by
    u_i = step[i] * d, d the side's one random +-1 direction (shared, so that W u or H u is one
    matrix-vector product for every probe), or for an entry probe (`entry[i]` = j >= 0) by
    u_i = step[i] * e_j."""

    owner: np.ndarray
    entry: np.ndarray
    step: np.ndarray
    direction: np.ndarray
    fd: np.ndarray
    ref: np.ndarray
    bound: np.ndarray
    got_bound: np.ndarray

    @classmethod
    def make(cls, owners: np.ndarray, entries: np.ndarray, x_rows: Callable[[np.ndarray], np.ndarray],
             rng: np.random.Generator, width: int) -> Probes:
        order = np.lexsort((entries, owners))
        owners, entries = owners[order], entries[order]
        direction = np.where(rng.random(width) < 0.5, -1.0, 1.0)
        x = np.abs(x_rows(owners)) if owners.size else np.zeros((0, width))
        at = x[np.arange(owners.size), np.maximum(entries, 0)] if width else np.zeros(owners.size)
        mag = np.where(entries >= 0, at, x.max(axis=1, initial=0.0))
        step = np.cbrt(EPS) * np.maximum(1.0, mag)
        z = np.zeros(owners.size)
        return cls(owners, entries, step, direction, z.copy(), z.copy(), z.copy(), z.copy())

    def moves(self, m: np.ndarray, absolute: bool = False) -> np.ndarray:
        """(rows of m, probes): m u_i, or |m| |u_i| with `absolute`."""
        m = np.abs(m) if absolute else m
        md = m.sum(axis=1) if absolute else m @ self.direction
        out = m[:, np.maximum(self.entry, 0)] if m.shape[1] else np.zeros((m.shape[0], self.entry.size))
        out[:, self.entry < 0] = md[:, None]
        out *= self.step
        return out

    def u_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """|u_i|_1 and |u_i|_2."""
        width = self.direction.size
        one = self.entry >= 0
        return (self.step * np.where(one, 1.0, width),
                self.step * np.where(one, 1.0, math.sqrt(width)))

    def user_moves(self, rows: Any) -> np.ndarray:
        """Your gradient rows `owner` along 2 u_i."""
        g = np.asarray(rows[self.owner], dtype=np.float64) if self.owner.size else np.zeros((0, 1))
        along = g @ self.direction if g.shape[1] == self.direction.size else np.zeros(g.shape[0])
        ent = g[np.arange(g.shape[0]), np.maximum(self.entry, 0)] if g.size else along
        return 2.0 * self.step * np.where(self.entry >= 0, ent, along)

    def index(self, i: int, row_index: Callable[[int], tuple[int, ...]],
              entry_index: Callable[[int, int], tuple[int, ...]]) -> tuple[int, ...]:
        r, e = int(self.owner[i]), int(self.entry[i])
        return row_index(r) if e < 0 else entry_index(r, e)


def _no_probes(width: int, rng: np.random.Generator) -> Probes:
    empty = np.zeros(0, dtype=np.int64)
    return Probes.make(empty, empty, lambda o: np.zeros((0, width)), rng, width)


def choose_probes(problem: LinearCE, opts: CheckOptions, rng: np.random.Generator
                  ) -> tuple[str, Probes, Probes, Probes]:
    """The mode and the hidden-, weight- and bias-side probes (bias: entries only; its one
    direction over the whole vocabulary is `BiasDirection`)."""
    mode = opts.fd.value
    N, V, H = problem.n_rows, problem.n_classes, problem.hidden_size
    if mode == "full":
        raise CeCheckError("`fd=full`: not available for linear (use directional, sample or off)")
    if mode == "auto":
        mode = "directional" if N * V * H <= FD_AUTO_DIRECTIONAL else "sample"
    if mode == "off":
        return mode, _no_probes(H, rng), _no_probes(H, rng), _no_probes(1, rng)
    k = max(1, opts.samples // 8)

    def side(n: int, x_rows, width: int, along: bool = True) -> Probes:
        rows = (np.arange(n) if mode == "directional" else
                np.sort(rng.choice(n, min(n, k), replace=False))) if along else np.zeros(0, np.int64)
        ent_rows = rng.integers(0, n, size=k)
        owners = np.r_[rows, ent_rows]
        entries = np.r_[np.full(rows.size, -1), rng.integers(0, width, size=k)]
        return Probes.make(owners, entries, x_rows, rng, width)

    bias = problem.bias
    return (mode, side(N, lambda o: problem.hidden_rows(o), H),
            side(V, lambda o: np.asarray(problem.weight[o], dtype=np.float64), H),
            side(V, lambda o: bias[o][:, None], 1, along=False) if bias is not None
            else _no_probes(1, rng))


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


class HiddenFD:
    """Probes of dL/dH: loss_n(h_n + u) - loss_n(h_n - u) from the logits row z_n moved by
    W u (W d and the columns W e_j come from the weight sweep)."""

    def __init__(self, problem: LinearCE, probes: Probes, user: UserArray | None) -> None:
        self.problem, self.p, self.user = problem, probes, user
        V = problem.n_classes
        self.cols, self.pos = np.unique(np.maximum(probes.entry, 0), return_inverse=True)
        self.wd = np.zeros(V)
        self.wcols = np.zeros((V, self.cols.size))

    def on_weight(self, v0: int, v1: int, w: np.ndarray) -> None:
        if self.p.owner.size:
            self.wd[v0:v1] = w @ self.p.direction
            self.wcols[v0:v1] = w[:, self.cols]

    def dz(self, i: int) -> np.ndarray:
        p = self.p
        return p.step[i] * (self.wd if p.entry[i] < 0 else self.wcols[:, self.pos[i]])

    def finish(self, blk: RowBlock, herr: np.ndarray) -> None:
        problem, p = self.problem, self.p
        V = problem.n_classes
        lo, hi = np.searchsorted(p.owner, [blk.start, blk.stop])
        assert problem.w_norms is not None
        abs_sum, norm2 = p.u_sums()
        for i in range(int(lo), int(hi)):
            r = int(p.owner[i]) - blk.start
            dz = self.dz(i)
            p.fd[i], g, phi, bound = problem.row_probe(blk.z[r:r + 1], np.array([p.owner[i]]), dz,
                                                       blk.lse[r:r + 1], herr[r:r + 1])
            p.ref[i] = float(g @ (2.0 * dz))
            wu = 2.0 * norm2[i] * problem.w_norms   # |W_v . 2u| <= |W_v|_2 |2u|_2
            gw = float(np.abs(g) @ wu)
            p.bound[i] = bound + 4.0 * EPS * (1.0 + math.log2(V)) * float(np.abs(g) @ np.abs(2.0 * dz))
            if self.user is not None:
                tol = self.user.tol
                p.got_bound[i] = (tol.floor_coef * float(phi @ wu) + tol.rtol * gw
                                  + (tol.atol + tol.tiny) * 2.0 * abs_sum[i]
                                  + 4.0 * EPS * math.sqrt(problem.hidden_size) * gw)


class WeightFD:
    """Probes of dL/dW (or dL/db, with x = 1): moving W_v by u moves column v of the logits by
    d_n = x_n . u, and lse_n by log1p(a_nv expm1(d_n)) exactly; summed over the row blocks."""

    def __init__(self, problem: LinearCE, probes: Probes, user: UserArray | None,
                 x_of: Callable[[RowBlock], np.ndarray] = lambda blk: blk.h,
                 rows_total: int | None = None) -> None:
        self.problem, self.p, self.user, self.x_of = problem, probes, user, x_of
        # the rows the probes' sums run over (a row shard's: the batch's, for the same bound)
        self.rows_total = rows_total if rows_total is not None else problem.n_rows

    def update(self, blk: RowBlock, herr: np.ndarray) -> None:
        if self.p.owner.size == 0:
            return
        problem, p = self.problem, self.p
        x = self.x_of(blk)
        d, dabs = p.moves(x), p.moves(x, absolute=True)   # (R, K)
        diff, err, g, phi = problem.column_probe(blk, p.owner, d, herr)
        p.fd += diff.sum(axis=0)
        p.ref += (g * 2.0 * d).sum(axis=0)
        p.bound += err.sum(axis=0) + 4.0 * EPS * (1.0 + math.log2(self.rows_total)) * (
            np.abs(g) * 2.0 * np.abs(d)).sum(axis=0)
        if self.user is not None:
            tol = self.user.tol
            gd = (np.abs(g) * 2.0 * dabs).sum(axis=0)
            p.got_bound += (tol.floor_coef * (phi * 2.0 * dabs).sum(axis=0) + tol.rtol * gd
                            + 4.0 * EPS * math.sqrt(self.p.direction.size) * gd)

    def finish(self) -> None:
        if self.user is not None and self.p.owner.size:
            tol = self.user.tol
            self.p.got_bound += (tol.atol + tol.tiny) * 2.0 * self.p.u_sums()[0]


class BiasDirection:
    """One probe of dL/db along b + u, u = c d over the whole vocabulary (d random +-1): every
    logit moves, and lse_n by log1p(a_n . expm1(u)) exactly (one matrix-vector product with the
    softmax rows the pass forms anyway); the loss change summed over the rows."""

    def __init__(self, problem: LinearCE, rng: np.random.Generator, on: bool) -> None:
        self.on = on and problem.bias is not None
        V = problem.n_classes
        b = problem.bias if problem.bias is not None else np.zeros(V)
        self.u = np.cbrt(EPS) * max(1.0, float(np.abs(b).max(initial=0.0))) * np.where(
            rng.random(V) < 0.5, -1.0, 1.0)
        self.fd = self.bound = 0.0

    def columns(self) -> np.ndarray:
        """The vocabulary vectors the softmax rows meet: expm1(u), expm1(-u), expm1(|u|)."""
        return np.stack([np.expm1(self.u), np.expm1(-self.u), np.expm1(np.abs(self.u))], axis=1)

    def update(self, problem: LinearCE, rows: np.ndarray, au: np.ndarray) -> None:
        """`au` (R, 3): a_n . columns()."""
        alpha, beta, ys = problem.targets(rows)
        Q = problem.total_weight(alpha, beta)
        cw = problem.class_weight if problem.class_weight is not None else np.ones(problem.n_classes)
        qu = alpha * self.u[ys] + beta * float(cw @ self.u)
        lp, lm = np.log1p(au[:, 0]), np.log1p(au[:, 1])
        scale, V = problem.grad_scale, problem.n_classes
        self.fd += scale * float((Q * (lp - lm) - 2.0 * qu).sum())
        reach = 2.0 * float(np.abs(self.u).max(initial=0.0))
        err = np.abs(Q) * (16.0 * EPS * (np.abs(lp) + np.abs(lm) + (1.0 + math.log2(V)) * au[:, 2])
                           + THIRD_MOMENT_MAX * reach**3 / 3.0) + 8.0 * EPS * np.abs(qu)
        self.bound += scale * float(err.sum())

    def update_rows(self, problem: LinearCE, blk: RowBlock) -> None:
        """Extended semantics: both moved blocks evaluated by the softmax model, with its bound
        (in the model's sub-blocks)."""
        sm, step = problem.sm, problem.semantic_step()
        for i in range(0, blk.z.shape[0], step):
            z, rows = blk.z[i:i + step], blk.rows[i:i + step]
            ep = sm.evaluate_rows(z + self.u, rows, grad=False)
            em = sm.evaluate_rows(z - self.u, rows, grad=False)
            self.fd += problem.grad_scale * float((ep.loss - em.loss).sum())
            delta = np.broadcast_to(2.0 * self.u, z.shape)
            self.bound += float(sm.directional_error_bound(ep, em, delta).sum())

    def probes(self, db: np.ndarray, db_floor: np.ndarray, user: UserArray | None) -> Probes:
        """The direction as one probe (owner -1): finite difference, reference db . 2u, bounds."""
        V = db.size
        delta = 2.0 * np.abs(self.u)
        bound = self.bound + 4.0 * EPS * (1.0 + math.log2(V)) * float(np.abs(db) @ delta) \
            + 8.0 * EPS * float(db_floor @ delta)
        got = 0.0
        if user is not None:
            tol = user.tol
            gd = float(np.abs(db) @ delta)
            got = (tol.floor_coef * float(db_floor @ delta) + tol.rtol * gd
                   + (tol.atol + tol.tiny) * float(delta.sum()) + 4.0 * EPS * math.sqrt(V) * gd)
        one = np.ones(1)
        return Probes(np.array([-1]), np.array([-1]), one, one, np.array([self.fd]),
                      np.array([float(db @ (2.0 * self.u))]), np.array([bound]), np.array([got]))


# --- the streaming pass ------------------------------------------------------------------------

class Pass:
    """What one pass over the row blocks accumulates. In each cache-sized column chunk of a row
    block: a = exp(z - lse) and P = a (c + |log a|) (c = 1 + |lse| + 2 herr, the floor's row
    term), and since G = s (Q a - q) with q the label's alpha and smoothing's beta w (rank one),
    every product the checks need is a^T X, P^T X, a Y, P Y with row-scaled X (hidden side) or
    the weight side's Y, plus the label's scatter and smoothing's outer product. |G| is bounded
    by s (|Q| a + |q|) where only bounds are needed (the rounding and tolerance norms), and
    |x| . |r| by |x|_2 |r|_2 (Cauchy-Schwarz), so no product of absolute values is formed."""

    def __init__(self, problem: LinearCE, users: dict[str, UserArray], settings: LinearSettings,
                 fds: tuple[HiddenFD, WeightFD, WeightFD, BiasDirection],
                 rng: np.random.Generator, worst: int | None = None) -> None:
        self.problem, self.users = problem, users
        N, V, H = problem.n_rows, problem.n_classes, problem.hidden_size
        self.loss = np.zeros(N)
        self.loss_floor = np.zeros(N)
        self.lse = np.zeros(N)
        self.herr = np.zeros(N)
        self.hfd, self.wfd, self.bfd, self.bdir = fds
        k = settings.projections
        project = not settings.exact
        self.pw = (Projection("grad_weight_vs_reference", users["grad_weight"], V, k, rng, H)
                   if project and "grad_weight" in users else None)
        self.ph = (Projection("grad_hidden_vs_reference", users["grad_hidden"], N, k, rng, H)
                   if project and "grad_hidden" in users else None)
        kw = k if self.pw is not None else 0
        self.kw = kw
        # `worst` given: `exact`'s dL/dH compared here (check_linear; row shards call exact_all)
        self.exact_h = (ExactHidden(problem, users["grad_hidden"], worst)
                        if settings.exact and worst is not None and "grad_hidden" in users else None)
        self.wa = np.zeros((V, 2 + kw))        # a^T [sQ, sQ hr, s|Q| |h|_2]
        self.wp = np.zeros((V, 2))             # P^T [s|Q|, s|Q| |h|]
        self._weight_side()

    def _weight_side(self) -> None:
        """Y = [W S, |W_v|_2] for the dL/dH projections and the bias direction's columns;
        W S, W d and W e_j (hidden finite differences) are filled from the first row block's
        converted weight blocks (`on_weight`)."""
        problem, ph = self.problem, self.ph
        V = problem.n_classes
        k = ph.r.shape[1] if ph is not None else 0
        self.kh = k
        assert problem.w_norms is not None
        parts = [np.zeros((V, k)), problem.w_norms[:, None]] if ph is not None else []
        if self.bdir.on:
            parts.append(self.bdir.columns())
        self.ya = np.hstack(parts) if parts else None

    def on_weight(self, v0: int, v1: int, w: np.ndarray) -> None:
        ph, k = self.ph, self.kh
        if ph is not None and self.ya is not None:
            self.ya[v0:v1, :k] = w @ ph.r
        self.hfd.on_weight(v0, v1, w)

    def run(self, progress: Callable[[int, int], None] | None) -> None:
        problem = self.problem
        N, step = problem.n_rows, problem.row_step()
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            blk = problem.forward_block(r0, r1, self.on_weight if r0 == 0 else None)
            herr = problem.logit_error(blk.h)
            self.loss[r0:r1], self.lse[r0:r1], self.herr[r0:r1] = blk.loss, blk.lse, herr
            self.loss_floor[r0:r1] = problem.loss_floor(blk)
            self.hfd.finish(blk, herr)
            self.wfd.update(blk, herr)
            self.bfd.update(blk, herr)
            self._gradients(blk, herr)
            if self.exact_h is not None:
                self.exact_h.update(blk, herr)
            del blk
            if progress is not None:
                progress(r1, N)
        self.wfd.finish()
        self.bfd.finish()
        self._split()
        for proj in (self.pw, self.ph):
            if proj is not None and proj.user.rows is not None:  # None: a row shard's partials
                proj.project_user()

    def _split(self) -> None:
        k = self.kw
        self.db, self.db_floor = self.wa[:, 0], self.wp[:, 0]
        if self.pw is not None:
            pw = self.pw
            pw.ref, pw.rel, pw.floor = self.wa[:, 1:1 + k], self.wa[:, 1 + k], self.wp[:, 1]

    def _gradients(self, blk: RowBlock, herr: np.ndarray) -> None:
        """The chunk loop (see the class): a^T X and P^T X into the vocabulary side, a Y and
        P |W|_2 into the token side, then the targets' own terms."""
        if blk.ev is not None:
            self._explicit(blk)
            return
        problem = self.problem
        rows, h = blk.rows, blk.h
        alpha, beta, ys = problem.targets(rows)
        s = problem.grad_scale
        Q = problem.total_weight(alpha, beta)
        h2 = np.sqrt(np.einsum("ij,ij->i", h, h))
        hr = h @ self.pw.r if self.pw is not None else None
        xa = self._xa(s * Q, s * np.abs(Q), h2, hr)
        xp = np.stack([s * np.abs(Q), s * np.abs(Q) * h2], axis=1)
        c = 1.0 + np.abs(blk.lse) + 2.0 * herr
        ya = self.ya
        ha = np.zeros((len(rows), ya.shape[1])) if ya is not None else None
        hp = np.zeros(len(rows))
        width = max((v1 - v0 for v0, v1 in problem.col_chunks(len(rows))), default=0)
        t_buf, a_buf = np.empty((len(rows), width)), np.empty((len(rows), width))
        for v0, v1 in problem.col_chunks(len(rows)):
            t, a = t_buf[:, :v1 - v0], a_buf[:, :v1 - v0]
            np.subtract(blk.z[:, v0:v1], blk.lse[:, None], out=t)    # log a
            np.exp(t, out=a)
            np.subtract(c[:, None], t, out=t)                        # c + |log a|
            t *= a                                                   # P
            self.wa[v0:v1] += a.T @ xa
            self.wp[v0:v1] += t.T @ xp
            if ha is not None and ya is not None:
                ha += a @ ya[v0:v1]
            if self.ph is not None:
                hp += t @ problem.w_norms[v0:v1]  # type: ignore[index]
        self._targets_terms(rows, alpha, beta, ys, s, h2, hr)
        if ha is not None:
            self._token_side(blk, ha, hp, s * Q, s * np.abs(Q), alpha, beta, ys, s)

    def _explicit(self, blk: RowBlock) -> None:
        """Extended semantics: the same products from the softmax model's G and floor phi."""
        problem, ph, pw, k = self.problem, self.ph, self.pw, self.kh
        assert blk.ev is not None and blk.phi is not None and blk.ev.grad is not None
        g, phi, h, rows = blk.ev.grad, blk.phi, blk.h, blk.rows
        gabs = np.abs(g)
        h2 = np.sqrt(np.einsum("ij,ij->i", h, h))
        self.wa[:, 0] += g.sum(axis=0)
        self.wa[:, -1] += gabs.T @ h2
        self.wp += phi.T @ np.stack([np.ones(len(rows)), h2], axis=1)
        if pw is not None:
            kw = self.kw
            self.wa[:, 1:1 + kw] += g.T @ (h @ pw.r)
        if ph is not None and self.ya is not None:
            ph.ref[rows] = g @ self.ya[:, :k]
            ph.rel[rows] = gabs @ self.ya[:, k]
            ph.floor[rows] = phi @ self.ya[:, k]
        if self.bdir.on:
            self.bdir.update_rows(problem, blk)

    def _xa(self, us: np.ndarray, ua: np.ndarray, h2: np.ndarray, hr: np.ndarray | None
            ) -> np.ndarray:
        """[us, us hr, ua |h|_2]: the vocabulary side's right-hand columns for the row weights
        us (signed) and ua (a bound of its size)."""
        cols = [us[:, None]]
        if hr is not None:
            cols.append(us[:, None] * hr)
        cols.append((ua * h2)[:, None])
        return np.hstack(cols)

    def _targets_terms(self, rows: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                       ys: np.ndarray, s: float, h2: np.ndarray, hr: np.ndarray | None
                       ) -> None:
        """The vocabulary side's -s q terms: the label's scatter, smoothing's outer product."""
        problem = self.problem
        live = np.flatnonzero(alpha != 0)
        sa = s * alpha[live]
        np.add.at(self.wa, ys[live], self._xa(-sa, np.abs(sa), h2[live],
                                              hr[live] if hr is not None else None))
        np.add.at(self.wp, ys[live], np.stack([np.abs(sa), np.abs(sa) * h2[live]], axis=1))
        if not problem.smoothing:
            return
        sb = s * beta
        cw = problem.class_weight if problem.class_weight is not None else np.ones(problem.n_classes)
        m = self._xa(-sb, np.abs(sb), h2, hr).sum(axis=0)
        signed = np.zeros(m.size, dtype=bool)
        signed[:1 + self.kw] = True
        self.wa += np.outer(cw, np.where(signed, m, 0.0)) + np.outer(np.abs(cw), np.where(signed, 0.0, m))
        self.wp += np.outer(np.abs(cw), [np.abs(sb).sum(), np.abs(sb) @ h2])

    def _token_side(self, blk: RowBlock, ha: np.ndarray, hp: np.ndarray, us: np.ndarray,
                    ua: np.ndarray, alpha: np.ndarray, beta: np.ndarray, ys: np.ndarray,
                    s: float) -> None:
        """dL/dH's projections of the rows (ha = a Y, hp = P |W|_2), the label's and smoothing's
        terms; the bias direction's a . expm1(+-u)."""
        problem, ph, k = self.problem, self.ph, self.kh
        rows = blk.rows
        sa, sb = s * alpha, s * beta
        cw = problem.class_weight if problem.class_weight is not None else np.ones(problem.n_classes)
        if ph is not None:
            y = self.ya
            assert y is not None
            ws, w2 = y[:, :k], y[:, k]
            ph.ref[rows] = us[:, None] * ha[:, :k] - sa[:, None] * ws[ys] - sb[:, None] * (cw @ ws)
            near = np.abs(sa) * w2[ys] + np.abs(sb) * float(np.abs(cw) @ w2)
            ph.rel[rows] = ua * ha[:, k] + near
            ph.floor[rows] = ua * hp + near
        if self.bdir.on:
            au = ha[:, -3:].copy()
            au[:, 2] = np.abs(au[:, 2])
            self.bdir.update(problem, rows, au)


# --- exact entries -----------------------------------------------------------------------------

def exact_weight_rows(problem: LinearCE, cols: np.ndarray, lse: np.ndarray, herr: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """dL/dW rows `cols` (sorted) and their floors in units of k*eps: G[:, cols]^T H, phi^T |H|."""
    H = problem.hidden_size
    ref, floor = np.zeros((cols.size, H)), np.zeros((cols.size, H))
    w = np.asarray(problem.weight[cols], dtype=np.float64)
    for r0 in range(0, problem.n_rows, problem.row_step()):
        r1 = min(problem.n_rows, r0 + problem.row_step())
        if problem.extended:
            h, g, phi = problem.full_terms(slice(r0, r1), herr)
            g, phi = g[:, cols], phi[:, cols]
        else:
            h = problem.hidden_rows(slice(r0, r1))
            z = h @ w.T
            if problem.bias is not None:
                z += problem.bias[cols]
            g, phi = problem.grad_terms(z, np.arange(r0, r1), cols, lse[r0:r1], herr[r0:r1])
        ref += g.T @ h
        floor += phi.T @ np.abs(h)
    return ref, floor


def exact_hidden_rows(problem: LinearCE, rows: np.ndarray, lse: np.ndarray, herr: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """dL/dH rows `rows` and their floors in units of k*eps: G W, phi |W|."""
    H = problem.hidden_size
    ref, floor = np.zeros((rows.size, H)), np.zeros((rows.size, H))
    h = problem.hidden_rows(rows)
    full = problem.full_terms(rows, herr) if problem.extended else None
    for v0, v1 in problem.vocab_blocks():
        w = problem.weight_block(v0, v1)
        if full is not None:
            g, phi = full[1][:, v0:v1], full[2][:, v0:v1]
        else:
            z = problem.logits(h, v0, v1, w)
            g, phi = problem.grad_terms(z, rows, np.arange(v0, v1), lse[rows], herr[rows])
        ref += g @ w
        floor += phi @ np.abs(w)
    return ref, floor


def exact_all(problem: LinearCE, users: dict[str, UserArray], lse: np.ndarray, herr: np.ndarray,
              worst: int) -> list[CheckResult]:
    """Every entry of dL/dW and dL/dH (`--exact`), each of `users` that is given; `check_linear`
    compares dL/dH inside its pass instead (`ExactHidden`), this recomputes the row blocks."""
    out = []
    gw, gh = users.get("grad_weight"), users.get("grad_hidden")
    if gw is not None:
        out.append(_exact_weight_by_rows(problem, gw, herr, worst) if problem.extended
                   else _exact_weight_by_vocab(problem, gw, lse, herr, worst))
    if gh is not None:
        exact_h = ExactHidden(problem, gh, worst)
        for r0 in range(0, problem.n_rows, problem.row_step()):
            blk = problem.forward_block(r0, min(problem.n_rows, r0 + problem.row_step()))
            exact_h.update(blk, herr[blk.start:blk.stop])
        out.append(exact_h.cmp.result())
    return out


def _exact_steps(problem: LinearCE) -> tuple[int, int]:
    """(vocabulary, row) block sizes of `--exact`'s dL/dW: every (vocabulary x H), (rows x H)
    and (rows x vocabulary) float64 block within EXACT_BLOCK_BYTES."""
    H = max(1, problem.hidden_size)
    vstep = max(16, EXACT_BLOCK_BYTES // (8 * H))
    return vstep, max(16, EXACT_BLOCK_BYTES // (8 * max(H, vstep)))


def _exact_weight_by_vocab(problem: LinearCE, user: UserArray, lse: np.ndarray, herr: np.ndarray,
                           worst: int) -> CheckResult:
    """Every entry of dL/dW, one vocabulary block at a time: G[:, block]^T H and phi^T |H| summed
    over the row blocks (their logits recomputed from the pass's lse), compared before the next
    block, so that no (V, H) or (N, V) float64 array exists whatever N and V."""
    N, H = problem.n_rows, problem.hidden_size
    cmp = _cmp("grad_weight_vs_reference", user, worst, "exact: every entry")
    vstep, rstep = _exact_steps(problem)
    for v0, v1 in problem.vocab_blocks(vstep):
        w, cols = problem.weight_block(v0, v1), np.arange(v0, v1)
        dw, fw = np.zeros((v1 - v0, H)), np.zeros((v1 - v0, H))
        for r0 in range(0, N, rstep):
            r1 = min(N, r0 + rstep)
            h = problem.hidden_rows(slice(r0, r1))
            g, phi = problem.grad_terms(problem.logits(h, v0, v1, w), np.arange(r0, r1), cols,
                                        lse[r0:r1], herr[r0:r1])
            dw += g.T @ h
            # the floor is a bound: float32 products (half the time of float64's)
            fw += phi.astype(np.float32).T @ np.abs(h).astype(np.float32)
        fw *= user.tol.floor_coef
        cmp.update(v0, dw, user.rows[v0:v1], fw)
    return cmp.result()


def _exact_weight_by_rows(problem: LinearCE, user: UserArray, herr: np.ndarray,
                          worst: int) -> CheckResult:
    """Extended semantics: whole rows at a time (the softmax model normalises whole rows), so
    dL/dW is accumulated over the row blocks for one vocabulary range at a time, its float64
    sums and float32 floor (12 bytes an entry) within a quarter of the row block's bytes, the
    rows in quarter blocks: each range recomputes the logits (V H 12 / (block_bytes / 4) passes
    instead of one (V, H) array; half blocks peaked at 1.96 GiB at 2048 tokens, over budget)."""
    N, H = problem.n_rows, problem.hidden_size
    vstep = max(16, problem.block_bytes // (48 * max(1, H)))
    rstep = max(1, problem.row_step() // 4)
    cmp = _cmp("grad_weight_vs_reference", user, worst, "exact: every entry")
    for v0, v1 in problem.vocab_blocks(vstep):
        dw, fw = np.zeros((v1 - v0, H)), np.zeros((v1 - v0, H), dtype=np.float32)
        for r0 in range(0, N, rstep):
            h, g, phi = problem.full_terms(slice(r0, min(N, r0 + rstep)), herr)
            dw += g[:, v0:v1].T @ h
            fw += phi[:, v0:v1].astype(np.float32).T @ np.abs(h).astype(np.float32)
        cmp.update(v0, dw, user.rows[v0:v1], fw.astype(np.float64) * user.tol.floor_coef)
    return cmp.result()


class ExactHidden:
    """`--exact`'s dL/dH inside the pass, row block by row block: G W and phi |W| from the
    block's own logits (no second logits product), compared before the next block."""

    def __init__(self, problem: LinearCE, user: UserArray, worst: int) -> None:
        self.problem, self.user = problem, user
        self.cmp = _cmp("grad_hidden_vs_reference", user, worst, "exact: every entry")

    def update(self, blk: RowBlock, herr: np.ndarray) -> None:
        problem = self.problem
        dh = np.zeros(blk.h.shape)
        fh = np.zeros(blk.h.shape, dtype=np.float32)
        for v0, v1 in problem.vocab_blocks():
            w = problem.weight_block(v0, v1)
            if blk.ev is not None and blk.phi is not None and blk.ev.grad is not None:
                g, phi = blk.ev.grad[:, v0:v1], blk.phi[:, v0:v1]
            else:
                g, phi = problem.grad_terms(blk.z[:, v0:v1], blk.rows, np.arange(v0, v1),
                                            blk.lse, herr)
            dh += g @ w
            fh += phi.astype(np.float32) @ np.abs(w).astype(np.float32)
        floor = fh.astype(np.float64)
        floor *= self.user.tol.floor_coef
        self.cmp.update(blk.start, dh, self.user.rows[blk.start:blk.stop], floor)


def _cmp(name: str, user: UserArray, worst: int, note: str = "") -> Comparison:
    return Comparison(name, user.tol, user.index_of, n_worst=worst, note=note)


def projection_result(proj: Projection, exact: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                      settings: LinearSettings, worst: int, sums: float, what: str) -> CheckResult:
    """The projections' verdict; failing rows (up to `max_open_rows`) computed exactly."""
    dev, allowed, failing = proj.verdict(sums)
    user, k = proj.user, proj.r.shape[1]
    note = (f"{k} Gaussian projections per {what} row (Freivalds); a row whose error is 10x its "
            f"threshold passes with probability <= {settings.false_pass():.1g}")
    if failing.size == 0:
        ratio = dev / np.where(allowed > 0, allowed, np.inf)
        order = np.argsort(-ratio.max(axis=1), kind="stable")[:worst]
        entries = tuple(Entry((int(v),), float(proj.ref[v].max()), float(proj.got[v].max()),
                              float(dev[v].max()), float(allowed[v].max())) for v in order.tolist())
        return CheckResult(proj.name, True, "reference", "yours", float(dev.max(initial=0.0)),
                           0.0, 0, dev.shape[0], entries,
                           f"projections: |yours.r - ref.r| <= {CONFIDENCE:g} |tolerance|_2; {user.tol.describe()}",
                           note)
    opened = np.sort(failing[:settings.max_open_rows])
    ref, floor = exact(opened)
    cmp = Comparison(proj.name, user.tol, lambda i, j: user.index_of(int(opened[i]), j), n_worst=worst)
    cmp.update(0, ref, np.asarray(user.rows[opened]), floor * user.tol.floor_coef)
    res = cmp.result()
    note += (f"; {failing.size} of {dev.shape[0]} {what} rows fail: {_ranges(failing)}; "
             f"exact entries of {opened.size} worst rows: {res.mismatches} of {res.total} over tolerance")
    return replace(res, ok=False, mismatches=max(res.mismatches, int(failing.size)), note=note)


# --- the check ---------------------------------------------------------------------------------

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
    problem, warnings, labels = _problem(hidden, weight, labels, bias, class_weight, sample_weight,
                                         opts, lin, src)
    grads = {"grad_hidden": grad_hidden, "grad_weight": grad_weight, "grad_bias": grad_bias}
    problem = problem.with_budget(sum(int(np.asarray(a).nbytes) for a in
                                      (hidden, weight, grad_hidden, grad_weight) if a is not None))
    users = user_arrays(problem, grads, src, opts, lin.weight_layout)
    user_loss = _user_loss(problem, loss, src["loss"], opts)
    run, mode, (hp, wp, bias_probes) = _stream(problem, users, lin, opts, progress, exact_hidden=True)
    ranked = _gradient_checks(problem, users, run, lin, opts.worst)
    ranked += _fd_checks(problem, users, (hp, wp, bias_probes), opts.worst, run.bdir.u)
    total = loss_sum(run.loss)
    ref_loss = problem.reduce(total)
    if user_loss is not None:
        ranked.append((2, _loss_check(problem, run, user_loss, ref_loss, opts)))
    checks = tuple(c for _, c in sorted(ranked, key=lambda rc: rc[0]))
    arrays = {"hidden": hidden, "weight": weight, "labels": labels, "bias": bias,
              "class_weight": class_weight, "sample_weight": sample_weight, **grads, "loss": loss}
    return Report(
        kind="linear", ok=all(c.ok for c in checks), loss=float(ref_loss),
        loss_per_sample_shape=problem.batch_shape if problem.reduction == "none" else None,
        shape=tuple(np.shape(hidden)), n_rows=problem.n_rows, n_classes=problem.n_classes,
        n_ignored=int(problem.n_rows - np.count_nonzero(problem.valid)),
        reduction=problem.reduction, target_kind="index", checks=checks,
        inputs=tuple(InputInfo(r, src[r], tuple(np.shape(a)), str(np.asarray(a).dtype))
                     for r, a in arrays.items() if a is not None),
        warnings=tuple(warnings), fd_mode=mode, fd_evaluations=2 * (hp.owner.size + wp.owner.size + bias_probes.owner.size),
        options=_echo(problem, lin, opts, users))


# CheckOptions fields that mean nothing without the (N, V) logits: refused, never ignored
NOT_LINEAR = ("class_axis", "two_class", "vocab_offset", "kl_loss")


def refuse_not_linear(opts: CheckOptions) -> None:
    """One line for a setting of check_grad / check_binary that check_linear does not take."""
    defaults = CheckOptions()
    for name in NOT_LINEAR:
        if getattr(opts, name) != getattr(defaults, name):
            raise CeCheckError(f"`{name}`: not taken by check_linear (fused linear "
                               "cross-entropy has no logits array)")


def _problem(hidden: Any, weight: Any, labels: Any, bias: Any, class_weight: Any,
             sample_weight: Any, opts: CheckOptions, lin: LinearSettings, src: dict[str, str]
             ) -> tuple[LinearCE, list[str], Any]:
    """The problem with the training-code semantics (and the labels, shifted with
    `shift_labels`)."""
    if opts.shift_labels:
        labels = shift_labels(np.asarray(hidden), np.asarray(labels), opts.ignore_index, src["labels"])
    semantics = Semantics(z_loss=opts.z_loss, softcap=opts.softcap, logit_scale=opts.logit_scale,
                          smoothing_form=opts.smoothing_form, denominator=opts.denominator,
                          sample_weight=sample_weight)
    problem, warnings = build_linear_ce(
        hidden, weight, labels, bias=bias, class_weight=class_weight, reduction=opts.reduction.value,
        ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
        weight_layout=lin.weight_layout, sources=src, semantics=semantics)
    return problem, warnings, labels


ChooseProbes = Callable[[LinearCE, CheckOptions, np.random.Generator],
                        tuple[str, Probes, Probes, Probes]]


def _stream(problem: LinearCE, users: dict[str, UserArray], lin: LinearSettings,
            opts: CheckOptions, progress: Callable[[int, int], None] | None,
            choose: ChooseProbes | None = None, rows_total: int | None = None,
            exact_hidden: bool = False) -> tuple[Pass, str, tuple[Probes, Probes, Probes]]:
    """The finite-difference probes (`choose`: a row shard's draw of the batch's) and the
    streaming pass (`exact_hidden`: comparing `exact`'s dL/dH as it goes); the bias direction's
    result joins the bias's entry probes."""
    rng = np.random.default_rng(opts.seed)
    mode, hp, wp, bp = (choose or choose_probes)(problem, opts, rng)
    gb_user = users.get("grad_bias")
    fds = (HiddenFD(problem, hp, users.get("grad_hidden")),
           WeightFD(problem, wp, users.get("grad_weight"), rows_total=rows_total),
           WeightFD(problem, bp, _bias_column(gb_user), lambda blk: np.ones((blk.h.shape[0], 1)),
                    rows_total),
           BiasDirection(problem, rng, mode != "off"))
    run = Pass(problem, users, lin, fds, rng, opts.worst if exact_hidden else None)
    run.run(progress)
    if run.bdir.on:
        bp = _join(run.bdir.probes(run.db, run.db_floor, gb_user), bp)
    return run, mode, (hp, wp, bp)


def linear_pass(problem: LinearCE, users: dict[str, UserArray], lin: LinearSettings,
                opts: CheckOptions, progress: Callable[[int, int], None] | None = None,
                choose: ChooseProbes | None = None, rows_total: int | None = None) -> Pass:
    """The streaming pass with `check_linear`'s random draws (a row shard's pass: the same R and S
    as the whole batch's for the same seed when `choose` draws the batch's probes, and the
    weight-side bounds over `rows_total` rows); a user array whose rows are None gets its
    reference projections and bounds but no projection of yours."""
    return _stream(problem, users, lin, opts, progress, choose, rows_total)[0]


def _echo(problem: LinearCE, lin: LinearSettings, opts: CheckOptions,
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
        cmp = _cmp("grad_bias_vs_reference", gb, worst)
        cmp.update(0, run.db[None, :], gb.rows, run.db_floor[None, :] * gb.tol.floor_coef)
        out.append((1, cmp.result()))
    gw = users.get("grad_weight")
    if gw is not None and gw.transposed:
        out = [(r, _transposed(c, problem)) if c.name == "grad_weight_vs_reference" else (r, c)
               for r, c in out]
    return out


def _transposed(result: CheckResult, problem: LinearCE) -> CheckResult:
    verdict = "correct once transposed" if result.ok else "wrong even transposed"
    note = (f"your weight gradient has the transposed shape ({problem.hidden_size}, "
            f"{problem.n_classes}) of the weight's; it was compared as its transpose: {verdict}")
    return replace(result, ok=False, mismatches=max(1, result.mismatches),
                   note="; ".join(x for x in (note, result.note) if x))


def _bias_column(user: UserArray | None) -> UserArray | None:
    """Your dL/db as (V, 1) rows: the bias's entry probes are the weight's with x = 1."""
    if user is None:
        return None
    return UserArray(np.asarray(user.rows).reshape(-1, 1), user.tol, lambda v, _j: (v,))


def _join(first: Probes, rest: Probes) -> Probes:
    return Probes(*(np.r_[getattr(first, f.name), getattr(rest, f.name)]
                    if f.name != "direction" else rest.direction for f in fields(Probes)))


def _fd_checks(problem: LinearCE, users: dict[str, UserArray], probes: tuple[Probes, Probes, Probes],
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
             ("bias", bp, _bias_column(users.get("grad_bias")), lambda r: (), lambda r, _j: (r,)))
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


def _user_loss(problem: LinearCE, loss: Any, source: str, opts: CheckOptions
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


def _loss_check(problem: LinearCE, run: Pass, user: tuple[np.ndarray, Tolerance], ref_loss: float,
                opts: CheckOptions) -> CheckResult:
    got, tol = user
    if problem.reduction == "none":
        cmp = Comparison("loss_vs_reference", tol, lambda r, c: problem.batch_index(r),
                         n_worst=opts.worst, extra_atol=opts.loss_atol, beyond_range=True)
        cmp.update(0, run.loss, got, tol.floor_coef * run.loss_floor)
        return cmp.result()
    floor = tol.floor_coef * (float(run.loss_floor.sum()) + math.log2(problem.n_rows + 1) * abs(ref_loss))
    cmp = Comparison("loss_vs_reference", tol, lambda r, c: (), n_worst=1, extra_atol=opts.loss_atol,
                     beyond_range=True)
    cmp.update(0, np.array([ref_loss]), np.asarray(got, dtype=np.float64).reshape(1),
               np.array([floor]) if np.isfinite(floor) else None)
    return cmp.result()
