"""Exact entries of dL/dW and dL/dH (`exact`, and the failing rows a projection opens), each
with its floor, compared entry by entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ce_cli.models.linear import LinearCE, RowBlock
from ce_cli.verify.compare import Comparison
from ce_cli.verify.linear.arrays import CONFIDENCE, EXACT_BLOCK_BYTES, LinearSettings, UserArray
from ce_cli.verify.linear.probes import Projection, row_ranges
from ce_cli.verify.results import CheckResult, Entry
from ce_cli.verify.tolerance import SIXTEEN_BIT


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


def exact_steps(problem: LinearCE) -> tuple[int, int]:
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
    cmp = user_comparison("grad_weight_vs_reference", user, worst, "exact: every entry")
    vstep, rstep = exact_steps(problem)
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
    cmp = user_comparison("grad_weight_vs_reference", user, worst, "exact: every entry")
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
        self.cmp = user_comparison("grad_hidden_vs_reference", user, worst, "exact: every entry")

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


def user_comparison(name: str, user: UserArray, worst: int, note: str = "") -> Comparison:
    return Comparison(name, user.tol, user.index_of, n_worst=worst, note=note)


def projection_result(proj: Projection, exact: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                      settings: LinearSettings, worst: int, sums: float, what: str) -> CheckResult:
    """The projections' verdict; failing rows (up to `max_open_rows`) computed exactly."""
    dev, allowed, failing = proj.verdict(sums)
    user, k = proj.user, proj.r.shape[1]
    note = (f"{k} Gaussian projections per {what} row (Freivalds); a row whose error is 10x its "
            f"threshold passes with probability <= {settings.false_pass():.1g}")
    if user.tol.coarse in SIXTEEN_BIT:
        note += (f"; in {user.tol.coarse} that threshold is wide (every softmax term's "
                 f"{user.tol.coarse} floor, summed): --exact holds each entry (docs/linear.md)")
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
    note += (f"; {failing.size} of {dev.shape[0]} {what} rows fail: {row_ranges(failing)}; "
             f"exact entries of {opened.size} worst rows: {res.mismatches} of {res.total} over tolerance")
    return replace(res, ok=False, mismatches=max(res.mismatches, int(failing.size)), note=note)
