"""Central finite differences of the float64 reference loss, one row at a time.

Perturbing z[n, c] changes only loss_n, so each difference is taken on the row's own loss
(N times less round-off than the batch total, and O(C) instead of O(N*C) work):

    fd[n, c] = scale * (loss_n(z + h e_c) - loss_n(z - h e_c)) / ((z_c + h) - (z_c - h))

with h = eps^(1/3) * max(1, |z_c|) and the realised step in the denominator. Each entry gets a
rigorous error bound from the loss model (round-off plus truncation: `fd_error_bound`). A loss
that is a sum of independent per-element terms (sigmoid BCE: `elementwise`) takes the sampled
differences on the element's own loss l_nc instead: O(1) work an entry, and no row sum's
rounding in the bound (`entry_fd_error_bound`). On the compiled kernel a softmax row is
evaluated once and each of its steps re-sums only the entry's block of 128 from the row's own
sums (`steps`: the bits of the perturbed row evaluated whole).

Modes: `full` sweeps every column of a row chunk at once (2*C chunk evaluations); `directional`
checks every row along one random direction (2 batch evaluations) and localises a failing row's
bad entry by bisection over column blocks (O(log C) row evaluations); `sample` checks K entries:
each sampled row's target entry, a random other entry, and the worst entries of the gradient
comparison. `directional` and `sample` both also run the sampled entry checks. `auto` runs
`full` when it costs at most ~2e8 entry evaluations, `directional` up to 2^24 entries, else `sample`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.limits import fd_full_cost, fd_full_refusal
from ce_cli.kernels.base import required
from ce_cli.kernels.numerics import EPS
from ce_cli.verify.threads import numpy_threads, ordered_map

FD_MODES = ("auto", "full", "directional", "sample", "off")
FULL_BUDGET = 2e8  # entry-evaluations (2 * N * C * C) that `auto` accepts for a full sweep
DIRECTIONAL_BUDGET = 1 << 24  # entries up to which `auto` adds a directional check of every row
BLOCK_ENTRIES = 1 << 17  # a loss-only block of the numpy kernel: its buffers stay in cache
FD_BLOCK_ENTRIES = 1 << 21  # sampled rows' entries a compiled-kernel call: 64 rows at C = 32000
FULL_STEPS = 1 << 19  # steps a compiled-kernel call of `full` (~60 MB of arrays a call)


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(frozen=True, eq=False)
class FDResult:
    rows: np.ndarray
    cols: np.ndarray
    fd: np.ndarray          # finite-difference derivative of the reduced loss
    bound: np.ndarray       # bound on |fd - true derivative|
    evaluations: int        # row-loss evaluations (O(C) each; a step from its row's own sums less)
    skipped: int            # entries at -inf logits or in rows with infinite loss
    reference: np.ndarray | None = None  # the analytic reference gradient at the entries
    floor: np.ndarray | None = None      # the error floor of your precision at the entries


def choose_mode(mode: str, n_rows: int, n_classes: int, elementwise: bool = False) -> str:
    """The mode `mode` names; `auto`: `full` when its cost is within FULL_BUDGET, `directional`
    up to DIRECTIONAL_BUDGET entries, else `sample`. An `elementwise` loss pays 2 evaluations
    per entry for `full`, O(N*C) like `directional` (about twice its time, for a bound on every
    entry): `full` replaces it."""
    if mode not in FD_MODES:
        raise CeCheckError(f"`fd`: unknown mode '{mode}' (use auto, full, directional, sample or off)")
    if mode == "full":
        refusal = fd_full_refusal((n_rows, n_classes), elementwise=elementwise)
        if refusal is not None:
            raise CeCheckError(refusal)
    if mode == "auto":
        every_row = n_rows * n_classes <= DIRECTIONAL_BUDGET
        if elementwise:
            return "full" if every_row else "sample"
        if fd_full_cost(n_rows, n_classes) <= FULL_BUDGET:
            return "full"
        return "directional" if every_row else "sample"
    return mode


def step_for(z: np.ndarray) -> np.ndarray:
    """h = eps^(1/3) * max(1, |z|); 0 at -inf logits (masks) and at logits so large that
    z +- h overflows (within eps^(1/3) of the float64 maximum): those are not probed."""
    h = EPS ** (1.0 / 3.0) * np.maximum(1.0, np.abs(z))
    with np.errstate(over="ignore", invalid="ignore"):
        fits = np.isfinite(z) & np.isfinite(np.abs(z) + h)
    return np.where(fits, h, 0.0)


def sample_entries(problem, k: int, seed: int, extra: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """K entries (or all extra): `extra` (the worst mismatches) first, then, row by row in a
    random order (`uniform_draws(seed)`), each row's target entry and one random other entry,
    until K distinct entries are taken or the rows run out."""
    draw = uniform_draws(seed)
    C = problem.n_classes
    pairs = dict.fromkeys((int(r), int(c)) for r, c in extra)
    want = max(k, len(pairs))
    order = _shuffled(problem.n_rows, draw)
    while len(pairs) < want:
        rows = list(itertools.islice(order, max(1, (want - len(pairs) + 1) // 2)))
        if not rows:
            break
        for r, t in zip(rows, problem.target_columns(np.array(rows)).tolist()):
            pairs[(r, t)] = None
            if C > 1:
                other = draw(C - 1)
                pairs[(r, other + (other >= t))] = None
    arr = np.array(sorted(list(pairs)[:want]), dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _shuffled(n: int, draw: Callable[[int], int]) -> Iterator[int]:
    """0, ..., n - 1 in a random order, one at a time: Fisher-Yates with the swapped slots in a
    dict, so taking m of them costs O(m) whatever n."""
    swapped: dict[int, int] = {}
    for i in range(n):
        j = i + draw(n - i)
        yield swapped.get(j, j)
        swapped[j] = swapped.get(i, i)


_MASK64 = (1 << 64) - 1


def uniform_draws(seed: int) -> Callable[[int], int]:
    """draw(n): an integer uniform in [0, n), (x n) >> 64 of the next output x of SplitMix64
    (Steele, Lea and Flood, 2014) seeded with `seed`. The same sequence on every platform and
    version, at the cost of a few integer operations: numpy.random's import alone takes ~10 ms
    of a run."""
    state = seed & _MASK64

    def draw(n: int) -> int:
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        x = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return ((x ^ (x >> 31)) * n) >> 64

    return draw


def elementwise(problem) -> bool:
    """True for a loss that is a sum of independent per-element terms (sigmoid BCE: its model
    has `entry_losses`): perturbing z[n, c] moves only that element's term, so its difference
    needs that element's loss alone, not the row's (O(1) instead of O(C), and no row sum's
    rounding in the bound: `entry_fd_error_bound`)."""
    return hasattr(problem, "entry_losses")


def fd_entries(problem, rows: np.ndarray, cols: np.ndarray, floor_coef: float | None = None,
               lse_weight: float = 1.0) -> FDResult:
    """Finite differences at the listed entries, with the analytic reference (and, given
    `floor_coef` and `lse_weight`, the error floor) there. An elementwise loss evaluates the
    entries' own elements only (the reference and floor too); otherwise each distinct row is
    evaluated once (its gradient and floor at the entries only: `picks`), then twice per entry
    perturbed, block by block of rows (on the numpy kernel blocks that stay in cache, on its
    threads). The compiled kernel takes a step from the row's own exps and block sums (`steps`:
    the entry's block of 128 and the sum over blocks again, the bits of the whole row); a step
    it does not take (the arg-max, a value not below the row's maximum) and every step on the
    numpy kernel evaluate the row whole (`perturb`: the logits are not written to). The blocks
    depend on C alone, not on the threads: the same bits at every thread count (the compiled
    kernel computes every row alone, the numpy kernel picks a masked sum for a block holding a
    -inf logit)."""
    if elementwise(problem):
        return _fd_elements(problem, rows, cols, floor_coef)
    fd, bound, ana, floor = (np.empty(rows.size) for _ in range(4))
    uniq, inverse = np.unique(rows, return_inverse=True)
    numpy_kernel = problem.kernel is None
    per = max(1, (BLOCK_ENTRIES if numpy_kernel else FD_BLOCK_ENTRIES) // problem.n_classes)
    threads = numpy_threads(problem)

    def block(a: int):
        return _fd_block(problem, rows, cols, uniq[a:a + per], inverse, a,
                         (floor_coef, lse_weight), 1 if threads > 1 else None)

    skipped = 0
    calls = ((a,) for a in range(0, uniq.size, per))
    for sel, values, s in ordered_map(block, calls, threads if numpy_kernel else 1):
        fd[sel], bound[sel], ana[sel], floor[sel] = values
        skipped += s
    return FDResult(rows, cols, fd, bound, uniq.size + 2 * rows.size, skipped, ana,
                    floor if floor_coef is not None else None)


def _fd_elements(problem, rows: np.ndarray, cols: np.ndarray, floor_coef: float | None) -> FDResult:
    """`fd_entries` of an elementwise loss: the reference, floor and both perturbed losses of
    the M entries' elements, three kernel calls of M elements each (`entry_values`)."""
    zc = np.asarray(problem.z[rows, cols], dtype=np.float64)
    ev = problem.entry_values(rows, cols, zc, floor_coef=floor_coef)
    floor = required(ev.floor, "floor")[0] if floor_coef is not None else None
    fd, bound, skipped = central_differences(problem, None, rows, cols, zc, None)
    return FDResult(rows, cols, fd, bound, 2 * rows.size, skipped,
                    required(ev.grad, "gradient")[0], floor)


def _fd_block(problem, rows: np.ndarray, cols: np.ndarray, block: np.ndarray, inverse: np.ndarray,
              a: int, coef: tuple[float | None, float], threads: int | None):
    """`fd_entries` on the entries of rows `block` (= unique rows a, a+1, ...): their positions
    in `rows`, (fd, bound, reference, floor) there, and the entries skipped."""
    z = np.asarray(problem.z[block])
    sel = np.flatnonzero((inverse >= a) & (inverse < a + block.size))
    local, c = inverse[sel] - a, cols[sel]
    slot = _slots(local)
    picks = np.full((block.size, int(slot.max()) + 1 if slot.size else 1), -1, dtype=np.int64)
    picks[local, slot] = c
    zc = np.asarray(z[local, c], dtype=np.float64)
    h = step_for(zc)
    zp, zm = zc + h, zc - h
    # each entry's two steps, z + h and z - h, in step columns 2 slot and 2 slot + 1
    step_vals = np.zeros((block.size, 2 * picks.shape[1]))
    step_vals[local, 2 * slot], step_vals[local, 2 * slot + 1] = zp, zm
    ev = problem.evaluate_rows(z, block, floor_coef=coef[0], lse_weight=coef[1], picks=picks,
                               steps=(np.repeat(picks, 2, axis=1), step_vals))
    ana = required(ev.pick_grad, "gradient")[local, slot]
    floor = ev.pick_floor[local, slot] if ev.pick_floor is not None else np.zeros(sel.size)
    taken = ev.step_loss if ev.step_loss is not None else np.full(step_vals.shape, np.nan)
    lp, lm = taken[local, 2 * slot], taken[local, 2 * slot + 1]
    whole = np.flatnonzero(np.isnan(lp) | np.isnan(lm))  # the steps the kernel did not take
    if whole.size:
        lp[whole], lm[whole] = perturbed_losses(problem, z[local[whole]], rows[sel][whole],
                                                c[whole], zp[whole], zm[whole], threads)
    f, b, s = _finish(problem, rows[sel], c, zp, zm, lp, lm, zc, ev.take_rows(local))
    return sel, (f, b, ana, floor), s


def _slots(local: np.ndarray) -> np.ndarray:
    """The rank of each entry among the earlier entries of its row (`local` sorted): 0, 1, ..."""
    if not local.size:
        return local
    starts = np.flatnonzero(np.r_[True, local[1:] != local[:-1]])
    return np.arange(local.size) - np.repeat(starts, np.diff(np.r_[starts, local.size]))


def central_differences(problem, base, r, c, zc, ev, h: np.ndarray | None = None,
                        threads: int | None = None):
    """Set entry c[k] of row base[k] (problem row r[k], value zc[k]) to zc[k] +- h[k] (default
    `step_for`) and evaluate both (`perturb`: `base` is not written to); returns (derivative,
    error bound, entries skipped).
    `ev` holds the unperturbed rows' values (`ChunkEval.take_rows`); `threads` for the row
    losses (default: the numpy kernel's). An elementwise loss evaluates the entries' own
    elements instead (`entry_losses`; `base` and `ev` are not read)."""
    h = step_for(zc) if h is None else h
    zp, zm = zc + h, zc - h
    if elementwise(problem):
        lp, lm = problem.entry_losses(r, c, zp), problem.entry_losses(r, c, zm)
        return _finish(problem, r, c, zp, zm, lp, lm, zc, None)
    lp, lm = perturbed_losses(problem, base, r, c, zp, zm, threads)
    return _finish(problem, r, c, zp, zm, lp, lm, zc, ev)


def perturbed_losses(problem, base: np.ndarray, r: np.ndarray, c: np.ndarray, zp: np.ndarray,
                     zm: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(loss_n at z + h, loss_n at z - h): row base[k] (problem row r[k]) evaluated whole
    with its entry c[k] set to zp[k], then to zm[k]."""
    return (row_losses(problem, base, r, threads, (c, zp)),
            row_losses(problem, base, r, threads, (c, zm)))


def row_losses(problem, z_rows: np.ndarray, rows: np.ndarray, threads: int | None = None,
               perturb: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """loss_n of `rows` at logits `z_rows` (`perturb`: see SoftmaxCE.evaluate_rows): on the
    numpy kernel in blocks of rows that stay in cache, on `threads` threads (default: its own;
    each row's loss is computed alone: the same bits in any block)."""
    step = max(1, BLOCK_ENTRIES // max(1, z_rows.shape[1]))

    def block(a: int, b: int) -> np.ndarray:
        part = {} if perturb is None else {"perturb": (perturb[0][a:b], perturb[1][a:b])}
        return problem.evaluate_rows(z_rows[a:b], rows[a:b], grad=False, **part).loss

    if problem.kernel is not None or z_rows.shape[0] <= step:
        return block(0, z_rows.shape[0])
    calls = ((a, a + step) for a in range(0, z_rows.shape[0], step))
    threads = numpy_threads(problem) if threads is None else threads
    return np.concatenate(list(ordered_map(block, calls, threads)))


def _finish(problem, rows, cols, zp, zm, lp, lm, zc, ev):
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = zp - zm  # NaN at -inf logits: skipped below
        fd = (lp - lm) / denom * problem.grad_scale
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if ev is None:  # one element's loss (`elementwise`)
            bound = problem.entry_fd_error_bound(rows, cols, zc, denom / 2.0, lp, lm)
        else:
            bound = problem.fd_error_bound(rows, cols, zc, denom / 2.0, ev)
    bad = ~np.isfinite(fd) | ~np.isfinite(zc) | ~np.isfinite(bound)
    fd = np.where(bad, np.nan, fd)
    bound = np.where(bad, np.nan, bound)
    return fd, bound, int(np.count_nonzero(bad))


def fd_full(problem, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every entry of rows [start, stop) by column sweeps: 2*C evaluations of the chunk (an
    `elementwise` loss: every element's own loss at z -+ h, 2 evaluations of the chunk)."""
    if elementwise(problem):
        # every element perturbed at once: each one's loss depends on its own logit alone
        # (the bits `entry_losses` gives it alone), so two evaluations of the chunk serve all
        zc = np.asarray(problem.z[start:stop], dtype=np.float64)
        h = step_for(zc)
        zp, zm = zc + h, zc - h
        r = np.arange(start, stop)
        lp, lm = (problem.evaluate_rows(v, r).per_element()[0] for v in (zp, zm))
        rows, cols = np.divmod(np.arange(zc.size), problem.n_classes)
        fd, bound, skipped = _finish(problem, rows + start, cols, zp.ravel(), zm.ravel(),
                                     lp.ravel(), lm.ravel(), zc.ravel(), None)
        return fd.reshape(zc.shape), bound.reshape(zc.shape), skipped
    base = np.asarray(problem.z[start:stop], dtype=np.float64).copy()
    r = np.arange(start, stop)
    swept = _full_by_steps(problem, base, r) if problem.kernel is not None else None
    if swept is not None:
        return swept
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
        f, b, s = _finish(problem, r, np.full(r.size, j), zp, zm, lp, lm, zc, ev)
        fd[:, j], bound[:, j] = f, b
        skipped += s
    return fd, bound, skipped


def _full_by_steps(problem, base: np.ndarray, r: np.ndarray):
    """`fd_full`'s sweeps on the compiled kernel: each row evaluated once, its 2C steps taken
    from its own sums (`steps`, the bits of the sweep's whole row; a step the kernel does not
    take is evaluated whole), FULL_STEPS of them a call. None when the kernel hands the
    rows back (the sweeps then run on the numpy kernel, as before)."""
    R, C = base.shape
    h = step_for(base)
    zp, zm = base + h, base - h
    fd, bound = np.empty((R, C)), np.empty((R, C))
    skipped = 0
    per = max(1, FULL_STEPS // (2 * C))
    cols = np.repeat(np.arange(C, dtype=np.int64), 2)  # each column's z + h, then z - h
    for a in range(0, R, per):
        b = slice(a, min(R, a + per))
        n = b.stop - a
        vals = np.stack([zp[b], zm[b]], axis=2).reshape(n, 2 * C)
        ev = problem.evaluate_rows(base[b], r[b], grad=False,
                                   steps=(np.broadcast_to(cols, (n, 2 * C)), vals))
        if ev.step_loss is None:
            return None
        lp, lm = ev.step_loss[:, 0::2].copy(), ev.step_loss[:, 1::2].copy()
        i, j = np.nonzero(np.isnan(lp) | np.isnan(lm))  # the steps the kernel did not take
        if i.size:
            lp[i, j], lm[i, j] = perturbed_losses(problem, base[b][i], r[b][i], j, zp[b][i, j],
                                                  zm[b][i, j])
        each = np.repeat(np.arange(n), C)  # entry k of the block: row k // C, column k % C
        f, e, s = _finish(problem, r[b][each], np.tile(np.arange(C), n), zp[b].ravel(),
                          zm[b].ravel(), lp.ravel(), lm.ravel(), base[b].ravel(),
                          ev.take_rows(each))
        fd[b], bound[b] = f.reshape(n, C), e.reshape(n, C)
        skipped += s
    return fd, bound, skipped




# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(frozen=True, eq=False)
class Directional:
    """Per-row directional checks: loss_n(z + u) - loss_n(z - u) against <g_n, (z + u) - (z - u)>."""

    fd: np.ndarray                # (R,) scale * (loss_n(z+) - loss_n(z-))
    ref: np.ndarray               # (R,) <reference gradient, delta>
    bound: np.ndarray             # (R,) bound on |fd - <true gradient, delta>|
    got: np.ndarray | None        # (R,) <your gradient, delta>
    got_bound: np.ndarray | None  # (R,) sum_c |delta_c| * tolerance_c of your entries


def random_steps(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """u = +-h per entry (Rademacher signs), h = eps^(1/3) * max(1, |z|); 0 at -inf logits."""
    signs = np.where(rng.random(z.shape) < 0.5, -1.0, 1.0)
    return step_for(z) * signs


def directional_difference(problem, rows: np.ndarray, z: np.ndarray, u: np.ndarray):
    """(loss(z + u) - loss(z - u)) * scale, the realised delta, and the difference's error bound."""
    zp, zm = z + u, z - u
    ep = problem.evaluate_rows(zp, rows, grad=False)
    em = problem.evaluate_rows(zm, rows, grad=False)
    with np.errstate(invalid="ignore"):
        delta = zp - zm
        delta[~np.isfinite(delta)] = 0.0  # -inf - -inf at masked logits: not perturbed
        fd = (ep.loss - em.loss) * problem.grad_scale
    return fd, delta, problem.directional_error_bound(ep, em, delta)


def directional_chunk(problem, start: int, stop: int, ref_grad: np.ndarray, rng: np.random.Generator,
                      got: np.ndarray | None = None, got_tol: np.ndarray | None = None) -> Directional:
    """One random direction per row of [start, stop): two loss evaluations cover every entry."""
    rows = np.arange(start, stop)
    z = np.array(problem.z[start:stop], dtype=np.float64)
    u = random_steps(z, rng)
    fd, delta, bound = directional_difference(problem, rows, z, u)
    absd = np.abs(delta)
    ref = np.einsum("ij,ij->i", ref_grad, delta)
    # the reference's own rounding, summed along the direction
    bound = bound + 4.0 * EPS * (1.0 + np.log2(problem.n_classes)) * np.einsum("ij,ij->i", np.abs(ref_grad), absd)
    dot = dot_bound = None
    if got is not None:
        dot = np.einsum("ij,ij->i", np.asarray(got, dtype=np.float64), delta)
        dot_bound = np.einsum("ij,ij->i", got_tol, absd) if got_tol is not None else np.zeros(rows.size)
    bad = ~np.isfinite(fd) | np.isnan(ref)
    if bad.any():  # rows with an infinite loss (a masked target) or a 0/0 mean cannot be probed
        fd = np.where(bad, ref, fd)
    return Directional(fd, ref, bound, dot, dot_bound)


def localize(problem, row: int, got_row: np.ndarray, tol_row: np.ndarray, seed: int) -> tuple[int | None, int]:
    """Bisection over column blocks of one failing row: the block whose directional check fails
    holds the bad entry. Returns (column or None, row-loss evaluations used): 4 per halving."""
    z = np.array(problem.z[row:row + 1], dtype=np.float64)
    u_all = random_steps(z, np.random.default_rng(seed))
    rows = np.array([row])
    lo, hi = 0, problem.n_classes
    evaluations = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ratios = []
        for a, b in ((lo, mid), (mid, hi)):
            u = np.zeros_like(u_all)
            u[:, a:b] = u_all[:, a:b]
            fd, delta, bound = directional_difference(problem, rows, z, u)
            evaluations += 2
            dot = float(np.dot(got_row[a:b], delta[0, a:b]))
            allowed = 2.0 * float(bound[0]) + float(np.dot(tol_row[a:b], np.abs(delta[0, a:b])))
            err = abs(float(fd[0]) - dot)
            ratios.append(err / allowed if allowed > 0 else (np.inf if err > 0 else 0.0))
        if max(ratios) <= 1.0:
            return None, evaluations
        lo, hi = (lo, mid) if ratios[0] >= ratios[1] else (mid, hi)
    return lo, evaluations
