"""Random probes of `check_linear`: the Freivalds projections of your dL/dW and dL/dH (R, S
Gaussian), and the finite-difference probes of each side (entries and one +-1 direction)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX
from ce_cli.models.linear import LinearCE, RowBlock
from ce_cli.verify.linear.arrays import CONFIDENCE, FD_AUTO_DIRECTIONAL, UserArray
from ce_cli.verify.options import CheckOptions


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


def row_ranges(rows: np.ndarray, limit: int = 6) -> str:
    """1, 2, 3, 7 -> '1-3, 7'."""
    if rows.size == 0:
        return ""
    s = np.sort(rows)
    breaks = np.flatnonzero(np.diff(s) != 1)
    starts, ends = np.r_[s[0], s[breaks + 1]], np.r_[s[breaks], s[-1]]
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts.tolist(), ends.tolist())]
    more = f", ... ({len(parts) - limit} more ranges)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


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


ChooseProbes = Callable[[LinearCE, CheckOptions, np.random.Generator],
                        tuple[str, Probes, Probes, Probes]]


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
