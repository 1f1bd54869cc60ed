"""Row blocks of the numpy kernel on a thread pool.

numpy releases the GIL inside every ufunc, so blocks of rows evaluated on several threads run
at once. Results come back in submission order, so whatever folds them sees the same sequence
(and computes the same bits) for any number of threads. The compiled kernel shares each call's
rows among threads of its own: problems it serves run here on one thread.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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
    """fn(*args) for each args of `calls`, yielded in order. With threads > 1, calls go to a pool
    of threads - 1, at most 2 * threads ahead of the one yielded (memory stays a few blocks per
    thread), and the calling thread, instead of waiting for the next result, runs the earliest
    call no worker has started yet (so `threads` threads work, however the work divides between
    computing and folding results in); an exception is raised where its call would have been
    yielded."""
    if threads <= 1:
        for args in calls:
            yield fn(*args)
        return
    from concurrent.futures import ThreadPoolExecutor  # ~5 ms of imports: only when a pool runs
    with ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="ce-check-rows") as pool:
        ahead: deque[_Call[T]] = deque()
        queued = iter(calls)
        try:
            while True:
                for args in itertools.islice(queued, 2 * threads - len(ahead)):
                    ahead.append(_Call(pool.submit(fn, *args), fn, args))
                if not ahead:
                    return
                head = ahead[0]
                while not head.done():
                    spare = next((c for c in ahead if c.claim()), None)
                    if spare is None:
                        head.wait()
                    else:
                        spare.run_here()
                yield ahead.popleft().result()
        finally:
            for pending in ahead:
                pending.future.cancel()


class _Call(Generic[T]):
    """One call of `ordered_map`: on a worker (its future) or, claimed before a worker started
    it, on the calling thread."""

    def __init__(self, future: Future[T], fn: Callable[..., T], args: tuple) -> None:
        self.future, self.fn, self.args = future, fn, args
        self.claimed = self.ran = False
        self.value: Any = None
        self.error: Exception | None = None

    def claim(self) -> bool:
        """Take the call from the pool if no worker has started it (and run_here has not)."""
        if self.claimed or not self.future.cancel():
            return False
        self.claimed = True
        return True

    def run_here(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except Exception as exc:  # raised where the call is yielded, as a worker's would be
            self.error = exc  # (Ctrl-C and exits go up at once)
        self.ran = True

    def done(self) -> bool:
        return self.ran if self.claimed else self.future.done()

    def wait(self) -> None:
        from concurrent.futures import wait
        wait([self.future])

    def result(self) -> T:
        if not self.claimed:
            return self.future.result()
        if self.error is not None:
            raise self.error
        return self.value
