"""The one streaming pass of `check_linear` over the row blocks: loss, dL/db, the projections,
the finite differences and (with `exact`) dL/dH entry by entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import numpy as np

from ce_cli.models.linear import LinearCE, RowBlock
from ce_cli.verify.linear.arrays import LinearSettings, UserArray
from ce_cli.verify.linear.exact import ExactHidden
from ce_cli.verify.linear.probes import (BiasDirection, ChooseProbes, HiddenFD, Probes, Projection,
                                         WeightFD, choose_probes)
from ce_cli.verify.options import CheckOptions


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
        # as the per-sample losses of a 16-bit computation, when your gradients are one
        self.loss_floor16 = np.zeros(N) if problem.loss16 else None
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
            herr = problem.logit_error(blk.h, blk.z)
            self.loss[r0:r1], self.lse[r0:r1], self.herr[r0:r1] = blk.loss, blk.lse, herr
            self.loss_floor[r0:r1] = problem.loss_floor(blk)
            if self.loss_floor16 is not None:
                self.loss_floor16[r0:r1] = problem.loss_floor(blk, herr)
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
        c = 1.0 + problem.lse_weight * np.abs(blk.lse) + 2.0 * herr
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


def run_pass(problem: LinearCE, users: dict[str, UserArray], lin: LinearSettings,
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
           WeightFD(problem, bp, bias_column(gb_user), lambda blk: np.ones((blk.h.shape[0], 1)),
                    rows_total),
           BiasDirection(problem, rng, mode != "off"))
    run = Pass(problem, users, lin, fds, rng, opts.worst if exact_hidden else None)
    run.run(progress)
    if run.bdir.on:
        bp = join_probes(run.bdir.probes(run.db, run.db_floor, gb_user), bp)
    return run, mode, (hp, wp, bp)


def linear_pass(problem: LinearCE, users: dict[str, UserArray], lin: LinearSettings,
                opts: CheckOptions, progress: Callable[[int, int], None] | None = None,
                choose: ChooseProbes | None = None, rows_total: int | None = None) -> Pass:
    """The streaming pass with `check_linear`'s random draws (a row shard's pass: the same R and S
    as the whole batch's for the same seed when `choose` draws the batch's probes, and the
    weight-side bounds over `rows_total` rows); a user array whose rows are None gets its
    reference projections and bounds but no projection of yours."""
    return run_pass(problem, users, lin, opts, progress, choose, rows_total)[0]


def bias_column(user: UserArray | None) -> UserArray | None:
    """Your dL/db as (V, 1) rows: the bias's entry probes are the weight's with x = 1."""
    if user is None:
        return None
    return UserArray(np.asarray(user.rows).reshape(-1, 1), user.tol, lambda v, _j: (v,))


def join_probes(first: Probes, rest: Probes) -> Probes:
    return Probes(*(np.r_[getattr(first, f.name), getattr(rest, f.name)]
                    if f.name != "direction" else rest.direction for f in fields(Probes)))
