"""Central finite differences of the float64 reference loss, one row at a time.

Perturbing z[n, c] changes only loss_n, so each difference is taken on the row's own loss
(N times less round-off than the batch total, and O(C) instead of O(N*C) work):

    fd[n, c] = scale * (loss_n(z + h e_c) - loss_n(z - h e_c)) / ((z_c + h) - (z_c - h))

with h = eps^(1/3) * max(1, |z_c|) and the realised step in the denominator. Each entry gets a
rigorous error bound (round-off plus truncation, see `SoftmaxCE.fd_error_bound`).

Modes: `full` sweeps every column of a row chunk at once (2*C chunk evaluations); `sample`
checks K entries: each sampled row's target entry, a random other entry, and the worst entries
of the gradient comparison; `auto` runs `full` when it costs at most ~2e8 entry evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ce_cli.errors import CeCheckError

FD_MODES = ("auto", "full", "sample", "off")
FULL_BUDGET = 2e8  # entry-evaluations (2 * N * C * C) that `auto` accepts for a full sweep
CHUNK_ENTRIES = 1 << 20


@dataclass(frozen=True)
class FDResult:
    rows: np.ndarray
    cols: np.ndarray
    fd: np.ndarray          # finite-difference derivative of the reduced loss
    bound: np.ndarray       # bound on |fd - true derivative|
    mode: str
    evaluations: int        # row-loss evaluations (each costs O(C))
    skipped: int            # entries at -inf logits or in rows with infinite loss


def choose_mode(mode: str, n_rows: int, n_classes: int) -> str:
    if mode not in FD_MODES:
        raise CeCheckError(f"--fd: unknown mode '{mode}' (use auto, full, sample or off)")
    if mode == "auto":
        return "full" if 2.0 * n_rows * n_classes * n_classes <= FULL_BUDGET else "sample"
    return mode


def step_for(z: np.ndarray) -> np.ndarray:
    return np.finfo(np.float64).eps ** (1.0 / 3.0) * np.maximum(1.0, np.abs(z))


def sample_entries(problem, k: int, seed: int, extra: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """K entries: `extra` (the worst mismatches) first, then each sampled row's target entry
    and one random entry of the same row."""
    rng = np.random.default_rng(seed)
    N, C = problem.n_rows, problem.n_classes
    n_pick = max(1, min(N, (k - len(extra) + 1) // 2))
    rows = np.sort(rng.choice(N, size=n_pick, replace=False))
    targets = problem.target_columns(rows)
    others = rng.integers(0, C, size=rows.size)
    pairs = [(int(r), int(c)) for r, c in extra]
    for r, t, o in zip(rows.tolist(), targets.tolist(), others.tolist()):
        pairs += [(r, t), (r, o)]
    unique = list(dict.fromkeys(pairs))[: max(k, len(extra))]
    arr = np.array(sorted(unique), dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def fd_entries(problem, rows: np.ndarray, cols: np.ndarray) -> FDResult:
    """Finite differences at the listed entries (row-major batches bounded in memory)."""
    C = problem.n_classes
    per = max(1, CHUNK_ENTRIES // C)
    fd = np.empty(rows.size)
    bound = np.empty(rows.size)
    skipped = 0
    for a in range(0, rows.size, per):
        r = rows[a:a + per]
        c = cols[a:a + per]
        base = np.asarray(problem.z[r], dtype=np.float64)
        ev = problem.evaluate_rows(base, r, grad=False)
        zc = base[np.arange(r.size), c]
        f, b, s = _difference(problem, base, r, c, zc, ev)
        fd[a:a + per], bound[a:a + per] = f, b
        skipped += s
    return FDResult(rows, cols, fd, bound, "sample", 2 * rows.size, skipped)


def _difference(problem, base, r, c, zc, ev):
    """Evaluate both perturbed copies of the rows `base` (one entry per row)."""
    idx = np.arange(r.size)
    h = step_for(zc)
    zp, zm = zc + h, zc - h
    base[idx, c] = zp
    lp = problem.evaluate_rows(base, r, grad=False).loss
    base[idx, c] = zm
    lm = problem.evaluate_rows(base, r, grad=False).loss
    base[idx, c] = zc
    return _finish(problem, zp, zm, lp, lm, zc, ev)


def _finish(problem, zp, zm, lp, lm, zc, ev):
    denom = zp - zm
    with np.errstate(invalid="ignore", divide="ignore"):
        fd = (lp - lm) / denom * problem.grad_scale
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        bound = problem.fd_error_bound(zc, denom / 2.0, ev)
    bad = ~np.isfinite(fd) | ~np.isfinite(zc) | ~np.isfinite(bound)
    fd = np.where(bad, np.nan, fd)
    bound = np.where(bad, np.nan, bound)
    return fd, bound, int(np.count_nonzero(bad))


def fd_full(problem, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every entry of rows [start, stop) by column sweeps: 2*C evaluations of the chunk."""
    base = np.asarray(problem.z[start:stop], dtype=np.float64).copy()
    r = np.arange(start, stop)
    ev = problem.evaluate_rows(base, r, grad=False)
    R, C = base.shape
    fd = np.empty((R, C))
    bound = np.empty((R, C))
    skipped = 0
    for j in range(C):
        zc = base[:, j].copy()
        h = step_for(zc)
        zp, zm = zc + h, zc - h
        base[:, j] = zp
        lp = problem.evaluate_rows(base, r, grad=False).loss
        base[:, j] = zm
        lm = problem.evaluate_rows(base, r, grad=False).loss
        base[:, j] = zc
        f, b, s = _finish(problem, zp, zm, lp, lm, zc, ev)
        fd[:, j], bound[:, j] = f, b
        skipped += s
    return fd, bound, skipped
