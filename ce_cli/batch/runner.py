"""`ce-check batch`: running the cases of a manifest through the library, one at a time or in a
pool of worker processes, and the exit status of a run. Nothing here prints."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from typing import Any

import numpy as np

from ce_cli.batch.manifest import ERROR, FAIL, LINEAR, PASS, Case, CaseResult, CaseSpec
from ce_cli.enums import Kind
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.io.inputs import VECTOR_ROLES, load_all
from ce_cli.verify.checks import check_binary, check_grad
from ce_cli.verify.linear import check_linear
from ce_cli.verify.results import Report

Task = Callable[[Case], CaseResult]


def run_case(case: Case) -> CaseResult:
    """Run one case through the library. Bad input becomes an `error` result with its one-line
    message; an unexpected exception too, flagged `internal` (re-raised with CE_CHECK_DEBUG=1)."""
    if isinstance(case, CaseResult):
        return case
    start = time.perf_counter()

    def result(status: str, report: Report | None = None, error: str | None = None,
               internal: bool = False) -> CaseResult:
        return CaseResult(name=case.name, line=case.line, kind=case.kind, status=status,
                          report=report, error=error, internal=internal,
                          seconds=time.perf_counter() - start)

    try:
        report = _run(case)
    except CeCheckError as exc:
        return result(ERROR, error=_one_line(exc))
    except MemoryError:
        return result(ERROR, error="out of memory", internal=True)
    except Exception as exc:
        if os.environ.get("CE_CHECK_DEBUG"):
            raise
        return result(ERROR, internal=True, error=(
            f"internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(set CE_CHECK_DEBUG=1 for the traceback; please report it)"))
    return result(PASS if report.ok else FAIL, report=report)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _run(case: CaseSpec) -> Report:
    if case.kind == LINEAR:
        loaded = load_all(case.inputs, vectors=("bias", "grad_bias", "class_weight"), pipes=False)
        given: dict[str, Any] = dict(loaded.arrays)
        with np.errstate(all="ignore"):
            return check_linear(**given, sources=loaded.sources, **case.settings)
    loaded = load_all(case.inputs, vectors=VECTOR_ROLES[Kind(case.kind)], pipes=False)
    arrays: dict[str, Any] = dict(loaded.arrays)
    logits, labels = arrays.pop("logits"), arrays.pop("labels")
    check: Callable[..., Report] = check_grad if case.kind == Kind.multiclass.value else check_binary
    with np.errstate(all="ignore"):  # over/underflow is expected and handled
        return check(logits, labels, **arrays, sources=loaded.sources, **case.settings)


def run_cases(cases: list[Case], *, jobs: int = 1, fail_fast: bool = False,
              executor_factory: Callable[[int], Executor] | None = None,
              task: Task | None = None) -> Iterator[CaseResult]:
    """Run `cases`, yielding results in manifest order as soon as each one and all before it are
    done; up to `jobs` cases run at once.

    `jobs` = 1 runs the cases in one worker thread of this process; `jobs` > 1 in a pool of
    `jobs` processes (threads do not scale: the finite-difference sweeps loop in Python, under
    the GIL). Either way a case runs off its process's main thread: with glibc the main thread's
    heap returns the check's 1 MB chunk buffers to the kernel after each use and faults them
    back in, which made a 256x500 case 3 to 5 times slower; a thread's arena keeps them.
    `executor_factory(jobs)` replaces the executor (tests use threads to watch the scheduling)
    and `task` the function run per case.

    A worker process that dies (killed, out of memory, a crash in native code) breaks the pool:
    a fresh pool runs the cases not yet finished, each case that was running then alone in a
    pool of its own, so only a case that kills its worker on its own is an internal error.

    With `fail_fast` no case is started after a fail or error has been seen (running ones
    finish and are yielded); the cases never started are not yielded: the results are always
    a prefix of `cases`. Ctrl-C stops the workers at once.
    """
    jobs = max(1, min(jobs, len(cases)))
    factory = executor_factory or _default_executor
    default_task = run_case if executor_factory is not None or jobs == 1 else run_case_off_main_thread
    schedule = _Schedule(cases, factory, task or default_task, jobs=jobs, fail_fast=fail_fast)
    try:
        yield from schedule
    except BaseException:
        schedule.shutdown(wait=False)
        raise
    schedule.shutdown(wait=True)


def _default_executor(jobs: int) -> Executor:
    if jobs == 1:
        return _DaemonThread()
    return ProcessPoolExecutor(max_workers=jobs, initializer=_ignore_sigint)


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent (which stops them): no traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _DaemonThread(Executor):
    """One daemon worker thread: a case stuck in a system call cannot keep ce-check from
    exiting on Ctrl-C (a ThreadPoolExecutor's thread is joined at exit)."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="ce-check", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # handed to the waiting thread
                    fut.set_exception(exc)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self.queue.put((fut, functools.partial(fn, **kwargs) if kwargs else fn, args))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.queue.put(None)
        if wait:
            self.thread.join()


class _Schedule:
    """Submits cases while fewer than `jobs` run, collects them as they finish, and hands
    them on in manifest order (see `run_cases`)."""

    def __init__(self, cases: list[Case], factory: Callable[[int], Executor], task: Task, *,
                 jobs: int, fail_fast: bool) -> None:
        self.cases, self.factory, self.task = cases, factory, task
        self.executor = factory(jobs)
        self.jobs, self.fail_fast = jobs, fail_fast
        self.results: dict[int, CaseResult] = {}
        self.pending: dict[Future[CaseResult], int] = {}
        self.retry: list[int] = []  # cases running when a worker died: each rerun alone
        self.submitted = 0
        self.stop = False

    def __iter__(self) -> Iterator[CaseResult]:
        emitted = 0
        while True:
            self._submit()
            if emitted not in self.results and self.pending:
                self._collect()
            while emitted in self.results:
                yield self.results.pop(emitted)
                emitted += 1
            if emitted == self.submitted and not self.retry and \
                    (self.stop or self.submitted == len(self.cases)):
                return

    def _record(self, index: int, result: CaseResult) -> None:
        self.results[index] = result
        self.stop = self.stop or (self.fail_fast and result.status != PASS)

    def _submit(self) -> None:
        while self.retry and not self.pending:
            self._run_alone(self.retry.pop(0))
        while not self.retry and not self.stop and self.submitted < len(self.cases) \
                and len(self.pending) < self.jobs:
            index, case = self.submitted, self.cases[self.submitted]
            self.submitted += 1
            if isinstance(case, CaseResult):  # an invalid line: nothing to run
                self._record(index, case)
                continue
            try:
                self.pending[self.executor.submit(self.task, case)] = index
            except BrokenExecutor:  # a worker process died: start afresh, this one first
                self._restart()
                self.retry.append(index)

    def _run_alone(self, index: int) -> None:
        """Rerun a case that was running when a worker died, in a pool of its own."""
        case = self.cases[index]
        alone = self.factory(1)
        try:
            result = _outcome(alone.submit(self.task, case), case)
        finally:
            alone.shutdown(wait=True, cancel_futures=True)
        self._record(index, result)

    def _collect(self) -> None:
        done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
        broken = False
        for fut in done:
            index = self.pending.pop(fut)
            if isinstance(fut.exception(), BrokenExecutor):
                broken = True
                self.retry.append(index)
            else:
                self._record(index, _outcome(fut, self.cases[index]))
        if broken:  # every other running case is lost with the pool: rerun them too
            self.retry.extend(self.pending.values())
            self.pending.clear()
            self.retry.sort()
            self._restart()

    def _restart(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self.factory(self.jobs)

    def shutdown(self, *, wait: bool) -> None:
        """Stop the executor; without `wait` (Ctrl-C) its worker processes are killed."""
        if not wait:
            for proc in list((getattr(self.executor, "_processes", None) or {}).values()):
                with contextlib.suppress(OSError, AttributeError):
                    proc.kill()
        self.executor.shutdown(wait=wait, cancel_futures=True)


_worker_thread: ThreadPoolExecutor | None = None


def run_case_off_main_thread(case: Case) -> CaseResult:
    """`run_case` in a worker process, on a thread of its own (see `run_cases`)."""
    global _worker_thread
    if _worker_thread is None:
        _worker_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ce-check")
    return _worker_thread.submit(run_case, case).result()


def _outcome(fut: Future[CaseResult], case: Case) -> CaseResult:
    try:
        return fut.result()
    except Exception as exc:  # the worker process died on its own, or CE_CHECK_DEBUG
        if os.environ.get("CE_CHECK_DEBUG"):
            raise
        return _crashed(case, exc)


def _crashed(case: Case, exc: BaseException) -> CaseResult:
    return CaseResult(name=case.name, line=case.line, kind=case.kind, status=ERROR, internal=True,
                      error=f"internal error: {type(exc).__name__}: {_one_line(exc)} "
                            "(the worker process died running this case, alone; please report it)")


def exit_status(results: Iterable[CaseResult]) -> ExitCode:
    """3 if a case hit an internal error, else 2 if any case is an error, 1 if any failed, else 0."""
    results = list(results)
    if any(r.internal for r in results):
        return ExitCode.INTERNAL_ERROR
    if any(r.status == ERROR for r in results):
        return ExitCode.USAGE_OR_INPUT_ERROR
    return ExitCode.CHECK_FAILED if any(r.status == FAIL for r in results) else ExitCode.OK
