"""`verify`: the checks every loss model shares, as one streaming pass over row chunks.

Each chunk is evaluated once (the reference loss, gradient and error floor; your gradient is
compared on the way), then handed to the stages the inputs and the finite-difference mode call
for (stages.py). When no stage needs the (R, C) reference gradient, the compiled kernel
evaluates and compares in one sweep without materialising it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.bfloat16 import as_array, row_block
from ce_cli.kernels.allocator import keep_chunk_buffers
from ce_cli.kernels.base import ChunkEval, required
from ce_cli.kernels.compiled import use_threads
from ce_cli.verify.compare import Measured
from ce_cli.verify.finite_diff import choose_mode, elementwise
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, InputInfo, Report, verdict_line
from ce_cli.verify.stages import (Chunk, DirectionalStage, FullFDStage, GradStage, LossStage,
                                  LossTotal, OutGradStage, ProgressStage, SampledFDStage, Stage,
                                  UserGrad, computed_16, semantic_stages)
from ce_cli.verify.threads import numpy_threads, ordered_map, pool_plan
from ce_cli.verify.tolerance import Tolerance

# float64 entries per row chunk: the chunk's ~10 buffers live in L3 either way (2 MB of L2 a core
# here); 2 MB buffers halve the Python and GIL hand-overs per entry (4096x32000 grad: 1 thread
# 0.75 -> 0.69 s, 2 threads 0.60 -> 0.48 s against 1 MB); at 4 MB numpy asks for huge pages and
# every chunk's fresh buffers are zeroed again
CHUNK_ELEMENTS = 1 << 18
# the compiled kernel keeps one row in cache: chunks bound the copies it makes of rows it cannot
# read in place (16 MB) and, when it makes none, only the calls (4096x32000 grad: 64 -> 4 calls,
# the Python between them and the threads' start and join)
FUSED_CHUNK_ELEMENTS = 1 << 21
IN_PLACE_CHUNK_ELEMENTS = 1 << 25


def row_chunks(n_rows: int, n_classes: int, elements: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    step = max(1, elements // max(1, n_classes))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(frozen=True, eq=False)
class Inputs:
    """The user's arrays of one check and how to name them in messages (`sources` by role)."""

    logits: np.ndarray
    labels: np.ndarray
    grad: Any = None
    loss: Any = None
    sources: dict[str, str] = field(default_factory=dict)
    lse: Any = None            # the per-row lse your kernel returns (compared)
    z_loss_value: Any = None   # the z-loss your kernel returns on its own (compared)


@dataclass(frozen=True)
class Run:
    """What a check adds around the pipeline: its kind, the report's `options` echo, extra
    checks (the two-class bridge), where to write the reference gradient, a progress callback."""

    kind: str
    report_options: dict[str, Any]
    extra_checks: tuple[CheckResult, ...] = ()
    out_grad: str | Path | None = None
    progress: Callable[[int, int], None] | None = None
    stages: tuple[Stage, ...] = ()  # the caller's own stages (a shard's share of the batch's sums)


def verify(problem, warnings: list[str], inputs: Inputs, options: CheckOptions, run: Run) -> Report:
    """Stream `problem`'s rows through the stages, then assemble the `Report`, on
    `options.threads` kernel threads."""
    with use_threads(options.threads):
        return _verify(problem, warnings, inputs, options, run)


def _verify(problem, warnings: list[str], inputs: Inputs, options: CheckOptions, run: Run) -> Report:
    keep_chunk_buffers()
    mode = choose_mode(options.fd.value, problem.n_rows, problem.n_classes, elementwise(problem))
    user = _user_grad(problem, inputs, options)
    stages, grad_stage = _stages(problem, inputs, options, run, mode, user)
    total = stages[0]
    assert isinstance(total, LossTotal)
    _stream(problem, stages, grad_stage, user, options.chunk_elements)
    ranked = [r for stage in stages for r in stage.finish()]
    ranked += [(5, c) for c in run.extra_checks]
    checks = tuple(c for _, c in sorted(ranked, key=lambda rc: rc[0]))
    ok = all(c.ok for c in checks)
    diagnosis = grad_stage.diagnosis if grad_stage is not None else ()
    skipped = sum(getattr(s, "skipped", 0) for s in stages)
    if skipped:
        warnings.append(f"finite differences skipped {skipped} entries at -inf logits, at "
                        "logits too large to perturb or in rows whose loss is infinite")
    return Report(
        kind=run.kind,
        ok=ok,
        loss=float(problem.reduce(total.total())),
        loss_per_sample_shape=problem.per_sample_shape if problem.reduction == "none" else None,
        shape=tuple(inputs.logits.shape),
        n_rows=problem.n_rows,
        n_classes=problem.n_classes,
        n_ignored=int(problem.n_rows - np.count_nonzero(problem.valid)),
        reduction=problem.reduction,
        target_kind=problem.target_kind,
        checks=checks,
        inputs=_input_infos(inputs),
        warnings=tuple(warnings),
        fd_mode=mode,
        fd_evaluations=sum(getattr(s, "evaluations", 0) for s in stages),
        options={**run.report_options, "precision": user.tol.precision if user else None,
                 "kernel": problem.kernel_name},
        diagnosis=diagnosis,
        verdict=verdict_line(ok, checks, diagnosis),
    )


