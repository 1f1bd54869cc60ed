"""Row blocks of the numpy kernel on a thread pool.

numpy releases the GIL inside every ufunc, so blocks of rows evaluated on several threads run
at once. Results come back in submission order, so whatever folds them sees the same sequence
(and computes the same bits) for any number of threads. The compiled kernel shares each call's
rows among threads of its own: problems it serves run here on one thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from ce_cli.kernels.compiled import default_threads

T = TypeVar("T")


def numpy_threads(problem: Any) -> int:
    """Threads for `problem`'s row blocks: CE_CHECK_THREADS (default: the cores this process may
    use) on the numpy kernel, 1 when the compiled kernel serves it."""
    return default_threads() if getattr(problem, "kernel", None) is None else 1


def ordered_map(fn: Callable[..., T], calls: Iterable[tuple], threads: int) -> Iterator[T]:
    """fn(*args) for each args of `calls`, yielded in order. With threads > 1 on a pool, at most
    2 * threads calls ahead of the one yielded (memory stays a few blocks per thread); an
    exception is raised where its call would have been yielded."""
    if threads <= 1:
        for args in calls:
            yield fn(*args)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ce-check-rows") as pool:
        ahead: deque[Future[T]] = deque()
        try:
            for args in calls:
                ahead.append(pool.submit(fn, *args))
                if len(ahead) >= 2 * threads:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for pending in ahead:
                pending.cancel()
