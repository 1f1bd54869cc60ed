"""The numpy kernel's row chunks on a thread pool (CE_CHECK_FUSED=0, CE_CHECK_THREADS): the
report - verdict, counts, worst entries in order, loss to the last bit - is the same for every
thread count, because chunks are folded into the comparison in row order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ce_cli.verify.checks import check_binary, check_grad, reference

THREADS = (1, 2, 3, 5)


@pytest.fixture(autouse=True)
def _many_cores(monkeypatch):
    """The pool runs every thread count asked for, however many cores this machine has."""
    from ce_cli.verify import threads
    monkeypatch.setattr(threads, "cpu_count", lambda: 64)


def test_no_more_threads_than_cores(monkeypatch):
    """CE_CHECK_THREADS above the cores this process may use: one thread a core."""
    from types import SimpleNamespace

    from ce_cli.verify import threads
    problem = SimpleNamespace(kernel=None)  # the numpy kernel serves it
    monkeypatch.setenv("CE_CHECK_THREADS", "8")
    monkeypatch.setattr(threads, "cpu_count", lambda: 3)
    assert threads.numpy_threads(problem) == 3
    monkeypatch.setenv("CE_CHECK_THREADS", "2")
    assert threads.numpy_threads(problem) == 2
    assert threads.numpy_threads(SimpleNamespace(kernel=object())) == 1  # compiled: its own


def _case(kind: str, dtype, n: int, c: int, seed: int, bad: int):
    """Logits, labels and a gradient with `bad` planted errors (some NaN) of the given kind."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * rng.choice([0.5, 4.0, 30.0], size=(n, 1))).astype(dtype)
    z64 = z.astype(np.float64)
    if kind == "binary":
        y = (rng.random((n, c)) < 0.2).astype(dtype)
        g = (1.0 / (1.0 + np.exp(-z64)) - y) / y.size
    elif kind == "probs":
        y = rng.dirichlet(np.full(c, 0.5), n)
        g = reference(z64, y).grad
    else:
        y = rng.integers(0, c, n)
        g = reference(z64, y, label_smoothing=0.1).grad
    g = g.astype(dtype)
    for k in range(bad):
        r, col = rng.integers(0, n), rng.integers(0, c)
        g[r, col] = np.nan if k % 4 == 3 else g[r, col] * (1.0 + 10.0 ** -rng.integers(1, 6))
    return z, y, g


def _report(kind: str, z, y, g, threads: int, monkeypatch, **kw) -> dict:
    monkeypatch.setenv("CE_CHECK_FUSED", "0")
    monkeypatch.setenv("CE_CHECK_THREADS", str(threads))
    if kind == "binary":
        rep = check_binary(z, y, grad=g, **kw)
    else:
        extra = {"label_smoothing": 0.1} if kind == "index" else {}
        rep = check_grad(z, y, grad=g, **extra, **kw)
    assert rep.options["kernel"] == "numpy"
    return _exact(dataclasses.asdict(rep))


def _exact(value):
    """Floats as their exact hex form (NaN equals NaN), containers walked."""
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_exact(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value).hex()
    return value


@pytest.mark.parametrize("kind", ["index", "probs", "binary"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_thread_count_gives_the_same_report(kind, dtype, monkeypatch):
    z, y, g = _case(kind, dtype, 61, 97, seed=5, bad=9)
    # 3 rows a chunk: 21 chunks, more than any pool's look-ahead
    reports = [_report(kind, z, y, g, t, monkeypatch, chunk_elements=300, worst=6, fd="sample")
               for t in THREADS]
    assert not reports[0]["ok"]
    for t, rep in zip(THREADS[1:], reports[1:]):
        assert rep == reports[0], f"{t} threads"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["index", "probs", "binary"]), dtype=st.sampled_from(["float32", "float64"]),
       n=st.integers(1, 40), c=st.integers(1, 60), seed=st.integers(0, 2**32 - 1),
       bad=st.integers(0, 12), chunk=st.integers(1, 400), threads=st.sampled_from(THREADS[1:]))
def test_thread_counts_agree_property(monkeypatch, kind, dtype, n, c, seed, bad, chunk, threads):
    z, y, g = _case(kind, np.dtype(dtype), n, c, seed, bad)
    kw = dict(chunk_elements=chunk, worst=4, fd="off")
    assert _report(kind, z, y, g, threads, monkeypatch, **kw) == _report(kind, z, y, g, 1, monkeypatch, **kw)


