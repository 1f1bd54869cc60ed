"""The stages of one check: each sees every row chunk once (`update`) and then gives its results
(`finish`). The pipeline (pipeline.py) picks the stages for the inputs and the finite-difference
mode, streams the chunks through them and assembles the report.

Every result carries a rank, the order of the report's checks: proofs of the reference (0),
your gradient (1), your loss (2), finite differences against your gradient (3), sampled
finite differences (4), extra checks such as the two-class bridge (5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.output import AtomicFile, install_sigterm_cleanup, npy_header
from ce_cli.kernels.base import ChunkEval, required
from ce_cli.kernels.numerics import loss_sum
from ce_cli.models.layout import match_batch
from ce_cli.verify.allowance import RowAllowance, normaliser_bound
from ce_cli.verify.compare import Comparison
from ce_cli.verify.finite_diff import (directional_chunk, fd_entries, fd_full, localize,
                                       sample_entries)
from ce_cli.verify.results import CheckResult, Diagnosis
from ce_cli.verify.tolerance import (SIXTEEN_BIT, Tolerance, loss_rule, per_sample_16,
                                     reduction_floor, resolve_tolerance)

FD_SAFETY = 2.0  # the finite-difference bound is rigorous; 2x covers the bound's own rounding
Ranked = list[tuple[int, CheckResult]]


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(eq=False)
class Chunk:
    """Rows [start, stop) as the stages see them: the reference values, and the allowed error of
    your gradient entry by entry (when it was compared in numpy)."""

    start: int
    stop: int
    ev: ChunkEval
    user_tol: np.ndarray | None = None


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(frozen=True, eq=False)
class UserGrad:
    """Your gradient as (N, C) rows, the tolerance it is held to, and the settings of the row
    allowances (verify/allowance.py)."""

    rows: Any
    tol: Tolerance
    normaliser_rtol: float | None = None
    strict_subnormals: bool = False

    def allowance(self, problem) -> RowAllowance:
        # a value flushed to zero, times the weights and scale applied after it (the z-loss's
        # 1 + 2 zeta lse, which max_target_weight bounds at lse = 1, below 2 for |lse| < 1/(2 zeta))
        flush = 2.0 * problem.max_target_weight * abs(problem.grad_scale)
        return RowAllowance(self.tol, problem.n_classes, problem.grad_scale,
                            getattr(problem, "target_weights", None), self.normaliser_rtol,
                            self.strict_subnormals, flush)

    def factor_bound(self, problem) -> float:
        """The row-factor bound, for checks that see single entries or row sums only."""
        if getattr(problem, "target_weights", None) is None:
            return 0.0
        return normaliser_bound(self.tol, problem.n_classes, self.normaliser_rtol)


def soft_term(problem, rows: np.ndarray, ref_grad: np.ndarray) -> np.ndarray:
    """Q a * scale, the softmax term of the reference gradient, at `rows`."""
    q, _spread = problem.target_weights(rows)
    return np.abs(ref_grad + q * problem.grad_scale)


class Stage:
    """One concern of the streaming pass. `needs_reference`: it reads the (R, C) reference
    gradient of each chunk (the compiled kernel can then not fuse the comparison);
    `needs_items`: it reads each chunk's per-element losses (binary: (R, C) arrays, which
    bound the chunk's size)."""

    needs_reference = False
    needs_items = False

    def update(self, chunk: Chunk) -> None:
        """Fold in one chunk."""

    def finish(self) -> Ranked:
        """The stage's checks, ranked."""
        return []

    def abort(self) -> None:
        """The run stopped early: undo side effects."""

    def bind(self, grad: GradStage) -> None:
        """The run's gradient stage, for a stage that reads it when the pass is done."""


def _comparison(name: str, tol: Tolerance, index_of, worst: int, *, user: bool, fd: bool = False,
                note: str = "", extra_atol: float = 0.0,
                allowance: RowAllowance | None = None, beyond_range: bool = False) -> Comparison:
    expected = "finite diff" if fd else "reference"
    got = "yours" if user else "reference"
    return Comparison(name, tol, index_of, expected_label=expected, got_label=got, n_worst=worst,
                      note=note, extra_atol=extra_atol, allowance=allowance,
                      beyond_range=beyond_range)


