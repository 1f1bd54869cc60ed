"""One cell of the grid: its inputs (a `Case`), what the implementation produced (an `Outcome`)
and the verdict (a `Cell`).

The implementation gets the logits rounded to the dtype under test; the reference is the float64
loss and gradient *of those same rounded inputs*, judged by `check_grad` / `check_binary` with
`precision=<dtype>` and `fd="off"`: the tolerance model of `ce-check grad`. NaN or inf where the
reference is finite always fails.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np

from ce_cli.enums import Kind, Reduction
from ce_cli.errors import CeCheckError
from ce_cli.stress.dtypes import bf16_to_f32, is_bfloat16, numpy_dtype
from ce_cli.stress.scenarios import Scenario
from ce_cli.verify.checks import check_binary, check_grad
from ce_cli.verify.results import CheckResult, Report
from ce_cli.verify.tolerance import PRECISIONS


@dataclass(frozen=True)
class Case:
    """One cell's inputs: in the dtype under test (what the implementation gets) and as float64
    (the same rounded values, what the reference gets)."""

    scenario: str
    scale: float
    dtype: str
    logits: np.ndarray
    labels: np.ndarray
    logits64: np.ndarray
    labels64: np.ndarray


def _rng(seed: int, scenario: str, scale: float) -> np.random.Generator:
    """A generator fixed by (seed, scenario, scale): a cell's inputs never depend on the grid."""
    return np.random.default_rng([seed, zlib.crc32(scenario.encode()),
                                  zlib.crc32(repr(float(scale)).encode())])


def make_case(kind: str, scenario: Scenario, scale: float, dtype: str, seed: int = 0) -> Case | None:
    """The cell's inputs, or None when the scale is not representable in the dtype."""
    npdt = numpy_dtype(dtype)
    z64, y = scenario.make(float(scale), _rng(seed, scenario.name, scale), PRECISIONS[dtype][0])
    with np.errstate(over="ignore"):
        z = z64.astype(npdt)
        z_ref = z.astype(np.float64)
    if np.any(np.isinf(z_ref) & np.isfinite(z64)):
        return None
    if kind == Kind.binary.value:
        labels = y.astype(npdt)
        labels64 = labels.astype(np.float64)
    else:
        labels = labels64 = y.astype(np.int64)
    return Case(scenario.name, float(scale), dtype, z, labels, z_ref, labels64)


@dataclass(frozen=True)
class Outcome:
    """What an implementation produced for one case: outputs, or why there are none."""

    loss: object = None
    grad: object = None
    error: str = ""              # one line; set when there are no outputs to judge
    reason: str = ""             # short class of the error: crash, timeout, bad output, ...
    stderr_tail: str = ""
    loss_expected: bool = True   # False for --impl-cmd templates without {loss}


@dataclass(frozen=True)
class Cell:
    """One judged cell of the grid."""

    impl: str
    scenario: str
    scale: float
    dtype: str
    ok: bool
    max_abs_err: float | None = None    # gradient
    max_rel_err: float | None = None    # gradient
    loss_err: float | None = None
    worst_ratio: float | None = None    # worst error / allowed error, gradient and loss
    reason: str = ""                    # short failure class: overflow, crash, timeout, ...
    error: str = ""                     # one line: why it failed
    where: tuple[int, ...] | None = None  # index of the worst (or first non-finite) entry
    stderr_tail: str = ""
    seconds: float = 0.0


def _as_float_array(value: object, what: str) -> tuple[np.ndarray | None, str]:
    """The output as a float array (bfloat16 widened to float32, exactly), or an error."""
    if value is None:
        return None, f"no {what} returned"
    try:
        arr = np.asarray(value)
    except Exception as exc:  # a user's object that numpy cannot read
        return None, f"{what} is not an array ({type(value).__name__}: {exc})"
    if is_bfloat16(arr.dtype):
        arr = bf16_to_f32(arr)
    if arr.dtype.kind == "i" or arr.dtype.kind == "u":
        return None, f"{what} has integer dtype {arr.dtype}"
    if arr.dtype.kind != "f":
        return None, f"{what} has dtype {arr.dtype}, not floating point"
    return arr, ""


def _loss_shape_error(kind: str, case: Case, loss: np.ndarray, reduction: str) -> str:
    """Reduction 'none' gives one loss per sample (per entry for binary), the others a scalar."""
    if reduction == Reduction.none.value:
        want = case.logits.shape if kind == Kind.binary.value else case.logits.shape[:1]
        if loss.shape != want:
            return f"loss has shape {loss.shape}; reduction 'none' gives shape {want}"
    elif loss.size != 1:
        return f"loss has shape {loss.shape}; reduction '{reduction}' gives a scalar"
    return ""