def test_first_bad_row_is_reported_at_any_thread_count(monkeypatch):
    """An input error in a later chunk: the same message (the first bad row) for every count."""
    from ce_cli.errors import CeCheckError
    z, y, g = _case("index", np.float64, 50, 20, seed=1, bad=0)
    z[31, 4] = np.nan
    z[44, 2] = np.inf
    messages = set()
    for t in THREADS:
        with pytest.raises(CeCheckError) as err:
            _report("index", z, y, g, t, monkeypatch, chunk_elements=40)
        messages.add(str(err.value))
    assert len(messages) == 1 and "31" in messages.pop()


@pytest.mark.parametrize("kind", ["index", "probs", "binary"])
def test_finite_difference_row_blocks(kind, monkeypatch):
    """The perturbed rows of finite differences go in cache-sized blocks to the threads: the
    same bits at every thread count, and (index targets, binary: row sums of their own) the
    bits of one call over all rows (probability targets' q . z, an einsum, may sum in another
    order for another block shape)."""
    from ce_cli.models.sigmoid import build_sigmoid_bce
    from ce_cli.models.softmax import build_softmax_ce
    from ce_cli.verify import finite_diff
    monkeypatch.setenv("CE_CHECK_FUSED", "0")
    monkeypatch.setattr(finite_diff, "BLOCK_ENTRIES", 1000)
    z, y, _g = _case(kind, np.float32, 45, 170, seed=2, bad=0)
    z[3, :5] = -np.inf
    problem = (build_sigmoid_bce(z, y) if kind == "binary" else build_softmax_ce(z, y))[0]
    rows = np.arange(45)[::-1].copy()
    base = np.asarray(z[rows], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        whole = problem.evaluate_rows(base, rows, grad=False).loss
    runs = []
    for t in THREADS:
        monkeypatch.setenv("CE_CHECK_THREADS", str(t))
        with np.errstate(invalid="ignore"):
            runs.append(finite_diff.row_losses(problem, base, rows).view(np.uint64))
        np.testing.assert_array_equal(runs[-1], runs[0], err_msg=f"{t} threads")
    if kind != "probs":
        np.testing.assert_array_equal(runs[0], whole.view(np.uint64))


@settings(max_examples=200, deadline=None)
@given(n_classes=st.integers(1, 1 << 23), elements=st.integers(1, 1 << 22), threads=st.integers(1, 512))
def test_pool_plan_bounds_memory_in_flight(n_classes, elements, threads):
    """However many threads are asked for, the 2 * threads chunks in flight (each at least one
    row) fit POOL_BYTES, or a single thread runs; chunks never grow."""
    from ce_cli.verify.threads import CHUNK_BYTES_PER_ENTRY, POOL_BYTES, pool_plan
    step, used = pool_plan(n_classes, elements, threads)
    assert 1 <= used <= threads and step <= elements
    rows = max(1, step // n_classes)
    assert used == 1 or 2 * used * rows * n_classes * CHUNK_BYTES_PER_ENTRY <= POOL_BYTES


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(st.sampled_from([0.0, 1.5, 2.0, 1e-300, np.inf, np.nan, 7.25]),
                              min_size=1, max_size=9), min_size=1, max_size=6).filter(
                                  lambda r: len({len(x) for x in r}) <= 1))
def test_row_maxima_skip_nan_like_fmax(rows):
    """The comparison's row maxima (plain max, fmax only where a NaN met it): fmax's bits."""
    from ce_cli.verify.compare import _fmax_rows
    a = np.array(rows, dtype=np.float64)
    want = np.fmax.reduce(a, axis=1)
    np.testing.assert_array_equal(_fmax_rows(a).view(np.uint64), want.view(np.uint64))


@pytest.mark.parametrize("kind", ["index", "binary"])
def test_console_script_same_json_at_any_thread_count(kind, tmp_path):
    """The installed `ce-check` with the numpy kernel: --json byte for byte the same at
    CE_CHECK_THREADS=1 and 3 (a 300 x 1500 check streams in 4 chunks of 75 rows)."""
    from tests.conftest import run_script, save, script_env
    z, y, g = _case(kind, np.float32, 300, 1500, seed=7, bad=5)
    args = ["binary" if kind == "binary" else "grad", save(tmp_path, "z.npy", z),
            save(tmp_path, "y.npy", y), "--grad", save(tmp_path, "g.npy", g), "--json"]
    if kind == "index":
        args += ["--label-smoothing", "0.1"]
    outs = [run_script(args, env=script_env(CE_CHECK_FUSED="0", CE_CHECK_THREADS=str(t)))
            for t in (1, 3)]
    assert outs[0].returncode == 1 and b'"kernel": "numpy"' in outs[0].stdout
    assert outs[1].stdout == outs[0].stdout


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 9), cols=st.integers(1, 30),
       chunks=st.integers(1, 8), worst=st.integers(0, 6), lag=st.integers(0, 4),
       dtype=st.sampled_from(["float16", "float32", "float64"]))