class GradStage(Stage):
    """Your gradient against the reference, entry by entry (`grad_vs_reference`)."""

    def __init__(self, problem, user: UserGrad, worst: int) -> None:
        self.problem, self.user = problem, user
        self.allowance = user.allowance(problem)
        self.loss_stage: LossStage | None = None  # your loss, when given: it shares the normaliser
        self.diagnosis: tuple[Diagnosis, ...] = ()
        self.cmp = _comparison("grad_vs_reference", user.tol, problem.layout.original_index, worst,
                               user=True, allowance=self.allowance)

    def finish(self) -> Ranked:
        result = self.cmp.result()
        a = self.allowance
        if a.rows_peak:
            result = replace(result, note="; ".join(filter(None, [result.note, (
                f"{a.rows_peak} rows pass with their arg-max entry allowed the row max's "
                f"derivative (1 - sum a) Q, |1 - sum a| <= {a.peak:.2g}, which an implementation "
                "that differentiates through max(z) adds")])))
        out = [(1, result)]
        if not result.ok:
            from ce_cli.verify.diagnosis import diagnose  # for a failed check only

            self.diagnosis = diagnose(self.problem, self.user.rows,
                                      [r for r, _c in self.cmp.positions()], result.mismatches,
                                      result.total, max(self.user.tol.rtol, 8 * self.user.tol.eps),
                                      self.user.tol.tiny)
        if a.rows_over or (a.rows_rescued and a.max_factor):
            out.append((1, self._normaliser()))
        return out

    def _normaliser(self) -> CheckResult:
        """The `normaliser` check: the row factors applied or over the bound; it fails too when
        they are a z-loss left out (`missing_z_loss`) or your loss does not carry them
        (`LossStage.unexplained`)."""
        a = self.allowance
        where = self.problem.layout.batch_index(a.worst_row) if a.worst_row is not None else ()
        missing = missing_z_loss(self.problem, a.largest)
        found = (f"{a.rows_rescued} rows pass with it; normaliser off by up to "
                 f"{a.max_factor:.2g} (row {where}), allowed {a.bound:.2g}")
        loose, fails = ("", False) if missing or self.loss_stage is None else \
            self.loss_stage.unexplained(self)
        return CheckResult(
            name="normaliser", ok=a.rows_over == 0 and not missing and not fails,
            expected_label="bound", got_label="row factor", max_abs_err=a.max_factor,
            max_rel_err=a.max_factor,
            mismatches=a.rows_over + (sum(r for *_, r in a.largest) if missing else 0)
            + (a.rows_rescued if fails else 0),
            total=a.rows_fitted, worst=(),
            rule=f"row factor <= {a.bound:.2g}, a {a.precision} sum of {a.n_classes:,} terms",
            note=missing or (f"{found}; {loose}" if loose else found))


# the z-loss's gradient term 2 zeta lse at m times its coefficient: what `missing_z_loss` names
Z_LOSS_TERMS = ((0.0, "the z-loss left out of your gradient"),
                (0.5, "half the z-loss's term in your gradient (z_loss*lse for 2*z_loss*lse)"),
                (-1.0, "the z-loss's term in your gradient with its sign flipped"),
                (2.0, "the z-loss's term in your gradient twice (4*z_loss*lse)"))