def _stages(problem, inputs: Inputs, options: CheckOptions, run: Run, mode: str,
            user: UserGrad | None) -> tuple[list[Stage], GradStage | None]:
    """The stages for this check, LossTotal first."""
    total = LossTotal(problem.n_rows)
    stages: list[Stage] = [total]
    grad_stage = GradStage(problem, user, options.worst) if user is not None else None
    if grad_stage is not None:
        stages.append(grad_stage)
    loss = _user_loss(problem, inputs, options)
    if loss is not None:
        loss_stage = LossStage(problem, loss[0], loss[1], options.loss_atol, options.worst, total,
                               options.normaliser_rtol, kl=options.kl_loss,
                               computed=computed_16(loss[1], [user.tol] if user else [],
                                                    options.precision is not None))
        stages.append(loss_stage)
        if grad_stage is not None:
            grad_stage.loss_stage = loss_stage
    if mode == "full":
        stages.append(FullFDStage(problem, user, options.worst))
    elif mode == "directional":
        stages.append(DirectionalStage(problem, user, options.worst, options.seed))
    if mode in ("sample", "directional"):
        stages.append(SampledFDStage(problem, user, options.worst, options.samples, options.seed,
                                     grad_stage))
    stages += semantic_stages(problem, inputs, options)
    if run.out_grad is not None:
        stages.append(OutGradStage(run.out_grad, tuple(inputs.logits.shape), problem.layout))
    if run.progress is not None:
        stages.append(ProgressStage(run.progress, problem.n_rows))
    stages[1:1] = run.stages  # after LossTotal: their checks lead their rank
    if grad_stage is not None:
        for stage in run.stages:
            stage.bind(grad_stage)
    return stages, grad_stage


def _stream(problem, stages: list[Stage], grad_stage: GradStage | None, user: UserGrad | None,
            chunk_elements: int | None) -> None:
    lean = not any(s.needs_reference for s in stages)
    fused = problem.kernel if lean else None
    items = any(s.needs_items for s in stages)
    step = chunk_elements or _fused_step(fused, user, items) or CHUNK_ELEMENTS
    # the compiled kernel shares each call's rows among its own threads; the numpy kernel's
    # chunks go to a pool instead (numpy releases the GIL inside every ufunc)
    threads = numpy_threads(problem)
    if chunk_elements is None:
        step, threads = pool_plan(problem.n_classes, step, threads)
    if problem.n_rows * problem.n_classes <= step:
        threads = 1  # one chunk: no pool
    spans = row_chunks(problem.n_rows, problem.n_classes, step)
    try:
        for chunk in _chunks(problem, spans, fused, grad_stage, user, threads, lean):
            for stage in stages:
                stage.update(chunk)
    except BaseException:
        for stage in stages:
            stage.abort()  # no half-written gradient after an input error
        raise


def _fused_step(fused, user: UserGrad | None, items: bool) -> int | None:
    """Entries per chunk on the compiled kernel (None: the numpy kernel's chunks); `items`: a
    stage reads the chunks' per-element losses."""
    if fused is None:
        return None
    if fused.in_place(user.rows if user is not None else None, items):
        return IN_PLACE_CHUNK_ELEMENTS
    return FUSED_CHUNK_ELEMENTS


def _chunks(problem, spans: Iterator[tuple[int, int]], fused, grad_stage: GradStage | None,
            user: UserGrad | None, threads: int, lean: bool = False) -> Iterator[Chunk]:
    """The chunks of `spans` in row order, evaluated ahead on `threads` threads; each is folded
    into the comparison here, in row order, so every statistic, count and worst entry is the same
    for any number of threads. `lean`: no stage reads the (R, C) reference, so a chunk keeps
    only the entries its fold may open (the buffers go back to the allocator on the worker, warm
    in its cache, instead of waiting in the queue)."""
    calls = ((problem, start, stop, fused, grad_stage, user, lean) for start, stop in spans)
    for ev in ordered_map(_evaluate, calls, threads):
        yield _fold(grad_stage, ev)


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(eq=False)
class Evaluated:
    """A chunk's reference values, and your gradient measured against them but not yet folded."""

    chunk: Chunk
    measured: Measured | None = None