def test_compacted_chunks_fold_like_full_ones(seed, rows, cols, chunks, worst, lag, dtype):
    """A chunk measured ahead keeps only the rows its fold may open (row maximum over 1 or over
    `open_above` as read `lag` folds before, as a thread ahead sees it): every statistic, count
    and worst entry as when the whole chunk is folded, with the row allowances at work."""
    from ce_cli.verify.allowance import RowAllowance
    from ce_cli.verify.compare import Comparison
    from ce_cli.verify.tolerance import resolve_tolerance
    rng = np.random.default_rng(seed)
    tol = resolve_tolerance(np.dtype(dtype))

    def comparison():
        return Comparison("c", tol, lambda r, c: (r, c), n_worst=worst,
                          allowance=RowAllowance(tol, cols, 1.0, None, None, False))

    full, lean = comparison(), comparison()
    seen: list[float] = []
    for k in range(chunks):
        ref = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 3, (rows, 1))
        got = ref.astype(dtype)  # rounding: ratios below 1, all different
        bad = rng.random((rows, cols)) < 0.05
        got[bad] *= 1 + 10.0 ** -rng.integers(1, 9, np.count_nonzero(bad))
        got[rng.random((rows, cols)) < 0.01] = np.nan
        floor = np.abs(ref) * 1e-7
        seen.append(lean.open_above)
        m = lean.measure(ref, got, floor).compact(seen[max(0, k - lag)])
        full.update(k * rows, ref, got, floor)
        lean.fold(k * rows, m)
    assert _exact(dataclasses.asdict(lean.result())) == _exact(dataclasses.asdict(full.result()))


def test_compaction_lets_rows_go():
    """Past the first chunks, a chunk that only rounds keeps few of its rows' entries; a failing
    row is always kept."""
    from ce_cli.verify.compare import Comparison
    from ce_cli.verify.tolerance import resolve_tolerance
    rng = np.random.default_rng(3)
    cmp = Comparison("c", resolve_tolerance(np.dtype(np.float32)), lambda r, c: (r, c), n_worst=5)
    kept = []
    for k in range(6):
        ref = rng.standard_normal((40, 50))
        got = ref.astype(np.float32)
        got[7, 3] = 2.0 * ref[7, 3] + 1.0
        m = cmp.measure(ref, got).compact(cmp.open_above)
        kept.append(m.kept)
        cmp.fold(40 * k, m)
    assert kept[0] is None and all(7 in r for r in kept[1:])
    assert all(r.size < 10 for r in kept[1:])


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_ordered_map_works_on_the_calling_thread_too(threads):
    """`threads` threads work, the caller one of them: results in call order, and a failing
    call raises where it would have been yielded, after the earlier ones."""
    import threading
    import time

    from ce_cli.verify.threads import ordered_map
    caller = threading.get_ident()

    def call(k: int):
        time.sleep(0.002 * ((k * 7) % 3))  # finish out of order
        if k == 23:
            raise ValueError("call 23")
        return k, threading.get_ident()

    got = []
    with pytest.raises(ValueError, match="call 23"):
        for k, who in ordered_map(call, ((k,) for k in range(40)), threads):
            got.append((k, who))
    assert [k for k, _ in got] == list(range(23))
    assert any(who == caller for _, who in got)
    assert len({who for _, who in got} - {caller}) <= threads - 1


def test_ordered_map_caller_takes_what_workers_have_not_started():
    """Instead of waiting for the next result, the caller runs the earliest call no worker has
    started: when the workers are slow it does most of the calls (none is run twice)."""
    import threading
    import time

    from ce_cli.verify.threads import ordered_map
    caller = threading.get_ident()
    runs: list[int] = []

    def call(k: int):
        runs.append(k)
        if threading.get_ident() != caller:
            time.sleep(0.01)
        return k, threading.get_ident()

    got = list(ordered_map(call, ((k,) for k in range(30)), 2))
    assert [k for k, _ in got] == list(range(30)) and sorted(runs) == list(range(30))
    assert sum(who == caller for _, who in got) > 15
