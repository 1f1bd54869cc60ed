"""The results of `ce-check explain`: frozen dataclasses that the renderers format."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ce_cli.explain.common import KAPPA
from ce_cli.models.sigmoid import SigmoidBCE
from ce_cli.models.softmax import SoftmaxCE
from ce_cli.verify.results import CheckResult


@dataclass(frozen=True, eq=False)
class Explanation:
    """One sample's derivation: every intermediate array, and the checks of every step.

    Arrays are float64 with C entries (binary: C = 1, the one logit). The Jacobian uses
    J[j, i] = da_j/dz_i (row j: output a_j, column i: input z_i), so dC/dz = J^T dC/da.
    """

    kind: str                         # "multiclass" or "binary"
    z: np.ndarray                     # (C,) logits
    a: np.ndarray                     # (C,) softmax(z) (binary: [sigmoid(z)])
    one_minus_a: np.ndarray           # (C,) 1 - a, formed without cancellation
    log_a: np.ndarray                 # (C,) ln a
    y: np.ndarray                     # (C,) target: one-hot, probabilities, or [label]
    label: int | None                 # the class index, when the target is one
    target: int                       # the target class: the label, or the largest y
    loss: float                       # C = -sum y ln a (binary: BCE), from the float64 kernel
    gradient: np.ndarray              # (C,) dC/dz from the kernel: (sum y) a - y
    jacobian: np.ndarray | None       # (C, C) when C <= FULL_C, else None (see jacobian_cols)
    probed: np.ndarray                # classes probed by finite differences (all, up to FULL_C)
    jacobian_cols: np.ndarray         # (C, P) J[:, probed]
    jacobian_fd: np.ndarray           # (C, P) central differences of softmax: column i = da/dz_i
    jacobian_fd_bound: np.ndarray     # (C, P) bound on their error
    dC_da: np.ndarray                 # (C,) -y/a, 0 where y = 0
    dC_da_fd: np.ndarray              # (C,) central differences of C(a); NaN where not probed
    chain_rule: np.ndarray            # (C,) J^T dC/da, the literal product
    a_minus_y: np.ndarray             # (C,) a - y, without cancellation where a ~ 1
    fd: np.ndarray                    # (C,) central differences of the loss; NaN where not probed
    fd_bound: np.ndarray              # (C,) bound on their error
    checks: tuple[CheckResult, ...]
    notes: tuple[str, ...]
    problem: SoftmaxCE | SigmoidBCE   # the kernel's problem, for --steps

    @property
    def n_classes(self) -> int:
        return int(self.z.size)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass(frozen=True)
class SaturationRow:
    """One row of the --compare-mse table: the wrong logit at `z`."""

    offset: float        # how far the wrong logit was pushed (multiclass: above the other logits)
    z: float             # the wrong logit
    sigma: float         # sigmoid(z)
    sigma_prime: float   # sigmoid'(z)
    mse: float           # the MSE + sigmoid error (s - y) s' at the wrong entry
    ce: float            # the cross-entropy error a - y at the wrong entry
    ce_target: float     # the cross-entropy error at the target class (multiclass; NaN for binary)


@dataclass(frozen=True, eq=False)
class MseComparison:
    """--compare-mse: the quadratic cost on sigmoid outputs, M = 1/2 sum (s - y)^2, whose output
    error (s - y) * s'(z) carries the factor s' that vanishes when s saturates, against CE's a - y."""

    wrong: int                        # the class whose logit grows in the saturation table
    sigma: np.ndarray
    sigma_prime: np.ndarray
    mse_error: np.ndarray             # (s - y) * s'
    mse_fd: np.ndarray                # central differences of M; NaN where not probed
    ce_error: np.ndarray              # a - y
    saturation: tuple[SaturationRow, ...]
    checks: tuple[CheckResult, ...]


@dataclass(frozen=True, eq=False)
class StepCurve:
    """--steps: |finite difference - derivative| against the step h, for one entry."""

    entry: int
    z: float
    derivative: float                 # the kernel's dC/dz at the entry
    h: np.ndarray                     # relative steps, largest first (the grid plus eps^(1/3)); the
                                      # perturbation is h * scale
    scale: float                      # max(1, |z|)
    fd: np.ndarray
    error: np.ndarray                 # |fd - derivative|
    bound: np.ndarray                 # rigorous bound on the error (the kernel's, undoubled)
    chosen: int                       # index of the step `grad` uses: eps^(1/3) max(1, |z|)
    best: int                         # index of the smallest measured error
    bound_best_h: float               # the (relative) step that minimises the bound
    checks: tuple[CheckResult, ...]
    skipped: int = 0                  # steps finite differences could not take (fd NaN)

    @property
    def optimum(self) -> float:
        """The textbook optimum eps^(1/3): truncation h^2 |C'''|/6 meets rounding eps |C|/h."""
        return KAPPA
