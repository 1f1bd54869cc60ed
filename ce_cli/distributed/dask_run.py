"""Shard tasks on Dask (`dask.distributed`): the `Mapper` of `ce_cli.verify.shards` as futures.

Every step is a task per shard that reads its shard where it is (a local path on a shared file
system, an fsspec URL); only shapes, denominators and reports come back to the client. The
vocabulary's global lse is merged in a task on the cluster and handed to the pass-2 tasks as a
future, so the per-row statistics never travel through the client either.

Faults: a worker lost mid-run has its tasks rerun by the scheduler (results are pure functions of
the files: the report does not change); a task that raises (a shard that fails to load) cancels
every other task of the run and re-raises here, naming the shard; Ctrl-C (KeyboardInterrupt)
cancels the run's tasks before it propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ce_cli.errors import CeCheckError
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.shards import NO_INPUTS, BatchInputs, ShardedReport, ShardFiles, run_shards
from ce_cli.verify.shards.linear_run import LinearBatch, run_linear_shards


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise CeCheckError("`scheduler`/`workers`: need Dask; pip install 'ce-check[dask]'") from None
    return distributed


class DaskMapper:
    """`map` and `reduce` as tasks on `client`; every future it made is cancelled on failure."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.futures: list[Any] = []

    def map(self, fn: Callable[..., Any], items: Sequence[Any], shared: tuple = (),
            progress: Callable[[int, int], None] | None = None) -> list:
        futures = self._submit(fn, items, shared)
        distributed = _distributed()
        done = 0
        try:
            for future in distributed.as_completed(futures):
                if future.status == "error":
                    future.result()  # raises the task's exception here
                done += 1
                if progress is not None:
                    progress(done, len(futures))
            return self.client.gather(futures)
        except BaseException:
            self.cancel()
            raise

    def reduce(self, fn: Callable[..., Any], items: Sequence[Any],
               combine: Callable[[list], Any]) -> Any:
        parts = self._submit(fn, items, ())
        merged = self.client.submit(combine, parts, pure=False)
        self.futures.append(merged)
        try:
            merged.result()  # fail here (and name the shard) rather than in every pass-2 task
        except BaseException:
            self.cancel()
            raise
        return merged

    def _submit(self, fn: Callable[..., Any], items: Sequence[Any], shared: tuple) -> list:
        n = len(items)
        futures = self.client.map(fn, list(items), *[[s] * n for s in shared], pure=False)
        self.futures += futures
        return futures

    def cancel(self) -> None:
        if self.futures:
            self.client.cancel(self.futures, force=True)


@contextmanager
def dask_client(scheduler: str | None, workers: int | None) -> Iterator[Any]:
    """A client of the cluster at `scheduler`, or of a local cluster of `workers` processes
    (one thread each)."""
    distributed = _distributed()
    if scheduler is not None:
        with distributed.Client(scheduler) as client:
            yield client
        return
    if workers is None or workers < 1:
        raise CeCheckError(f"`workers`: must be at least 1, got {workers}")
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def run_on_dask(files: Sequence[ShardFiles], axis: str | None, options: CheckOptions, *,
                scheduler: str | None = None, workers: int | None = None, client: Any = None,
                progress: Callable[[int, int], None] | None = None,
                kind: str = "softmax", pos_weight: float | str | None = None,
                inputs: BatchInputs = NO_INPUTS) -> ShardedReport:
    """`run_shards` with every step a task per shard on a Dask cluster (or on `client`)."""
    if client is not None:
        return run_shards(files, axis, options, DaskMapper(client), progress, kind, pos_weight,
                          inputs)
    with dask_client(scheduler, workers) as own:
        return run_shards(files, axis, options, DaskMapper(own), progress, kind, pos_weight,
                          inputs)


def run_linear_on_dask(files: Sequence[ShardFiles], options: CheckOptions, batch: LinearBatch, *,
                       scheduler: str | None = None, workers: int | None = None,
                       client: Any = None, progress: Callable[[int, int], None] | None = None,
                       **kw: Any) -> ShardedReport:
    """`run_linear_shards` with every shard step a task on a Dask cluster (or on `client`)."""
    if client is not None:
        return run_linear_shards(files, options, batch, mapper=DaskMapper(client),
                                 progress=progress, **kw)
    with dask_client(scheduler, workers) as own:
        return run_linear_shards(files, options, batch, mapper=DaskMapper(own),
                                 progress=progress, **kw)