def _outputs(kind: str, case: Case, outcome: Outcome,
             reduction: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(grad, loss, "") as float arrays of the right shapes, or (None, None, why not)."""
    grad, err = _as_float_array(outcome.grad, "gradient")
    if grad is None:
        return None, None, err
    if grad.shape != case.logits.shape:
        return None, None, f"gradient has shape {grad.shape}, the logits {case.logits.shape}"
    if outcome.loss is None and not outcome.loss_expected:
        return grad, None, ""
    loss, err = _as_float_array(outcome.loss, "loss")
    if loss is None:
        return None, None, err
    err = _loss_shape_error(kind, case, loss, reduction)
    return (None, None, err) if err else (grad, loss, "")


def judge(kind: str, case: Case, outcome: Outcome, impl: str, reduction: str,
          seconds: float = 0.0) -> Cell:
    """The cell's verdict: the outputs against the float64 reference, under `grad`'s model."""
    failed = Cell(impl, case.scenario, case.scale, case.dtype, ok=False, seconds=seconds,
                  stderr_tail=outcome.stderr_tail)
    if outcome.error:
        return replace(failed, reason=outcome.reason or "error", error=outcome.error)
    grad, loss, err = _outputs(kind, case, outcome, reduction)
    if grad is None:
        return replace(failed, reason="bad output", error=err)
    check = check_binary if kind == Kind.binary.value else check_grad
    try:
        with np.errstate(all="ignore"):
            report = check(case.logits64, case.labels64, grad=grad, loss=loss, reduction=reduction,
                           precision=case.dtype, fd="off", worst=1)
    except CeCheckError as exc:
        return replace(failed, reason="bad output", error=str(exc))
    return _verdict(failed, report, grad, loss)


def _verdict(base: Cell, report: Report, grad: np.ndarray, loss: np.ndarray | None) -> Cell:
    """The cell from the check's report: errors, worst error / allowed, and why it failed."""
    checks = {c.name: c for c in report.checks}
    g = checks["grad_vs_reference"]
    lc = checks.get("loss_vs_reference")
    ratios = [e.abs_err / e.allowed if e.allowed > 0 else math.inf
              for c in (g, lc) if c is not None for e in c.worst]
    ratios = [r if math.isfinite(r) else math.inf for r in ratios]
    ok = g.ok and (lc is None or lc.ok)
    reason, error, where = "", "", None
    if not ok:
        reason, error, where = _explain(g, lc, grad, loss, report.loss)
    return replace(base, ok=ok, max_abs_err=g.max_abs_err, max_rel_err=g.max_rel_err,
                   loss_err=lc.max_abs_err if lc is not None else None,
                   worst_ratio=max(ratios) if ratios else 0.0, reason=reason, error=error,
                   where=where)


# a failure: (rank, reason, one line, index of the entry or None); the lowest rank names the cell
_Failure = tuple[int, str, str, "tuple[int, ...] | None"]


def _grad_failure(g: CheckResult, grad: np.ndarray) -> _Failure:
    """Non-finite gradient entries (rank 0), else the worst error past its allowance (rank 2)."""
    with np.errstate(all="ignore"):
        g64 = np.asarray(grad, dtype=np.float64)
        bad = ~np.isfinite(g64)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return (0, "nan grad" if np.isnan(g64).any() else "inf grad",
                f"gradient: {int(bad.sum())} of {bad.size} entries NaN/inf (first at {where})", where)
    e = g.worst[0]
    return (2, "grad error", f"gradient: error {e.abs_err:.3g} at {e.index} > allowed "
            f"{e.allowed:.3g} (reference {e.expected:.6g}, got {e.got:.6g})", tuple(e.index))


def _loss_failure(lc: CheckResult, loss: np.ndarray | None, ref_loss: float) -> _Failure:
    """NaN loss (rank 1), inf loss (rank 1), else a loss error past its allowance (rank 3)."""
    got = np.asarray(loss, dtype=np.float64)
    if np.isnan(got).any():
        rank, reason = 1, "nan loss"
    elif np.isinf(got).any():
        rank, reason = 1, "inf loss"
    else:
        rank, reason = 3, "loss error"
    if got.size == 1:
        return rank, reason, f"loss {float(got.reshape(-1)[0]):.6g}, reference {ref_loss:.6g}", None
    e = lc.worst[0]
    return (rank, reason, f"loss: error {e.abs_err:.3g} at {e.index} > allowed {e.allowed:.3g}",
            tuple(e.index))


def _explain(g: CheckResult, lc: CheckResult | None, grad: np.ndarray, loss: np.ndarray | None,
             ref_loss: float) -> tuple[str, str, tuple[int, ...] | None]:
    """A short reason, one line, and the index of the worst entry for a failed cell.

    Reasons, most telling first: nan/inf grad, nan/inf loss, grad error, loss error."""
    failures = []
    if not g.ok:
        failures.append(_grad_failure(g, grad))
    if lc is not None and not lc.ok:
        failures.append(_loss_failure(lc, loss, ref_loss))
    if not failures:
        return "error", "", None
    where = next((f[3] for f in failures if f[3] is not None), None)
    reason = min((f[0], f[1]) for f in failures)[1]
    return reason, "; ".join(f[2] for f in failures), where
