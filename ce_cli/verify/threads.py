"""Row blocks of the numpy kernel on a thread pool.

numpy releases the GIL inside every ufunc, so blocks of rows evaluated on several threads run
at once. Results come back in submission order, so whatever folds them sees the same sequence
(and computes the same bits) for any number of threads. The compiled kernel shares each call's
rows among threads of its own: problems it serves run here on one thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import Future

from ce_cli.kernels.compiled import cpu_count, default_threads

T = TypeVar("T")

POOL_BYTES = 128 << 20  # the chunks in flight at once, all threads together
CHUNK_BYTES_PER_ENTRY = 128  # a chunk's float64 temporaries (BCE: ~16 arrays of its size)


def numpy_threads(problem: Any) -> int:
    """Threads for `problem`'s row blocks: CE_CHECK_THREADS (default: the cores this process may
    use) on the numpy kernel, at most those cores (more threads than cores only hand the GIL
    and the cores round: 4096x32000 grad on 2 cores took 1.7 s at 8 threads, 0.73 s at 2), and 1
    when the compiled kernel serves it."""
    if getattr(problem, "kernel", None) is not None:
        return 1
    return max(1, min(default_threads(), cpu_count()))


def pool_plan(n_classes: int, elements: int, threads: int) -> tuple[int, int]:
    """(entries per chunk, threads) for `threads` asked: the 2 * threads chunks in flight stay
    within POOL_BYTES - smaller chunks first (down to one row), then fewer threads - so peak
    memory does not grow with the thread count."""
    if threads <= 1:
        return elements, 1
    per_entry = 2 * threads * CHUNK_BYTES_PER_ENTRY
    elements = min(elements, max(n_classes, POOL_BYTES // per_entry, 1))
    rows_entries = max(n_classes, elements - elements % max(1, n_classes))
    return elements, max(1, min(threads, POOL_BYTES // (2 * CHUNK_BYTES_PER_ENTRY * rows_entries)))


def ordered_map(fn: Callable[..., T], calls: Iterable[tuple], threads: int) -> Iterator[T]:
    """fn(*args) for each args of `calls`, yielded in order. With threads > 1, every threads-th
    call runs on the calling thread and the others on a pool of threads - 1 (so `threads`
    threads work, and none only waits and wakes to hand over results), at most 2 * threads calls
    ahead of the one yielded (memory stays a few blocks per thread); an exception is raised
    where its call would have been yielded."""
    if threads <= 1:
        for args in calls:
            yield fn(*args)
        return
    from concurrent.futures import ThreadPoolExecutor  # ~5 ms of imports: only when a pool runs
    with ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="ce-check-rows") as pool:
        ahead: deque[tuple[Future[T] | None, tuple]] = deque()
        queued = enumerate(calls)

        def fill() -> None:
            for k, args in queued:
                here = k % threads == threads - 1
                ahead.append((None, args) if here else (pool.submit(fn, *args), ()))
                if len(ahead) >= 2 * threads:
                    return

        try:
            fill()
            while ahead:
                future, args = ahead.popleft()
                fill()  # the pool's queue stays full while this thread works
                yield fn(*args) if future is None else future.result()
        finally:
            for pending, _args in ahead:
                if pending is not None:
                    pending.cancel()
