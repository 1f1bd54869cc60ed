"""The binary derivation (sigmoid BCE), one logit z and a label y in [0, 1]:

    s = sigmoid(z),  s' = s (1 - s),  dC/ds = -y/s + (1 - y)/(1 - s),  dC/dz = s' dC/ds = s - y

The same checks as the multiclass derivation, on the one logit (ce_cli.explain.softmax), with
the loss from the float64 kernel of ce_cli.models.sigmoid.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from numpy.typing import ArrayLike

from ce_cli.errors import CeCheckError
from ce_cli.explain.common import (
    CHAIN_RTOL,
    KAPPA,
    SAFETY,
    SIGMA3_MAX,
    compare,
    cube_term,
    fd_compare,
    fd_skip_note,
    kernel_loss_grad,
    loss_fd,
    open_interval_check,
    scalar_index,
    sigmoid,
    vector_index,
)
from ce_cli.explain.results import Explanation
from ce_cli.kernels.numerics import EPS, softplus
from ce_cli.models.sigmoid import build_sigmoid_bce
from ce_cli.verify.finite_diff import step_for
from ce_cli.verify.results import CheckResult

_ONE = vector_index(np.array([0]))


def explain_binary(z: ArrayLike, y: ArrayLike) -> Explanation:
    """The derivation for one logit z and a label y in [0, 1] (sigmoid BCE)."""
    x = float(np.asarray(z, dtype=np.float64).reshape(-1)[0]) if np.size(z) == 1 else None
    if x is None:
        raise CeCheckError(f"logits: --kind binary explains one logit; got {np.size(z)} values")
    if not math.isfinite(x):
        raise CeCheckError(f"logits: the logit is {x}; --kind binary needs a finite logit")
    yv = float(np.asarray(y, dtype=np.float64).reshape(-1)[0])
    if not 0.0 <= yv <= 1.0:
        raise CeCheckError(f"label {yv!r} is outside [0, 1]")
    with np.errstate(all="ignore"):
        return _explain_binary(x, yv)


def _dC_ds(s: np.ndarray, q: np.ndarray, yv: float) -> tuple[np.ndarray, np.ndarray]:
    """The two terms of dC/ds, -y/s and (1 - y)/(1 - s), each 0 where its term of C is absent."""
    return np.where(yv != 0, -yv / s, 0.0), np.where(yv != 1, (1.0 - yv) / q, 0.0)


def _explain_binary(x: float, yv: float) -> Explanation:
    z = np.array([x])
    y = np.array([yv])
    s = sigmoid(z)                 # s(z)
    q = sigmoid(-z)                # 1 - s(z), without cancellation
    log_s = -softplus(-z)
    label = int(yv) if yv in (0.0, 1.0) else None
    problem, _ = build_sigmoid_bce(z, y, reduction="sum")
    loss, gradient = kernel_loss_grad(problem)

    jac = (s * q).reshape(1, 1)                                 # s' = s (1 - s)
    pos, neg = _dC_ds(s, q, yv)
    g = pos + neg
    chain = jac.T @ g
    absdot = np.abs(jac).T @ np.abs(pos) + np.abs(jac).T @ np.abs(neg)
    a_minus_y = np.where(x > 0, (1.0 - y) - q, s - y)
    probed = np.array([0])

    h = step_for(z)
    zp, zm = z + h, z - h
    d = zp - zm
    sp, sm = sigmoid(zp), sigmoid(zm)
    jfd = ((sp - sm) / d).reshape(1, 1)
    jbound = (SAFETY * (EPS * (sp + sm + 2.0) / d + (d / 2.0) ** 2 * SIGMA3_MAX / 6.0)).reshape(1, 1)

    fd, fd_bound = loss_fd(problem, z, probed, h)
    dfd, dfd_allowed = _dC_ds_fd(float(s[0]), float(q[0]), yv, float(g[0]))

    expl = Explanation("binary", z, s, q, log_s, y, label, 0, loss, gradient, jac, probed, jac.copy(), jfd,
                       jbound, g, np.array([dfd]), chain, a_minus_y, fd, fd_bound, (), (), problem)
    checks, skipped = _binary_checks(expl, dfd_allowed, absdot)
    return replace(expl, checks=checks, notes=_binary_notes(expl, skipped))


def _binary_checks(e: Explanation, dfd_allowed: float, absdot: np.ndarray
                   ) -> tuple[tuple[CheckResult, ...], int]:
    """Steps 2-8 on the one logit: s + (1 - s) = 1, 0 < s < 1, s' and dC/ds against central
    differences, s' dC/ds against s - y, s - y against the loss's finite differences (skipped,
    and counted, where that probe cannot be taken)."""
    s, q, a_minus_y = e.a, e.one_minus_a, e.a_minus_y
    fd_check, skipped = fd_compare(
        "fd_vs_a_minus_y", a_minus_y, e.fd, SAFETY * e.fd_bound,
        "s - y vs (C(z + h) - C(z - h))/2h, h = eps^(1/3) max(1, |z|), C from the float64 kernel: "
        "within twice the kernel's bound", expected_label="s - y", index=_ONE)
    return (
        compare("sigmoid_sums_to_1", [1.0], [s[0] + q[0]], [4.0 * EPS * (3.0 + math.log(2.0))],
                "|s(z) + s(-z) - 1| <= 4 eps (3 + ln 2) (softmax over [0, z] is [1 - s, s], C = 2)",
                expected_label="1", got_label="s(z) + s(-z)", index=scalar_index),
        open_interval_check("sigmoid_in_0_1", "s", s, e.log_a, q, np.zeros(1, dtype=bool)),
        compare("jacobian_vs_fd", e.jacobian_cols.reshape(-1), e.jacobian_fd.reshape(-1),
                e.jacobian_fd_bound.reshape(-1),
                "s' = s (1 - s) vs (s(z + h) - s(z - h))/2h, h = eps^(1/3) max(1, |z|): within "
                "2 (eps (s+ + s- + 2)/2h + h^2/48)",
                expected_label="s(1-s)", got_label="finite diff", index=_ONE),
        compare("dC_da_vs_fd", e.dC_da, e.dC_da_fd, [dfd_allowed],
                "-y/s + (1 - y)/(1 - s) vs central differences of C(s) = -y ln s - (1 - y) ln(1 - s) in s, "
                "step eps^(1/3) min(s, 1 - s), with s and 1 - s carried separately: within 2 (rounding + "
                "truncation) + the step mismatch of 1 - s + 4 eps |dC/ds|",
                expected_label="dC/ds", got_label="finite diff", index=_ONE),
        compare("chain_rule_vs_a_minus_y", a_minus_y, e.chain_rule,
                np.maximum(CHAIN_RTOL * np.maximum(1.0, np.abs(a_minus_y)), 12.0 * EPS * absdot),
                "s' dC/ds vs s - y: within 1e-12 max(1, |s - y|) (or 12 eps (|s' y/s| + |s' (1 - y)/(1 - s)|), "
                "if larger)",
                expected_label="s - y", got_label="s' dC/ds", index=_ONE),
        fd_check,
    ), skipped


def _binary_notes(e: Explanation, fd_skipped: int) -> tuple[str, ...]:
    notes = [] if not fd_skipped else [fd_skip_note(fd_skipped, e.fd.size)]
    if not np.isfinite(e.dC_da).all():
        notes.append(f"s = exp({float(e.log_a[0]):.1f}) or 1 - s is below float64's range for 1/s: "
                     "dC/ds is not representable, so the literal chain rule fails in float64 while "
                     "s - y stays exact; this is why frameworks fuse the sigmoid with the cross-entropy")
    return tuple(notes)


def _dC_ds_fd(p: float, q: float, y: float, g: float) -> tuple[float, float]:
    """Central difference of C(s) = -y ln s - (1 - y) ln(1 - s) along s, with s = p and 1 - s = q
    stored separately (p + h pairs with q - h), step h = eps^(1/3) min over the present terms.

    The step d is the realised one on the side of the smaller present term, (p + h) - (p - h) or
    (q + h) - (q - h): that side holds h to full precision (the other may be ~1). Bound: rounding
    2 eps (1 + |ln|) per present term and evaluation, over d; truncation (d/2)^2/6 (2y/(p - h)^3
    + 2(1 - y)/(q - h)^3); the other side's realised step differs from d, adding
    |dC/d(that term)| |d_other - d|/d."""
    present = [(v, side) for v, side, on in ((p, "p", y != 0), (q, "q", y != 1)) if on]
    m, side = min(present)
    h = KAPPA * m
    pp, pm = p + h, p - h
    qp, qm = q + h, q - h
    dp, dq = pp - pm, qp - qm
    d = dp if side == "p" else dq
    if not d > 0.0:
        return math.nan, 0.0  # s or 1 - s is 0 in float64 (|z| > 745): no step fits

    def cost(ps: float, qs: float) -> float:
        return ((-y * math.log(ps) if y != 0 else 0.0)
                + (-(1.0 - y) * math.log(qs) if y != 1 else 0.0))

    fd = (cost(pp, qm) - cost(pm, qp)) / d
    rounding = 2.0 * 2.0 * EPS * ((y * (1.0 + abs(math.log(p))) if y != 0 else 0.0)
                                 + ((1.0 - y) * (1.0 + abs(math.log(q))) if y != 1 else 0.0)) / d
    truncation = ((cube_term(y, p, d) if y != 0 else 0.0)
                  + (cube_term(1.0 - y, q, d) if y != 1 else 0.0))
    mismatch = ((abs(y / p) * abs(dp - d) if y != 0 else 0.0)
                + (abs((1.0 - y) / q) * abs(dq - d) if y != 1 else 0.0)) / d
    return fd, SAFETY * (rounding + truncation) + mismatch + 4.0 * EPS * abs(g)
