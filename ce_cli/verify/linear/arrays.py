"""`linear`'s own settings and your gradients as arrays it compares: shapes checked against the
problem, a transposed dL/dW kept and flagged, each with the tolerance of its dtype (its sums
accumulated in float32 at least)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.numerics import EPS
from ce_cli.models.linear import LinearCE
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.tolerance import EPS_ACCUMULATE, SIXTEEN_BIT, Tolerance


CONFIDENCE = 8.0       # c: a correct row fails a projection with probability <= 2 exp(-32)
FD_SAFETY = 2.0
EXACT_BLOCK_BYTES = 32 << 20   # --exact's dL/dW: each float64 block (vocabulary, rows or both)
FD_AUTO_DIRECTIONAL = 1 << 28  # N * V * H up to which `auto` probes every row
GAUSS_DENSITY = math.sqrt(2.0 / math.pi)
ACCUMULATE_EPS = float(np.finfo(np.float32).eps)  # kernels accumulate in float32 at least


@dataclass(frozen=True)
class LinearSettings:
    """Settings only `linear` has: `exact` computes every gradient entry (None: when every
    gradient you give is computed or stored in bf16 and N V H <= AUTO_EXACT,
    `resolve_exact`);
    `projections` (k) is the number of random projections per row; `weight_layout` VH
    (nn.Linear's (V, H)) or HV; `max_open_rows`: failing rows computed exactly to list the worst
    entries."""

    exact: bool | None = None
    projections: int = 8
    weight_layout: str = "VH"
    max_open_rows: int = 16

    def __post_init__(self) -> None:
        if self.projections < 1:
            raise CeCheckError(f"`projections`: must be at least 1, got {self.projections}")
        if self.weight_layout not in ("VH", "HV"):
            raise CeCheckError(f"`weight_layout`: unknown value '{self.weight_layout}' (use VH or HV)")

    def false_pass(self, ratio: float = 10.0) -> float:
        """Probability that a row whose error norm is `ratio` times its threshold passes."""
        return min(1.0, GAUSS_DENSITY / ratio) ** self.projections


LINEAR_FIELDS = frozenset(f.name for f in fields(LinearSettings))
# N V H up to which bf16 gradients are checked entry by entry by default: a projection's
# threshold sums every softmax term's 16-bit floor and passed a bf16 dL/dH twice too large;
# exact took 0.19 s against the projections' 0.14 s at 512 x 256 x 4,000 (5e8), 3.2 s against
# 0.55 s at 4,096 x 128 x 8,192
AUTO_EXACT = 1 << 30


def resolve_exact(settings: LinearSettings, problem: LinearCE,
                  tols: Iterable[Tolerance]) -> LinearSettings:
    """`settings` with `exact` decided: as given, or (None) True when every one of your
    gradients `tols` is computed or stored in bf16 and N V H <= AUTO_EXACT (float16 keeps the
    projections: `floor_terms`)."""
    if settings.exact is not None:
        return settings
    tols = list(tols)
    small = problem.n_rows * problem.n_classes * problem.hidden_size <= AUTO_EXACT
    return replace(settings, exact=small and bool(tols) and all(t.coarse == "bf16" for t in tols))


@dataclass
class UserArray:
    """One of your gradients as rows, the tolerance it is held to, and how to name an entry."""

    rows: Any
    tol: Tolerance
    index_of: Callable[[int, int], tuple[int, ...]]
    transposed: bool = False


def floor_terms(tols: Iterable[Tolerance]) -> tuple[float, tuple[float, float], bool]:
    """The gradient floor's |lse| weight, the logit-error weights (`LinearCE.logit_error`) and
    whether your loss may be a 16-bit computation's (`loss_floor16`), for your gradients'
    tolerances `tols`. One floor serves them all, so it is bf16's only when each is computed
    in bf16: |lse| at weight 1/4 (`Tolerance.lse_weight`, as `grad`) and the logits rounded to
    bf16 once, half an ulp of the row's largest |z|, after a float32 accumulation. float16
    keeps float32's (weight 1, |h_n|_2 max|W_v|_2 units of eps): its subnormal range rounds
    the (N, V) gradient G at 6e-8 absolute, which dL/dW and dL/db sum over N rows and only
    that wider floor covered (PyTorch's float16 autograd failed the tighter one)."""
    tols = list(tols)
    sixteen = bool(tols) and all(t.precision in SIXTEEN_BIT for t in tols)
    if not sixteen or any(t.precision != "bf16" for t in tols):
        return 1.0, (0.0, 1.0), sixteen
    return max(t.lse_weight for t in tols), (0.5, EPS_ACCUMULATE / min(t.eps for t in tols)), True


def _tolerance(dtype: np.dtype, opts: CheckOptions, problem: LinearCE, n_terms: int) -> Tolerance:
    """`grad`'s tolerance of your gradient, its default floor widened by the accumulation of
    the n_terms products each entry sums (rows for dL/dW and dL/db, the vocabulary for dL/dH):
    4 log2(n) units of the accumulating precision (float32 for float32 and narrower outputs),
    as a blocked or pairwise GEMM of a correct kernel rounds that much of sum |G| |x|."""
    tol = opts.tolerance(dtype)
    cw = float(np.abs(problem.class_weight).max()) if problem.class_weight is not None else 1.0
    tol = replace(tol, tiny=tol.tiny * max(1.0, tol.floor_factor / 2.0 * (1.0 + cw * problem.grad_scale)))
    if opts.floor_factor is not None or tol.eps <= 0:
        return tol
    acc = max(EPS, min(tol.eps, ACCUMULATE_EPS))
    widen = math.ceil(4.0 * acc / tol.eps * math.log2(max(2, n_terms)) - 1e-9)
    return replace(tol, floor_factor=tol.floor_factor + widen)


def _float_array(arr: Any, source: str) -> np.ndarray:
    a = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise CeCheckError(f"{source}: dtype {a.dtype} is not floating point")
    return a


def user_arrays(problem: LinearCE, grads: dict[str, Any], src: dict[str, str], opts: CheckOptions,
                layout: str) -> dict[str, UserArray]:
    """Your gradients, shape-checked against the problem (a transposed dL/dW is kept, flagged)."""
    out: dict[str, UserArray] = {}
    N, V, H = problem.n_rows, problem.n_classes, problem.hidden_size
    if grads.get("grad_hidden") is not None:
        gh = _float_array(grads["grad_hidden"], src["grad_hidden"])
        want = problem.batch_shape + (H,)
        if gh.shape != want:
            raise CeCheckError(f"{src['grad_hidden']}: shape {gh.shape} does not match the hidden "
                               f"states {want}")
        out["grad_hidden"] = UserArray(gh.reshape(N, H), _tolerance(gh.dtype, opts, problem, V),
                                       lambda r, c: problem.batch_index(r) + (c,))
    if grads.get("grad_weight") is not None:
        out["grad_weight"] = _user_weight(problem, grads["grad_weight"], src["grad_weight"], opts, layout)
    if grads.get("grad_bias") is not None:
        gb = _float_array(grads["grad_bias"], src["grad_bias"])
        if problem.bias is None:
            raise CeCheckError(f"{src['grad_bias']}: a bias gradient needs the bias (`bias`)")
        if gb.shape != (V,):
            raise CeCheckError(f"{src['grad_bias']}: shape {gb.shape}; expected ({V},)")
        out["grad_bias"] = UserArray(gb.reshape(1, V), _tolerance(gb.dtype, opts, problem, N),
                                     lambda r, c: (c,))
    return out


def _user_weight(problem: LinearCE, arr: Any, source: str, opts: CheckOptions, layout: str) -> UserArray:
    gw = _float_array(arr, source)
    V, H = problem.n_classes, problem.hidden_size
    want = (V, H) if layout == "VH" else (H, V)
    tol = _tolerance(gw.dtype, opts, problem, problem.n_rows)
    if gw.shape == want:
        rows = gw if layout == "VH" else gw.T
        transposed = False
    elif gw.shape == want[::-1]:
        rows = gw.T if layout == "VH" else gw
        transposed = True
    else:
        raise CeCheckError(f"{source}: shape {gw.shape} does not match the weight; expected {want}")

    def index_of(v: int, j: int) -> tuple[int, ...]:
        vh = (v, j) if layout == "VH" else (j, v)
        return vh[::-1] if transposed else vh

    return UserArray(rows, tol, index_of, transposed)