def _fold(grad_stage: GradStage | None, ev: Evaluated) -> Chunk:
    if ev.measured is not None:
        assert grad_stage is not None
        ev.chunk.user_tol = grad_stage.cmp.fold(ev.chunk.start, ev.measured)
    return ev.chunk


def _evaluate(problem, start: int, stop: int, fused, grad_stage: GradStage | None,
              user: UserGrad | None, lean: bool = False) -> Evaluated:
    """The reference values of rows [start, stop), your gradient measured on the way (the
    compiled kernel folds its comparison itself)."""
    ev: ChunkEval | None = None
    if fused is not None:
        ev = fused.evaluate(row_block(problem.z, start, stop), np.arange(start, stop),
                            cmp=grad_stage.cmp if grad_stage is not None else None,
                            g_rows=None if user is None else row_block(user.rows, start, stop),
                            stream=True)
        if ev is not None:
            return Evaluated(Chunk(start, stop, ev))
    ev = problem.evaluate(start, stop, grad=True,
                          floor_coef=user.tol.floor_coef if user is not None else None,
                          lse_weight=user.tol.lse_weight if user is not None else 1.0)
    measured = None
    if grad_stage is not None and user is not None:
        measured = grad_stage.cmp.measure(required(ev.grad, "gradient"), user.rows[start:stop],
                                          ev.floor)
        if lean:
            measured = measured.compact(grad_stage.cmp.open_above)
    if lean:
        ev = replace(ev, grad=None, floor=None)
    return Evaluated(Chunk(start, stop, ev), measured)


def _user_grad(problem, inputs: Inputs, options: CheckOptions) -> UserGrad | None:
    grad = inputs.grad
    if grad is None:
        return None
    grad = as_array(grad)
    src = inputs.sources.get("grad", "grad")
    if grad.dtype.kind != "f":
        raise CeCheckError(f"{src}: dtype {grad.dtype} is not floating point")
    if grad.shape != inputs.logits.shape:
        raise CeCheckError(f"{src}: shape {grad.shape} does not match the logits {inputs.logits.shape}")
    tol = options.tolerance(grad.dtype)
    # each rounding of a subnormal errs by up to tiny/2; exp, /sum and *w chain three of them
    # and a weight Q multiplies the earlier ones: (k/2)*(1 + Q*scale) tiny covers it
    tol = replace(tol, tiny=tol.tiny * max(
        1.0, tol.floor_factor / 2.0 * (1.0 + problem.max_target_weight * abs(problem.grad_scale))))
    return UserGrad(problem.layout.to_rows(grad), tol, options.normaliser_rtol,
                    options.strict_subnormals)


def _user_loss(problem, inputs: Inputs, options: CheckOptions) -> tuple[np.ndarray, Tolerance] | None:
    if inputs.loss is None:
        return None
    loss = np.asarray(inputs.loss)
    src = inputs.sources.get("loss", "loss")
    if loss.dtype.kind not in "iuf":
        raise CeCheckError(f"{src}: dtype {loss.dtype} is not numeric")
    if problem.reduction == "none":
        loss = problem.match_per_sample(loss, src)
    elif loss.size != 1:
        raise CeCheckError(f"{src}: shape {loss.shape}; reduction '{problem.reduction}' gives a "
                           "scalar loss (use `reduction=none` for per-sample losses)")
    return loss, options.tolerance(loss.dtype)


def _input_infos(inputs: Inputs) -> tuple[InputInfo, ...]:
    src = inputs.sources
    infos = [InputInfo("logits", src.get("logits", "logits"), tuple(inputs.logits.shape),
                       str(inputs.logits.dtype)),
             InputInfo("labels", src.get("labels", "labels"), tuple(inputs.labels.shape),
                       str(inputs.labels.dtype))]
    if inputs.grad is not None:
        g = as_array(inputs.grad)
        infos.append(InputInfo("grad", src.get("grad", "grad"), tuple(g.shape), str(g.dtype)))
    if inputs.loss is not None:
        loss = np.asarray(inputs.loss)
        infos.append(InputInfo("loss", src.get("loss", "loss"), tuple(np.shape(inputs.loss)),
                               str(loss.dtype)))
    return tuple(infos)
