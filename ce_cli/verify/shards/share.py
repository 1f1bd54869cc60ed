"""A shard's check inputs (`ShardInputs`) and its share of the batch's reduced comparisons: each
shard sums its rows' loss and z-loss floors in its pass (`ShareStage`), and the client compares
your reduced loss and z-loss once with the merged reference (`batch_checks`), with the single
process's allowance: the rows' floors summed over the shards, scaled, plus log2(N + 1)
roundings of the total, as `LossStage` would on the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ce_cli.kernels.numerics import loss_sum
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.pipeline import Inputs, Run, verify
from ce_cli.verify.results import CheckResult, Report
from ce_cli.verify.shards.inputs import BatchInputs
from ce_cli.verify.shards.plan import ShardPlan
from ce_cli.verify.stages import (GradStage, LossStage, Stage, ZLossStage, not_carried,
                                  reduced_check, with_normaliser)
from ce_cli.verify.tolerance import Tolerance, loss_rule, reduction_floor


@dataclass(frozen=True)
class ShardShare:
    """A shard's share of the batch's reduced comparisons: its rows' loss floors and Q_n
    (`LossStage`'s, summed), and its reduced z-loss and the z-loss rows' floors; with the
    problem's grad_scale and normaliser bound, the same in every shard."""

    loss_floor: float = 0.0
    loss_weight: float = 0.0
    z_loss: float = 0.0
    z_loss_floor: float = 0.0
    grad_scale: float = 1.0
    normaliser: float = 0.0
    per_element: bool = False  # the loss sums every element (binary), not every row
    # what your gradient's row factors move the loss by and widen its floor by, summed over
    # the shard's rows (`LossStage.carry`); carried: the rule applies
    carry_shift: float = 0.0
    carry_slack: float = 0.0
    carry_other: float = 0.0
    carried: bool = False


class ShareStage(Stage):
    """Collects a `ShardShare` in the shard's streaming pass (the single-process stages' own
    row floors), and leaves a passing placeholder where the merged check goes."""

    def __init__(self, problem: Any, tols: tuple[Tolerance | None, Tolerance | None],
                 options: CheckOptions) -> None:
        loss_tol, z_tol = tols
        self.problem = problem
        self.loss = (LossStage(problem, np.zeros(1), loss_tol, 0.0, 1, None,  # type: ignore[arg-type]
                               options.normaliser_rtol) if loss_tol is not None else None)
        self.z_loss = (ZLossStage(problem, np.zeros(1), z_tol, 1, 0.0, options.normaliser_rtol)
                       if z_tol is not None else None)
        self.grad: GradStage | None = None

    def bind(self, grad: GradStage) -> None:
        self.grad = grad

    def update(self, chunk: Any) -> None:
        for stage in (self.loss, self.z_loss):
            if stage is not None:
                stage.update(chunk)

    def finish(self) -> list[tuple[int, CheckResult]]:
        names = [n for n, st in (("loss_vs_reference", self.loss),
                                 ("z_loss_vs_reference", self.z_loss)) if st is not None]
        return [(2, CheckResult(name=n, ok=True, expected_label="reference", got_label="yours",
                                max_abs_err=0.0, max_rel_err=0.0, mismatches=0, total=0,
                                worst=(), rule="merged over the shards")) for n in names]

    def share(self) -> ShardShare:
        problem = self.problem
        out = ShardShare(grad_scale=float(problem.grad_scale),
                         per_element=bool(problem.per_sample_cols))
        if self.loss is not None:
            weight = self.loss.weight
            out = replace(out, loss_floor=math.fsum(self.loss.floor.reshape(-1).tolist()),
                          loss_weight=math.fsum(weight.tolist()) if weight is not None else 0.0,
                          normaliser=self.loss.normaliser if weight is not None else 0.0)
            # per-sample losses: each shard holds its own (`LossStage.unexplained`)
            grad = self.grad if self.loss.per_sample is None else None
            carried = self.loss.carry(grad) if grad is not None else None
            if carried is not None:
                out = replace(out, carry_shift=math.fsum(carried[0].tolist()),
                              carry_slack=math.fsum(carried[1].tolist()),
                              carry_other=math.fsum(carried[2].tolist()), carried=True)
        if self.z_loss is not None:
            out = replace(out, z_loss=float(problem.reduce(loss_sum(self.z_loss.rows))),
                          z_loss_floor=math.fsum(self.z_loss.floor.tolist()))
        return out


@dataclass(frozen=True, eq=False)
class ShardInputs:
    """A shard's part of the batch inputs (by role), how to name them, and the tolerances of
    the reduced loss and z-loss whose share it collects (None: not given)."""

    arrays: dict[str, np.ndarray]
    sources: dict[str, str]
    share_tols: tuple[Tolerance | None, Tolerance | None] = (None, None)

    def run(self, kind: str, echo: dict[str, Any], problem: Any, options: CheckOptions,
            bridge: tuple[CheckResult, ...] = ()) -> tuple[Run, ShareStage | None]:
        share = (ShareStage(problem, self.share_tols, options)
                 if self.share_tols != (None, None) else None)
        return Run(kind, echo, bridge, stages=(share,) if share else ()), share


def share_tols(inputs: BatchInputs, options: CheckOptions
                ) -> tuple[Tolerance | None, Tolerance | None]:
    return (None if inputs.loss is None else options.tolerance(inputs.loss_dtype),
            None if inputs.z_loss is None else options.tolerance(inputs.z_loss_dtype))


def verified(problem: Any, warnings: list[str], inputs: Inputs, options: CheckOptions,
              run: tuple[Run, ShareStage | None]) -> tuple[Report, ShardShare]:
    report = verify(problem, warnings, inputs, options, run[0])
    return report, run[1].share() if run[1] is not None else ShardShare()


def batch_checks(plan: ShardPlan, shares: list[ShardShare], inputs: BatchInputs,
                 options: CheckOptions, total: float) -> dict[str, CheckResult]:
    """Your reduced loss and z-loss against the merged reference, with the single process's
    allowance: the rows' floors summed over the shards, scaled, plus log2(N + 1) roundings
    of the total (the loss: widened by the normaliser bound when only that passes)."""
    out: dict[str, CheckResult] = {}
    if not shares:
        return out
    first = shares[0]
    n = math.prod(plan.shape if first.per_element else plan.shape[:-1])  # the terms summed
    if inputs.loss is not None:
        tol = loss_rule(options.tolerance(inputs.loss_dtype), first.per_element)  # LossStage's
        floors = math.fsum(s.loss_floor for s in shares)
        weights = math.fsum(s.loss_weight for s in shares)

        def compare(k: float) -> CheckResult:
            floor = ((floors + k * weights) * first.grad_scale
                     + reduction_floor(tol, n, total))
            return reduced_check("loss_vs_reference", tol, total, floor, inputs.loss,
                                 options.loss_atol)

        out["loss_vs_reference"] = with_normaliser(compare, first.normaliser, tol, plan.shape[-1])
        note, fails = _not_carried(shares, tol, total, n, inputs, options)
        if note:  # the merged `normaliser` check takes it (merge._placed)
            out["normaliser"] = CheckResult(
                name="normaliser", ok=not fails, expected_label="bound", got_label="row factor",
                max_abs_err=0.0, max_rel_err=0.0, mismatches=0, total=0, worst=(), rule="",
                note=note)
    if inputs.z_loss is not None:
        tol = options.tolerance(inputs.z_loss_dtype)
        z_total = math.fsum(s.z_loss for s in shares)
        floor = (math.fsum(s.z_loss_floor for s in shares) * abs(first.grad_scale)
                 + reduction_floor(tol, n, z_total))
        out["z_loss_vs_reference"] = reduced_check("z_loss_vs_reference", tol, z_total, floor,
                                                   inputs.z_loss, 0.0)
    return out


def _not_carried(shares: list[ShardShare], tol: Tolerance, total: float, n: int,
                 inputs: BatchInputs, options: CheckOptions) -> tuple[str, bool]:
    """`LossStage.unexplained` on the merged sums: your reduced loss against the reference
    moved by your gradient's row factors, the floor widened as the shards' rows say: its note
    ('' when it passes or the rule does not apply) and whether it fails."""
    first = shares[0]
    if not all(s.carried for s in shares):
        return "", False
    scale = first.grad_scale
    shift = math.fsum(s.carry_shift for s in shares) * scale
    floor = (math.fsum([s.loss_floor for s in shares] + [s.carry_slack for s in shares]) * scale
             + reduction_floor(tol, n, total + shift))
    other = math.fsum(s.carry_other for s in shares) * scale

    def carries(widen: float) -> bool:
        return reduced_check("loss_vs_reference", tol, total + shift, floor + widen, inputs.loss,
                             options.loss_atol).ok

    if carries(0.0):
        return "", False
    fails = not carries(other)
    off = float(np.asarray(inputs.loss, dtype=np.float64).reshape(-1)[0]) - total
    return not_carried(f"by {shift:.2g}, but yours is off by {off:.2g}", fails), fails