def missing_z_loss(problem, largest: list[tuple[int, float, bool]]) -> str:
    """A note when the rows' largest softmax factors are a z-loss term at m times its
    coefficient in your gradient (`Z_LOSS_TERMS`: left out, halved, its sign flipped,
    doubled): it scales row n's softmax term Qe a by (Q + 2 m zeta lse)/Qe, a factor
    (m - 1) 2 zeta lse_n / Qe_n (Qe = Q + 2 zeta lse) that can lie within the normaliser bound
    (float32 above ~42k classes at zeta 1e-4 left out). Rounding gives each row its own factor
    of either sign; this one tracks lse row by row: at least 3 of the largest, every one within
    a quarter of it ('' otherwise)."""
    zeta = getattr(getattr(problem, "sem", None), "z_loss", 0.0)
    if not zeta or len(largest) < 3:
        return ""
    rows = np.array(sorted(r for r, *_ in largest))
    ev = problem.evaluate_rows(np.asarray(problem.z[rows]), rows, grad=False)
    s = problem.sem.row_weight(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        qe = np.asarray(ev.total_weight, dtype=np.float64) / s
        unit = dict(zip(rows.tolist(), (2.0 * zeta * np.asarray(ev.lse) / qe).tolist()))
    for m, what in Z_LOSS_TERMS:
        expected = {r: (m - 1.0) * u for r, u in unit.items()}
        if all(abs(f - expected[r]) <= 0.25 * abs(expected[r]) for r, f, _ in largest):
            r, f, _ = largest[0]
            return (f"the rows' factors are those of {what}: row "
                    f"{problem.layout.batch_index(r)} off by {f:.3g}, "
                    f"{m - 1.0:g}*2*z_loss*lse/(Q + 2*z_loss*lse) = {expected[r]:.3g} there "
                    f"({len(largest)} rows checked, each within 25%)")
    return ""


class LossTotal(Stage):
    """Row losses, summed (exactly up to 2**20 rows) into the reduced reference loss."""

    def __init__(self, n_rows: int) -> None:
        self.row_loss = np.empty(n_rows)

    def update(self, chunk: Chunk) -> None:
        self.row_loss[chunk.start:chunk.stop] = chunk.ev.loss

    def total(self) -> float:
        return loss_sum(self.row_loss)


# eps sqrt(C) times this: how far another computation's sum of a row's C exponentials (your
# loss's, when it is not your gradient's forward) may be off, beside your gradient's own
# (docs/tolerance.md section 1: PyTorch's serial (N, C, d) float32 kernel, 20 eps sqrt(C)
# at C = 32,000 and 128,256 beside torch.compile's, the flat layout's or logsumexp's sum)
ANOTHER_SUM = 32.0


class LossStage(Stage):
    """Your loss against the reference: per sample for 'none', else the reduced scalar.

    A softmax loss that fails the rule is checked once more with the normaliser allowance:
    lse off by a row factor f (at most the gradient's bound) moves loss_n by Q_n * f. One that
    still fails is held to `computed` (tolerance.per_sample_16: the 16-bit precision your
    gradient was computed in, when the loss's own precision was not declared): the per-sample
    losses of a 16-bit computation reduced in float32 (JAX's bf16 losses times a float32 mask)
    are no float32 computation. Each rounds its terms to 16 bits: optax's softmax
    (z - m) - log sum exp(z - m) is off by eps/2 (2 |loss_n| + 1 + H_n), H_n <= log C the row's
    entropy, a 16-bit lse by eps/2 |lse|, optax's sigmoid -y log p - (1 - y) log(1 - p) by
    3/2 eps |l|: the floor at k/4 eps of that precision, plus |loss_n| + Q_n log C (softmax) or
    |l| (an element). A sum of 16-bit losses may overflow the 16-bit range there too. A loss
    computed in 16 bits is held to that rule alone (`loss_rule`; binary at k/2, for PyTorch's
    elements, each off by up to eps |x| (|1 - y| + 2c) where x << 0)."""

    def __init__(self, problem, loss: np.ndarray, tol: Tolerance, loss_atol: float, worst: int,
                 total: LossTotal, normaliser_rtol: float | None = None, kl: bool = False,
                 computed: str | None = None) -> None:
        softmax = getattr(problem, "target_weights", None) is not None
        self.sixteen = tol.precision in SIXTEEN_BIT  # held to `loss_rule`'s per-sample model
        if self.sixteen:
            tol, computed = loss_rule(tol, binary=not softmax), None
        self.problem, self.loss, self.tol, self.loss_atol = problem, loss, tol, loss_atol
        self.normaliser_rtol = normaliser_rtol
        # `kl`: yours is the KL divergence, the reference minus s_n H(q) per row
        self.entropy = problem.targets_entropy() if kl else None
        self.normaliser = (normaliser_bound(tol, problem.n_classes, normaliser_rtol)
                           if softmax else 0.0)
        self.worst, self.total = worst, total
        # 'none' compares every loss (binary: one an element); a reduced loss needs only the
        # rows' floors (not (N, K) arrays for binary: 1 GB each at 4096 x 32000)
        each = problem.reduction == "none"
        shape = (problem.n_rows,) + (problem.per_sample_cols if each else ())
        self.per_sample = np.empty(shape) if each else None
        self.floor = np.empty(shape)
        # a float32 reduction of 16-bit losses: rounding errors of many elements cancel in
        # part, and optax's sigmoid forms no term of ~|x| (k/4 eps for `binary` too)
        self.computed = per_sample_16(tol, computed) if computed is not None else None
        self.softmax = softmax
        self.needs_items = not softmax  # binary: each element's loss and floor
        self.floor16 = np.empty(shape) if computed is not None else None
        # T_n = dloss_n/dlse (Q_n; s_n Qe_n): what a normaliser factor moves the loss by
        self.dlse = np.empty(problem.n_rows) if self.normaliser else None
        # |lse_n|, to hold your loss to your gradient's row factors (`unexplained`)
        one = softmax and getattr(problem, "one_target_term", False) and not self.sixteen and not kl
        self.lse_abs = np.empty(problem.n_rows) if one and self.normaliser else None

    @property
    def weight(self) -> np.ndarray | None:
        """|Q_n|: what the normaliser's bound multiplies, per row (None: no softmax normaliser)."""
        return None if self.dlse is None else np.abs(self.dlse)

    def update(self, chunk: Chunk) -> None:
        ev, rows = chunk.ev, slice(chunk.start, chunk.stop)
        if self.per_sample is not None:
            self.per_sample[rows] = self.problem.per_sample(ev)
        # the floor is linear in k eps: one evaluation serves both rules
        unit = self.problem.loss_floor(ev, 1.0, np.arange(chunk.start, chunk.stop))
        own = self._unit16(ev, unit) if self.sixteen else unit
        self._fold(self.floor, rows, self.tol.floor_coef * own)
        if self.floor16 is not None and self.computed is not None:
            self._fold(self.floor16, rows, self.computed.floor_coef * self._unit16(ev, unit))
        if self.dlse is not None:
            self.dlse[rows] = ev.total_weight
        if self.lse_abs is not None:
            self.lse_abs[rows] = np.abs(ev.lse)

    @staticmethod
    def _fold(out: np.ndarray, rows: slice, floor: np.ndarray) -> None:
        """Rows' floors into `out`, per element (binary) summed per row when `out` is per row."""
        out[rows] = floor if floor.ndim == out.ndim else floor.sum(axis=1)

    def _unit16(self, ev: ChunkEval, unit: np.ndarray) -> np.ndarray:
        """The rows' floors of `computed` per unit of its k eps (`softmax_unit16`; binary: the
        element's floor `unit` plus |l|)."""
        if not self.softmax:  # binary: per element
            return unit + np.abs(ev.per_element()[0])
        return softmax_unit16(unit, ev.loss, ev.total_weight, self.problem.n_classes)

    def finish(self) -> Ranked:
        result = self._checked(self.tol, self.floor, self.normaliser)
        if not result.ok and self.computed is not None and self.floor16 is not None:
            tol = self.computed
            wide = self._checked(tol, self.floor16, normaliser_bound(
                tol, self.problem.n_classes, self.normaliser_rtol) if self.normaliser else 0.0)
            if wide.ok:
                result = replace(wide, note=computed_note(tol, self.tol, wide.note))
        return [(2, result if result.ok else self._entropy_note(result))]

    def unexplained(self, grad: GradStage) -> tuple[str, bool]:
        """A note when your loss does not carry the normaliser error the rows of your gradient
        `grad` show ('' otherwise), and whether that fails. With one target term a row
        (`one_target_term`) a factor f on row n's softmax term is its normaliser's (the
        backward's sum over the targets is exact): lse off by -log(1 + f), loss_n by
        d_n = -T_n log(1 + f), T_n = dloss_n/dlse (Q_n; s_n Qe_n with a z-loss and sample
        weights), in every implementation whose backward uses its forward's softmax (autodiff,
        fused kernels). Your loss must pass against the reference moved by d, the floor widened
        by 25% of each |d_n| (the fit's slack) and, on rows without a fitted factor, by the
        largest one the entry-wise rule passes unfitted, |T_n| (rtol + k eps (1 + log C +
        lam |lse_n|)), at most the normaliser's bound. What another computation's sum explains
        (`ANOTHER_SUM`: your loss not your gradient's forward's) is noted, not failed. Only for
        a float32 or float64 gradient (16-bit rows are rarely fitted: their rule is coarser than
        most factors) without --atol, and a loss of your gradient's precision: one of another (a
        float64 loss beside a float32 gradient) is another computation, whose sum need not be
        your backward's. Per-sample losses are held on the rows that pass their own rule without
        the normaliser allowance (`_held_rows`)."""
        carried = self.carry(grad)
        if carried is None:
            return "", False
        d, hidden, other = carried
        if self._compare(self.floor + hidden, shift=-d).ok:
            return "", False
        fails = not self._compare(self.floor + hidden + other, shift=-d).ok
        if self.per_sample is not None:
            held = np.isfinite(hidden)
            moved = (f"by up to {float(np.max(np.abs(d[held]))):.2g} on a sample, but your "
                     "losses do not move with them")
        else:
            off = float(np.asarray(self.loss, dtype=np.float64).reshape(-1)[0]) - \
                self.problem.reduce(self.total.total())
            moved = f"by {self.problem.reduce(math.fsum(d)):.2g}, but yours is off by {off:.2g}"
        return not_carried(moved, fails), fails

    def carry(self, grad: GradStage) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(d, hidden, other) of `unexplained` per row: the factors' move of each row's loss,
        the widening of its floor (inf on a row not held) and how far another computation's
        sum may move it; None where the rule does not apply."""
        tol = grad.user.tol
        if (self.lse_abs is None or self.dlse is None or tol.atol or tol.precision in SIXTEEN_BIT
                or self.tol.precision != tol.precision):
            return None
        held = self._held_rows()
        if held is None:
            return None
        rows, factors = grad.allowance.softmax_factors()
        d = np.zeros(self.problem.n_rows)
        d[rows] = -self.dlse[rows] * np.log1p(factors)
        weight = np.abs(self.dlse)
        hidden = weight * np.minimum(grad.allowance.bound, tol.rtol + tol.floor_coef * (
            1.0 + math.log(self.problem.n_classes) + tol.lse_weight * self.lse_abs))
        hidden[rows] = 0.25 * np.abs(d[rows])
        hidden[~held] = np.inf
        return d, hidden, weight * min(grad.allowance.bound,
                                       ANOTHER_SUM * tol.eps * math.sqrt(self.problem.n_classes))

    def _held_rows(self) -> np.ndarray | None:
        """The rows `unexplained` holds: every row of a reduced loss (one sum: it passes with
        the normaliser allowance only if the factors carry it); of per-sample losses, those that
        pass their own rule without the allowance (a row whose forward sum rounded wider than
        its gradient's fitted factor shows needs it, and carries it); None for none."""
        if self.per_sample is None:
            return np.ones(self.problem.n_rows, dtype=bool)
        rowmax = self._samples(self.tol).measure(self.per_sample, self.loss, self.floor).rowmax
        held = np.asarray(rowmax if rowmax is not None else np.zeros(0)) <= 1.0
        return held if held.any() else None

    def _checked(self, tol: Tolerance, floor: np.ndarray, normaliser: float) -> CheckResult:
        """The loss held to `tol` with the rows' floors `floor`, with the normaliser allowance
        when only that passes."""
        weight, h = self.weight, self.entropy
        # the KL's H(q), formed in your precision, rounds at k eps |s_n H(q)| per row
        floor = floor if h is None else floor + tol.floor_coef * np.abs(h)

        def compare(k: float) -> CheckResult:
            return self._compare(floor + k * weight if k and weight is not None else floor, h,
                                 tol=tol)

        return with_normaliser(compare, normaliser if weight is not None else 0.0, tol,
                               self.problem.n_classes)

    def _entropy_note(self, result: CheckResult) -> CheckResult:
        """A failed loss that the other form passes - the cross-entropy minus the smoothed
        targets' entropy (the KL divergence T5X and Flax report) or, with `kl_loss`, the
        cross-entropy itself: still a failure, saying so."""
        if self.entropy is not None:
            if not float(np.max(self.entropy, initial=0.0)) or not self._compare(self.floor).ok:
                return result
            return replace(result, note=(
                "yours is the cross-entropy itself, not minus the smoothed targets' entropy "
                "(the KL divergence `kl_loss` compares): drop `kl_loss`"))
        h = getattr(self.problem, "targets_entropy", lambda: None)()
        if h is None or not h.any() or not self._compare(self.floor, shift=h).ok:
            return result
        each = self.problem.reduction == "none"
        offset = float(h.max()) if each else self.problem.reduce(math.fsum(h))
        return replace(result, note=(
            f"yours is the reference minus the smoothed targets' entropy ({offset:.6g}"
            f"{' per sample at most' if each else ''}): a KL divergence, as T5X and Flax report "
            "it (compare it with `kl_loss`); the gradient is the same"))

    def _samples(self, tol: Tolerance) -> Comparison:
        """The comparison of per-sample losses ('none')."""
        return _comparison("loss_vs_reference", tol, self.problem.per_sample_index, self.worst,
                           user=True, extra_atol=self.loss_atol, beyond_range=True)

    def _compare(self, row_floor: np.ndarray, shift: np.ndarray | None = None,
                 tol: Tolerance | None = None) -> CheckResult:
        """Your loss against the reference (minus `shift` per row, when given), held to `tol`
        (default: the loss's)."""
        problem, tol = self.problem, tol or self.tol
        if problem.reduction == "none":
            cmp = self._samples(tol)
            assert self.per_sample is not None  # kept for 'none'
            ref = self.per_sample if shift is None else self.per_sample - shift
            cmp.update(0, ref, self.loss, row_floor)
            return cmp.result()
        total = problem.reduce(self.total.total() - (math.fsum(shift) if shift is not None else 0.0))
        # the reduction in your precision: over every per-sample loss (binary: every element)
        floor = (float(np.sum(row_floor)) * problem.grad_scale
                 + reduction_floor(tol, math.prod(problem.per_sample_shape), total))
        return reduced_check("loss_vs_reference", tol, total, floor, self.loss, self.loss_atol)


def not_carried(moved: str, fails: bool) -> str:
    """The `normaliser` check's note when your loss does not carry your gradient's row factors
    (`LossStage.unexplained`), `moved` how the factors move it against how yours is off;
    `fails`: beyond what another computation's sum explains."""
    terms = ("a term of your backward alone (the z-loss's 2*z_loss*lse halved, a scale?) or "
             "of your loss alone (z_loss*(mean lse)^2 for the mean of lse^2?)")
    if not fails:
        return (f"your loss does not carry it (the factors move the loss {moved}), within "
                "what another computation's sum of the same terms explains, so it passes: "
                f"if your loss is your gradient's forward's, {terms}")
    return (f"your loss does not carry it: the factors move lse, and so the loss, {moved}. "
            f"{terms[0].upper()}{terms[1:]}, or your loss and gradient come from two "
            "computations whose sums round further apart than measured: check such a loss "
            "without your gradient")


def computed_16(loss_tol: Tolerance, grad_tols: list[Tolerance], declared: bool) -> str | None:
    """The 16-bit precision all your gradients (`grad_tols`) were computed in, whose per-sample
    losses a loss held to the wider `loss_tol` may reduce (LossStage's second rule); None when
    a precision was `declared`, there is no gradient, or they differ."""
    fmts = {t.precision for t in grad_tols}
    if declared or len(fmts) != 1:
        return None
    fmt = fmts.pop()
    return fmt if fmt in SIXTEEN_BIT and loss_tol.eps < max(t.eps for t in grad_tols) else None


def computed_note(computed: Tolerance, own: Tolerance, note: str) -> str:
    """The note of a loss that passes only as the per-sample losses of your gradient's 16-bit
    computation `computed` reduced wider (LossStage's second rule), `own` its own rule."""
    return (f"passes as the per-sample losses of a {computed.precision} computation (your "
            f"gradient's) reduced in float32, each off by its {computed.precision} rounding; "
            f"`precision` {own.precision} holds it to {own.precision}'s rule"
            + (f"; {note}" if note else ""))


def softmax_unit16(unit: np.ndarray, loss: np.ndarray, weight: np.ndarray,
                   n_classes: int) -> np.ndarray:
    """A 16-bit computation's per-sample loss floor per unit of its k eps (`per_sample_16`):
    the loss's floor `unit` plus |loss_n| + Q_n log C (`weight` = Q_n)."""
    return unit + (np.abs(loss) + np.abs(weight) * math.log(n_classes))


def with_normaliser(compare: Callable[[float], CheckResult], normaliser: float, tol: Tolerance,
                    n_classes: int) -> CheckResult:
    """`compare(k)`: the check with the rows' floors widened by k times their Q_n. The plain
    result, or the one widened by the normaliser bound when only that passes (with its note)."""
    result = compare(0.0)
    if not result.ok and normaliser:
        wide = compare(normaliser)
        if wide.ok:
            result = replace(wide, note=(
                f"passes with the normaliser allowance: lse off by up to {normaliser:.2g} per "
                f"row (a {tol.precision} sum of {n_classes:,} terms)"))
    return result


def reduced_check(name: str, tol: Tolerance, total: float, floor: float, got: Any,
                  extra_atol: float) -> CheckResult:
    """A reduced scalar (the loss, the z-loss) against the reference `total`, the error floor
    `floor` (the rows' floors, scaled, plus the reduction's: `reduction_floor`) allowed."""
    cmp = _comparison(name, tol, lambda r, c: (), 1, user=True, extra_atol=extra_atol,
                      beyond_range=True)
    value = np.asarray(got, dtype=np.float64).reshape(1)
    cmp.update(0, np.array([total]), value, np.array([floor]) if np.isfinite(floor) else None)
    return cmp.result()


class OutGradStage(Stage):
    """Writes the float64 reference gradient to a .npy file through `ce_cli.io.output` (an
    unpredictable temporary file written with `write()`, renamed into place at the end, so an
    input error, Ctrl-C or SIGTERM leaves no half-written file and no planted name is followed)."""

    needs_reference = True

    def __init__(self, path: str | Path, shape: tuple[int, ...], layout) -> None:
        header = npy_header(tuple(shape))
        self.out = AtomicFile(path, "out_grad", len(header) + 8 * math.prod(shape))
        install_sigterm_cleanup()
        self.layout, self.offset = layout, len(header)
        self.rows = None
        if layout.class_axis != len(shape) - 1:  # written in the original axis order at the end
            self.rows = np.empty((layout.n_rows, layout.n_classes))
        self.out.write(header)

    def update(self, chunk: Chunk) -> None:
        if self.rows is not None:
            self.rows[chunk.start:chunk.stop] = chunk.ev.grad
            return
        data = np.ascontiguousarray(chunk.ev.grad, dtype=np.float64)
        self.out.pwrite(data.data, self.offset + 8 * chunk.start * self.layout.n_classes)

    def finish(self) -> Ranked:
        if self.rows is not None:
            self.out.write(np.ascontiguousarray(self.layout.from_rows(self.rows)).data)
        self.out.commit()
        return []

    def abort(self) -> None:
        self.out.discard()


def _settle_skipped(fdv: np.ndarray, bound: np.ndarray, ref: np.ndarray):
    """Entries finite differences cannot probe (NaN), or whose reference is NaN (0/0 means),
    compare as equal to the reference."""
    skip = np.isnan(fdv) | np.isnan(ref)
    if skip.any():
        fdv = np.where(skip, ref, fdv)
        bound = np.where(skip, 0.0, bound)
    return fdv, bound


class FullFDStage(Stage):
    """Every entry by central differences (2*C evaluations per chunk; an elementwise loss: 2
    of its elements): the reference and your gradient against them."""

    needs_reference = True

    def __init__(self, problem, user: UserGrad | None, worst: int) -> None:
        self.problem, self.user = problem, user
        index = problem.layout.original_index
        self.ref = _comparison("fd_vs_reference", resolve_tolerance(np.dtype(np.float64)), index, worst,
                               user=False, fd=True)
        self.mine = (_comparison("fd_vs_grad", user.tol, index, worst, user=True, fd=True,
                                 allowance=user.allowance(problem))
                     if user is not None else None)
        self.skipped = self.evaluations = 0

    def update(self, chunk: Chunk) -> None:
        start, stop, ev = chunk.start, chunk.stop, chunk.ev
        fdv, bound, skipped = fd_full(self.problem, start, stop)
        self.skipped += skipped
        self.evaluations += 2 * (stop - start) * self.problem.n_classes
        ref = required(ev.grad, "gradient")
        fdv, bound = _settle_skipped(fdv, bound, ref)
        self.ref.update(start, fdv, ref, FD_SAFETY * bound)
        if self.mine is not None:
            assert self.user is not None
            self.mine.update(start, fdv, self.user.rows[start:stop],
                             FD_SAFETY * bound + required(ev.floor, "floor"))

    def finish(self) -> Ranked:
        out = [(0, self.ref.result())]
        if self.mine is not None:
            out.append((3, self.mine.result()))
        return out


class DirectionalStage(Stage):
    """One random direction per row (2 evaluations per row); a failing row of yours is then
    bisected over column blocks to the bad entry."""

    needs_reference = True
    NOTE = "one random direction per row"

    def __init__(self, problem, user: UserGrad | None, worst: int, seed: int) -> None:
        self.problem, self.user, self.seed = problem, user, seed
        self.rng = np.random.default_rng(seed)

        def row_index(r, _c):
            return problem.layout.batch_index(r)

        ref64 = resolve_tolerance(np.dtype(np.float64))
        self.ref = _comparison("fd_rows_vs_reference", ref64, row_index, worst, user=False,
                               fd=True, note=self.NOTE)
        self.mine = (_comparison("fd_rows_vs_grad", user.tol, row_index, worst, user=True,
                                 fd=True, note=self.NOTE) if user is not None else None)
        self.evaluations = 0

    def update(self, chunk: Chunk) -> None:
        start, stop = chunk.start, chunk.stop
        got = None if self.user is None else self.user.rows[start:stop]
        user_tol = chunk.user_tol
        if user_tol is not None and self.user is not None and self.user.factor_bound(self.problem):
            rows = np.arange(start, stop)
            user_tol = user_tol + self.user.factor_bound(self.problem) * soft_term(
                self.problem, rows, required(chunk.ev.grad, "gradient"))
        dc = directional_chunk(self.problem, start, stop, required(chunk.ev.grad, "gradient"),
                               self.rng, got, user_tol)
        self.evaluations += 2 * (stop - start)
        self.ref.update(start, dc.fd, dc.ref, FD_SAFETY * dc.bound)
        if self.mine is not None:
            self.mine.update(start, dc.fd, required(dc.got, "projection"),
                             FD_SAFETY * dc.bound + required(dc.got_bound, "bound"))

    def finish(self) -> Ranked:
        out = [(0, self.ref.result())]
        if self.mine is not None:
            out.append((3, self._localize(self.mine.result(), self.mine.positions())))
        return out

    def _localize(self, result: CheckResult, positions, max_rows: int = 3) -> CheckResult:
        """Bisection over column blocks in the worst failing rows; the finds go into the note."""
        if result.ok:
            return result
        assert self.user is not None
        problem, tol = self.problem, self.user.tol
        found = []
        failing = [r for (r, _c), e in zip(positions, result.worst) if not e.ok][:max_rows]
        for row in failing:
            ev = problem.evaluate_rows(np.asarray(problem.z[row:row + 1]), np.array([row]),
                                       floor_coef=tol.floor_coef, lse_weight=tol.lse_weight)
            got = np.asarray(self.user.rows[row], dtype=np.float64)
            allowed = (np.abs(required(ev.grad, "gradient")[0]) * tol.rtol + tol.atol + tol.tiny
                       + required(ev.floor, "floor")[0])
            col, n = localize(problem, row, got, allowed, self.seed + row)
            self.evaluations += n
            where = problem.layout.original_index(row, col) if col is not None else "not isolated"
            found.append(f"row {problem.layout.batch_index(row)} -> entry {where}")
        note = "; ".join([result.note, "bisection: " + ", ".join(found)]) if found else result.note
        return replace(result, note=note)


class SampledFDStage(Stage):
    """K entries by central differences after the pass: each sampled row's target entry, a
    random entry, and the worst entries of your gradient's comparison."""

    def __init__(self, problem, user: UserGrad | None, worst: int, samples: int, seed: int,
                 grad_stage: GradStage | None) -> None:
        self.problem, self.user, self.worst = problem, user, worst
        self.samples, self.seed, self.grad_stage = samples, seed, grad_stage
        self.skipped = self.evaluations = 0

    def finish(self) -> Ranked:
        problem, user = self.problem, self.user
        extra = self.grad_stage.cmp.positions() if self.grad_stage is not None else []
        rows, cols = sample_entries(problem, self.samples, self.seed, extra)
        res = fd_entries(problem, rows, cols, user.tol.floor_coef if user is not None else None,
                         user.tol.lse_weight if user is not None else 1.0)
        self.skipped, self.evaluations = res.skipped, res.evaluations
        reference = required(res.reference, "reference")
        fdv, bound = _settle_skipped(res.fd, res.bound, reference)
        layout = problem.layout

        def index_of(i, _c):
            return layout.original_index(int(rows[i]), int(cols[i]))

        note = f"{rows.size} sampled entries"
        cmp = _comparison("fd_vs_reference", resolve_tolerance(np.dtype(np.float64)), index_of,
                          self.worst, user=False, fd=True, note=note)
        cmp.update(0, fdv, reference, FD_SAFETY * bound)
        out = [(4, cmp.result())]
        if user is not None:
            cmp = _comparison("fd_vs_grad", user.tol, index_of, self.worst, user=True, fd=True,
                              note=note)
            allowed = FD_SAFETY * bound + required(res.floor, "floor")
            if user.factor_bound(problem):
                q_entry = problem.target_entries(rows, cols) * problem.grad_scale
                allowed = allowed + user.factor_bound(problem) * np.abs(reference + q_entry)
            if self.grad_stage is not None:  # the row max's path where your rows needed it
                allowed = allowed + self.grad_stage.allowance.path_slack(rows, cols)
            got = np.asarray(user.rows[rows, cols])
            rule = user.allowance(problem)  # grad_vs_reference's flush rule, entry by entry
            flushed = rule.flushed_entries(reference, got, allowed)
            if flushed.any():
                allowed = np.where(flushed, np.inf, allowed)
                cmp.note = f"{note}; {rule.flushed_note(int(flushed.sum()))}"
            cmp.update(0, fdv, got, allowed)
            out.append((4, cmp.result()))
        return out


class ProgressStage(Stage):
    """Calls `progress(done_rows, total_rows)` after every chunk."""

    def __init__(self, progress: Callable[[int, int], None], n_rows: int) -> None:
        self.progress, self.n_rows = progress, n_rows

    def update(self, chunk: Chunk) -> None:
        self.progress(chunk.stop, self.n_rows)


# --- training-code semantics: the lse and the z-loss a kernel returns --------------------------

def _row_values(problem, arr: Any, src: str, what: str) -> np.ndarray:
    """Per-row values with the batch's shape, as (N,)."""
    values = np.asarray(arr)
    if values.dtype.kind not in "iuf":
        raise CeCheckError(f"{src}: dtype {values.dtype} is not numeric")
    return match_batch(values, problem.layout, src, what)


class LseStage(Stage):
    """Your per-row log-sum-exp (of the transformed logits) against the reference
    (`lse_vs_reference`), non-ignored rows only (kernels skip ignored rows). Allowed: the
    floor k eps (1 + |lse|), plus the normaliser bound (a sum's factor f moves lse by f)."""

    def __init__(self, problem, lse: np.ndarray, tol: Tolerance, worst: int,
                 normaliser_rtol: float | None) -> None:
        self.problem, self.got, self.tol, self.worst = problem, lse, tol, worst
        self.ref = np.empty(problem.n_rows)
        self.normaliser = normaliser_bound(tol, problem.n_classes, normaliser_rtol)

    def update(self, chunk: Chunk) -> None:
        self.ref[chunk.start:chunk.stop] = chunk.ev.lse

    def finish(self) -> Ranked:
        return [(2, lse_check(self.ref, self.got, self.problem.valid, self.tol, self.normaliser,
                              self.problem.per_sample_index, self.worst))]


def lse_check(ref: np.ndarray, got: Any, valid: np.ndarray, tol: Tolerance, normaliser: float,
              index_of: Callable, worst: int) -> CheckResult:
    """`lse_vs_reference`: your per-row lse against `ref` on the `valid` rows, each allowed
    k eps (1 + |lse|) plus the `normaliser` bound."""
    got = np.where(valid, np.asarray(got, dtype=np.float64), ref)
    floor = np.where(valid, tol.floor_coef * (1.0 + np.abs(ref)) + normaliser, 0.0)
    cmp = _comparison("lse_vs_reference", tol, index_of, worst, user=True)
    cmp.update(0, ref, got, floor)
    return cmp.result()


class ZLossStage(Stage):
    """The z-loss your kernel returns alone (`z_loss_vs_reference`): sum_n s_n zeta v_n lse_n^2
    reduced like the loss (per sample for 'none'). Allowed per row: the floor k eps s zeta
    (lse^2 + 2|lse|(1 + |lse|)) plus 2 zeta s |lse| times the normaliser bound."""

    def __init__(self, problem, value: np.ndarray, tol: Tolerance, worst: int, loss_atol: float,
                 normaliser_rtol: float | None) -> None:
        self.problem, self.got, self.tol, self.worst = problem, value, tol, worst
        self.loss_atol = loss_atol
        self.rows, self.floor = np.empty(problem.n_rows), np.empty(problem.n_rows)
        self.normaliser = normaliser_bound(tol, problem.n_classes, normaliser_rtol)

    def update(self, chunk: Chunk) -> None:
        ev, sl = chunk.ev, slice(chunk.start, chunk.stop)
        zeta = self.problem.sem.z_loss
        s = ev.row_terms[:, 0] if ev.row_terms is not None else 1.0
        v = self.problem.valid[sl]
        L = np.abs(ev.lse)
        self.rows[sl] = np.where(v, s * zeta * ev.lse * ev.lse, 0.0)
        self.floor[sl] = np.where(v, np.abs(s) * zeta * (
            self.tol.floor_coef * (L * L + 2.0 * L * (1.0 + L)) + 2.0 * L * self.normaliser), 0.0)

    def finish(self) -> Ranked:
        problem = self.problem
        if problem.reduction == "none":
            cmp = _comparison("z_loss_vs_reference", self.tol, problem.per_sample_index,
                              self.worst, user=True, extra_atol=self.loss_atol, beyond_range=True)
            cmp.update(0, self.rows, np.asarray(self.got, dtype=np.float64), self.floor)
            return [(2, cmp.result())]
        total = problem.reduce(loss_sum(self.rows))
        floor = (float(np.sum(self.floor)) * abs(problem.grad_scale)
                 + reduction_floor(self.tol, problem.n_rows, total))
        return [(2, reduced_check("z_loss_vs_reference", self.tol, total, floor, self.got,
                                  self.loss_atol))]


def semantic_stages(problem, inputs, options) -> list[Stage]:
    """The lse and z-loss comparisons the inputs ask for (`inputs.lse`, `inputs.z_loss_value`)."""
    out: list[Stage] = []
    src = inputs.sources
    if getattr(inputs, "lse", None) is not None:
        name = src.get("lse", "lse")
        lse = _row_values(problem, inputs.lse, name, "the per-row log-sum-exp")
        out.append(LseStage(problem, lse, options.tolerance(lse.dtype), options.worst,
                            options.normaliser_rtol))
    value = getattr(inputs, "z_loss_value", None)
    if value is not None:
        name = src.get("z_loss_value", "z_loss_value")
        if not problem.sem.z_loss:
            raise CeCheckError("`z_loss_value`: needs `z_loss`, the coefficient it was computed with")
        arr = np.asarray(value)
        if problem.reduction == "none":
            arr = _row_values(problem, arr, name, "per-sample z-losses ('none')")
        elif arr.dtype.kind not in "iuf":
            raise CeCheckError(f"{name}: dtype {arr.dtype} is not numeric")
        elif arr.size != 1:
            raise CeCheckError(f"{name}: shape {arr.shape}; reduction '{problem.reduction}' gives "
                               "a scalar z-loss")
        out.append(ZLossStage(problem, arr, options.tolerance(arr.dtype), options.worst, 0.0,
                              options.normaliser_rtol))
    return out
