"""`ce-check stress`: where does a softmax cross-entropy (or sigmoid BCE) implementation break?

A grid of cells: implementation x scenario x logit scale x dtype. Every cell builds deterministic
logits (float64), rounds them to the dtype under test, runs the implementation on the rounded
logits, and judges its loss and gradient with `check_grad` / `check_binary` against the float64
reference *of the same rounded inputs*, with `precision=<dtype>` and `fd="off"`: the same
tolerance model as `ce-check grad`. NaN or inf where the reference is finite always fails.

Built-in implementations (textbook forms, computed in the dtype under test; row sums and the
reduction accumulate in float32 for 16-bit dtypes, as GPU kernels do, and the reduced loss is
returned in that accumulator):

- `naive_softmax_ce`:   p = exp(z) / sum exp(z), loss = -log p_y       (exp overflows past ln(max))
- `shifted_softmax_ce`: p = exp(z - m) / sum exp(z - m), loss = -log p_y (p_y underflows to 0)
- `log_softmax_ce`:     log p = (z - m) - log sum exp(z - m)             (stable)
- `naive_sigmoid_bce`:  s = 1 / (1 + exp(-x)), loss = -(y log s + (1 - y) log(1 - s))
- `stable_sigmoid_bce`: loss = y softplus(-x) + (1 - y) softplus(x), softplus via log1p(exp(-|x|))

Each takes `(logits, labels, reduction="mean")` and returns `(loss, grad)`, the signature
`--impl` expects, so `--impl ce_cli.stress:naive_softmax_ce` runs one of them as a user's.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ce_cli.verify.checks import check_binary, check_grad, reference
from ce_cli.errors import CeCheckError
from ce_cli.models.sigmoid import build_sigmoid_bce
from ce_cli.verify.tolerance import PRECISIONS, parse_precision

IGNORE_INDEX = -100
KINDS = ("multiclass", "binary")
DTYPES = ("f16", "bf16", "f32", "f64")
DEFAULT_SCALES = (1.0, 10.0, 30.0, 100.0, 1e3, 1e4)
DTYPE_NAMES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64"}

# largest finite value of each dtype
_MAX = {"f16": 65504.0, "bf16": (2.0 - 2.0**-7) * 2.0**127, "f32": (2.0 - 2.0**-23) * 2.0**127,
        "f64": float(np.finfo(np.float64).max)}


@dataclass(frozen=True)
class Thresholds:
    """Where the textbook forms break, analytically, for one dtype."""

    dtype: str
    exp_overflow: float        # exp(z) = inf past z = ln(max)
    softmax_underflow: float   # exp(-g) rounds to 0 (log -> -inf) for gaps g past -ln(min subnormal)
    sigmoid_saturation: float  # s(x) rounds to 1 (1 - s(x) = 0) past x = ln(2/eps)
    eps: float


def thresholds(dtype: str) -> Thresholds:
    eps, tiny = PRECISIONS[dtype]
    return Thresholds(dtype, math.log(_MAX[dtype]), -math.log(tiny), math.log(2.0 / eps), eps)


def bfloat16_dtype():
    """ml_dtypes.bfloat16 when the optional `ml_dtypes` package is installed, else None."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


BF16_MISSING = "bf16 skipped: install the optional ml_dtypes package (pip install ml_dtypes)"


def numpy_dtype(name: str):
    """The numpy dtype for f16/bf16/f32/f64 (None for bf16 without ml_dtypes)."""
    if name == "bf16":
        bf = bfloat16_dtype()
        return None if bf is None else np.dtype(bf)
    return np.dtype(DTYPE_NAMES[name])


def is_bfloat16(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.name == "bfloat16" or (dtype.kind == "V" and dtype.itemsize == 2)


def as_storable(arr: np.ndarray) -> np.ndarray:
    """bfloat16 has no .npy type any other reader knows: it travels as float32 (exactly)."""
    arr = np.asarray(arr)
    return arr.astype(np.float32) if is_bfloat16(arr.dtype) else arr


def parse_dtypes(text: str | None) -> tuple[tuple[str, ...], list[str]]:
    """The dtypes to run (in f16, bf16, f32, f64 order) and notes about skipped ones.

    By default every dtype, bf16 only when ml_dtypes imports; asking for bf16 without it is an
    error."""
    notes: list[str] = []
    if text is None:
        chosen = list(DTYPES)
        if bfloat16_dtype() is None:
            chosen.remove("bf16")
            notes.append(BF16_MISSING)
        return tuple(chosen), notes
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CeCheckError("--dtypes: empty list (use f16, bf16, f32, f64, comma separated)")
    chosen = set()
    for name in names:
        try:
            chosen.add(parse_precision(name))
        except CeCheckError:
            raise CeCheckError(f"--dtypes: unknown dtype '{name}' (use f16, bf16, f32, f64)") from None
    if "bf16" in chosen and bfloat16_dtype() is None:
        raise CeCheckError("--dtypes: bf16 needs the optional ml_dtypes package (pip install ml_dtypes)")
    return tuple(d for d in DTYPES if d in chosen), notes


def parse_scales(text: str | None) -> tuple[float, ...]:
    if text is None:
        return DEFAULT_SCALES
    out = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        try:
            value = float(tok)
        except ValueError:
            raise CeCheckError(f"--scales: '{tok}' is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise CeCheckError(f"--scales: scales must be finite and > 0, got '{tok}'")
        out.append(value)
    if not out:
        raise CeCheckError("--scales: empty list (e.g. --scales 1,10,100)")
    return tuple(sorted(set(out)))


# ---------------------------------------------------------------------------------------------
# scenarios


@dataclass(frozen=True)
class Scenario:
    """A family of inputs; `make(scale, rng, eps)` gives float64 logits and labels."""

    name: str
    kind: str
    description: str
    make: Callable[[float, np.random.Generator, float], tuple[np.ndarray, np.ndarray]]


def _spread(rng, n, c, s):
    """Each row's largest logit exactly s, the others uniform in [-s, s - min(s, 3)]: the row's
    log-sum-exp stays within 0.3 of s (C = 8), so an overflow shows at the scale itself."""
    z = rng.uniform(-s, s - min(s, 3.0), size=(n, c))
    z[np.arange(n), rng.integers(0, c, size=n)] = s
    return z


def _upper_labels(rng, z):
    """A random class among each row's logits >= 0: the label a trained model ranks high."""
    keys = np.where(z >= 0, rng.random(z.shape), -1.0)
    return keys.argmax(axis=1).astype(np.int64)


def _mc_spread(s, rng, _eps, n=16, c=8):
    z = _spread(rng, n, c, s)
    return z, _upper_labels(rng, z)


def _mc_far_label(s, rng, _eps, n=16, c=8):
    z = _spread(rng, n, c, s)
    top = z.argmax(axis=1)
    y = (top + rng.integers(1, c, size=n)) % c
    z[np.arange(n), y] = -s
    return z, y.astype(np.int64)


def _mc_ties(s, rng, _eps, n=16, c=8):
    z = rng.uniform(-s, s, size=(n, c))
    pair = np.stack([rng.permutation(c)[:2] for _ in range(n)])
    r = np.arange(n)
    z[r, pair[:, 0]] = s
    z[r, pair[:, 1]] = s
    y = _upper_labels(rng, z)
    y[::2] = pair[::2, 1]
    return z, y


def _mc_dominant(s, rng, eps, n=16, c=8):
    # past the margin where p_y rounds to 1 in the dtype: (C - 1) e^-M < eps / 2, plus 2
    margin = math.log(c - 1) + math.log(2.0 / eps) + 2.0
    z = s - margin - rng.uniform(0.0, 1.0, size=(n, c))
    y = rng.integers(0, c, size=n)
    z[np.arange(n), y] = s
    return z, y.astype(np.int64)


def _mc_masked(s, rng, _eps, n=16, c=8):
    z = _spread(rng, n, c, s)
    y = _upper_labels(rng, z)
    mask = rng.random(z.shape) < 0.25
    mask[0] = True                  # row 0: every entry but the label masked
    mask[np.arange(n), y] = False
    z[mask] = -np.inf
    return z, y


def _mc_equal(s, rng, _eps, n=16, c=8):
    return np.full((n, c), float(s)), rng.integers(0, c, size=n).astype(np.int64)


def _mc_two_class(s, rng, _eps, n=32):
    z = _spread(rng, n, 2, s)
    return z, rng.integers(0, 2, size=n).astype(np.int64)


def _mc_ignored(s, rng, _eps, n=16, c=8):
    z, y = _mc_spread(s, rng, _eps, n, c)
    y[::4] = IGNORE_INDEX
    return z, y


VOCAB = 131_072


def _mc_vocab(s, rng, _eps, n=2, c=VOCAB):
    return _mc_spread(s, rng, _eps, n, c)


def _bin_spread(s, rng, _eps, n=16, k=8):
    x = _spread(rng, n, k, s)
    x[np.arange(n), (x.argmax(axis=1) + 1) % k] = -s
    return x, rng.integers(0, 2, size=(n, k)).astype(np.float64)


def _bin_saturated(s, rng, _eps, n=16, k=8):
    sign = rng.choice([-1.0, 1.0], size=(n, k))
    agree = (sign > 0).astype(np.float64)
    y = np.where(rng.random((n, k)) < 0.5, agree, 1.0 - agree)
    return sign * s, y


def _bin_soft(s, rng, _eps, n=16, k=8):
    x, _ = _bin_spread(s, rng, _eps, n, k)
    return x, rng.uniform(0.0, 1.0, size=(n, k))


def _bin_many(s, rng, _eps):
    return _bin_spread(s, rng, _eps, n=2, k=VOCAB // 2)


SCENARIOS: dict[str, tuple[Scenario, ...]] = {
    "multiclass": (
        Scenario("spread", "multiclass", "16x8 logits uniform in [-s, s], row max exactly s; labels "
                 "on logits >= 0", _mc_spread),
        Scenario("far-label", "multiclass", "the label on a logit at -s, the row max at s: a confidently "
                 "wrong row, gap 2s", _mc_far_label),
        Scenario("ties", "multiclass", "two logits tied at the max s; half the labels on a tied class",
                 _mc_ties),
        Scenario("dominant", "multiclass", "the label's logit s, the others a margin below it past "
                 "where p_y - 1 cancels in the dtype (ln(C-1) + ln(2/eps) + 2)", _mc_dominant),
        Scenario("masked", "multiclass", "spread with a quarter of the non-label entries -inf; row 0 "
                 "all -inf but the label", _mc_masked),
        Scenario("equal", "multiclass", "all logits equal s", _mc_equal),
        Scenario("two-class", "multiclass", "32x2 logits, random labels", _mc_two_class),
        Scenario("ignored", "multiclass", f"spread with every 4th row's label ignore_index "
                 f"({IGNORE_INDEX})", _mc_ignored),
        Scenario("vocab", "multiclass", f"2 rows of {VOCAB:,} classes, spread", _mc_vocab),
    ),
    "binary": (
        Scenario("spread", "binary", "16x8 logits uniform in [-s, s] with -s and s in every row; "
                 "labels 0/1", _bin_spread),
        Scenario("saturated", "binary", "logits +-s; half the labels agree with the sign, half "
                 "contradict it", _bin_saturated),
        Scenario("soft", "binary", "spread logits, soft labels uniform in [0, 1]", _bin_soft),
        Scenario("many", "binary", f"2 x {VOCAB // 2:,} spread logits, labels 0/1", _bin_many),
    ),
}


def parse_scenarios(kind: str, text: str | None) -> tuple[Scenario, ...]:
    known = SCENARIOS[kind]
    if text is None:
        return known
    by_name = {s.name: s for s in known}
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise CeCheckError(f"--scenarios: unknown scenario '{unknown[0] if unknown else ''}' for "
                           f"--kind {kind} (use {', '.join(by_name)})")
    return tuple(s for s in known if s.name in names)


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
    if kind == "binary":
        labels = y.astype(npdt)
        labels64 = labels.astype(np.float64)
    else:
        labels = labels64 = y.astype(np.int64)
    return Case(scenario.name, float(scale), dtype, z, labels, z_ref, labels64)


# ---------------------------------------------------------------------------------------------
# built-in implementations


def _acc(dtype: np.dtype) -> np.dtype:
    """Accumulator: float32 for 16-bit dtypes (as GPU kernels do), else the dtype itself."""
    return np.dtype(np.float32) if dtype.itemsize <= 2 else dtype


def _const(value, dtype):
    return np.asarray(value, dtype=dtype)


def _reduce(items: np.ndarray, grad: np.ndarray, valid: np.ndarray, reduction: str):
    """Reduce per-sample losses (dtype) and scale the gradient of the per-sample losses.

    The reduced loss stays in the accumulator (float32 for 16-bit dtypes): a float16 sum of
    131,072 losses can pass 65504. The gradient is returned in the dtype."""
    dt = items.dtype
    acc = _acc(dt)
    zero = _const(0, dt)
    items = np.where(valid, items, zero)
    grad = np.where(valid.reshape(valid.shape + (1,) * (grad.ndim - valid.ndim)), grad, zero)
    if reduction == "none":
        return items, grad
    total = items.astype(acc).sum()
    if reduction == "sum":
        return total, grad
    count = int(np.count_nonzero(valid))
    if count == 0:
        return _const(np.nan, acc), np.zeros_like(grad)
    # the 1/count scaling in the accumulator: a float16 count past 65504 would be inf
    return total / acc.type(count), (grad.astype(acc) / count).astype(dt)


def _labels(labels):
    y = np.asarray(labels).astype(np.int64)
    valid = y != IGNORE_INDEX
    return np.where(valid, y, 0), valid


def _minus_onehot(p, ys):
    g = p.copy()
    r = np.arange(p.shape[0])
    g[r, ys] = g[r, ys] - _const(1, p.dtype)
    return g


def _row_max(z):
    m = z.max(axis=-1, keepdims=True)
    return np.where(np.isfinite(m), m, _const(0, z.dtype))


def naive_softmax_ce(logits, labels, reduction: str = "mean"):
    """Textbook softmax then log: p = exp(z) / sum exp(z); exp overflows past ln(max)."""
    return _softmax_then_log(logits, labels, reduction, shift=False)


def shifted_softmax_ce(logits, labels, reduction: str = "mean"):
    """Max-shifted softmax then log: no overflow, but log(p_y) = -inf once p_y underflows."""
    return _softmax_then_log(logits, labels, reduction, shift=True)


def _softmax_then_log(logits, labels, reduction: str, shift: bool):
    z = np.asarray(logits)
    ys, valid = _labels(labels)
    with np.errstate(all="ignore"):
        e = np.exp(z - _row_max(z) if shift else z)
        p = e / e.sum(axis=-1, keepdims=True, dtype=_acc(z.dtype)).astype(z.dtype)
        loss = -np.log(p[np.arange(z.shape[0]), ys])
        return _reduce(loss, _minus_onehot(p, ys), valid, reduction)


def log_softmax_ce(logits, labels, reduction: str = "mean"):
    """Log-softmax via log-sum-exp: log p = (z - m) - log sum exp(z - m); gradient exp(log p) - y."""
    z = np.asarray(logits)
    ys, valid = _labels(labels)
    with np.errstate(all="ignore"):
        zs = z - _row_max(z)
        s = np.exp(zs).sum(axis=-1, keepdims=True, dtype=_acc(z.dtype))
        logp = zs - np.log(s).astype(z.dtype)
        loss = -logp[np.arange(z.shape[0]), ys]
        return _reduce(loss, _minus_onehot(np.exp(logp), ys), valid, reduction)


def naive_sigmoid_bce(logits, labels, reduction: str = "mean"):
    """Textbook BCE: s = 1/(1 + exp(-x)), -(y log s + (1 - y) log(1 - s)); 1 - s cancels."""
    x = np.asarray(logits)
    y = np.asarray(labels).astype(x.dtype)
    one = _const(1, x.dtype)
    with np.errstate(all="ignore"):
        s = one / (one + np.exp(-x))
        items = -(y * np.log(s) + (one - y) * np.log(one - s))
        return _reduce(items, s - y, np.ones(x.shape, dtype=bool), reduction)


def _softplus(x):
    return np.maximum(x, _const(0, x.dtype)) + np.log1p(np.exp(-np.abs(x)))


def stable_sigmoid_bce(logits, labels, reduction: str = "mean"):
    """Stable BCE: y softplus(-x) + (1 - y) softplus(x), both terms >= 0 (nothing cancels);
    s(x) from exp(-|x|) on the side where it cannot overflow."""
    x = np.asarray(logits)
    y = np.asarray(labels).astype(x.dtype)
    one, zero = _const(1, x.dtype), _const(0, x.dtype)
    with np.errstate(all="ignore"):
        items = (np.where(y != zero, y * _softplus(-x), zero)
                 + np.where(y != one, (one - y) * _softplus(x), zero))
        e = np.exp(-np.abs(x))
        s = np.where(x >= zero, one / (one + e), e / (one + e))
        return _reduce(items, s - y, np.ones(x.shape, dtype=bool), reduction)


@dataclass(frozen=True)
class Builtin:
    name: str
    fn: Callable
    description: str

    @property
    def spec(self) -> str:
        return f"ce_cli.stress:{self.fn.__name__}"


BUILTINS: dict[str, tuple[Builtin, ...]] = {
    "multiclass": (
        Builtin("naive", naive_softmax_ce, "softmax -> log, no max shift"),
        Builtin("max-shift", shifted_softmax_ce, "max-shifted softmax -> log"),
        Builtin("log-softmax", log_softmax_ce, "log-softmax via log-sum-exp"),
    ),
    "binary": (
        Builtin("naive", naive_sigmoid_bce, "log s(x), log(1 - s(x))"),
        Builtin("stable", stable_sigmoid_bce, "softplus form, log1p(exp(-|x|))"),
    ),
}


# ---------------------------------------------------------------------------------------------
# running and judging cells


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


def _as_float_array(value, what: str) -> tuple[np.ndarray | None, str]:
    """The output as a float array (bfloat16 widened to float32, exactly), or an error."""
    if value is None:
        return None, f"no {what} returned"
    try:
        arr = np.asarray(value)
    except Exception as exc:  # a user's object that numpy cannot read
        return None, f"{what} is not an array ({type(value).__name__}: {exc})"
    if is_bfloat16(arr.dtype):
        arr = _bf16_to_f32(arr)
    if arr.dtype.kind == "i" or arr.dtype.kind == "u":
        return None, f"{what} has integer dtype {arr.dtype}"
    if arr.dtype.kind != "f":
        return None, f"{what} has dtype {arr.dtype}, not floating point"
    return arr, ""


def _bf16_to_f32(arr: np.ndarray) -> np.ndarray:
    """bfloat16 (ml_dtypes, or raw 2-byte values as a .npy written with it stores them) -> float32."""
    bits = np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def judge(kind: str, case: Case, outcome: Outcome, impl: str, reduction: str,
          seconds: float = 0.0) -> Cell:
    """The cell's verdict: the outputs against the float64 reference, under `grad`'s model."""
    base = dict(impl=impl, scenario=case.scenario, scale=case.scale, dtype=case.dtype, seconds=seconds,
                stderr_tail=outcome.stderr_tail)
    if outcome.error:
        return Cell(ok=False, reason=outcome.reason or "error", error=outcome.error, **base)
    grad, err = _as_float_array(outcome.grad, "gradient")
    if not err and grad.shape != case.logits.shape:
        err = f"gradient has shape {grad.shape}, the logits {case.logits.shape}"
    loss = None
    if not err and (outcome.loss is not None or outcome.loss_expected):
        loss, err = _as_float_array(outcome.loss, "loss")
        if not err:
            if reduction == "none":
                want = case.logits.shape if kind == "binary" else case.logits.shape[:1]
                if loss.shape != want:
                    err = f"loss has shape {loss.shape}; reduction 'none' gives shape {want}"
            elif loss.size != 1:
                err = f"loss has shape {loss.shape}; reduction '{reduction}' gives a scalar"
    if err:
        return Cell(ok=False, reason="bad output", error=err, **base)
    check = check_binary if kind == "binary" else check_grad
    try:
        with np.errstate(all="ignore"):
            report = check(case.logits64, case.labels64, grad=grad, loss=loss, reduction=reduction,
                           precision=case.dtype, fd="off", worst=1)
    except CeCheckError as exc:
        return Cell(ok=False, reason="bad output", error=str(exc), **base)
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
    return Cell(ok=ok, max_abs_err=g.max_abs_err, max_rel_err=g.max_rel_err,
                loss_err=lc.max_abs_err if lc is not None else None,
                worst_ratio=max(ratios) if ratios else 0.0, reason=reason, error=error, where=where,
                **base)


def _explain(g, lc, grad, loss, ref_loss) -> tuple[str, str, tuple[int, ...] | None]:
    """A short reason, one line, and the index of the worst entry for a failed cell.

    Reasons, most telling first: nan/inf grad, nan/inf loss, grad error, loss error."""
    parts, reasons, where = [], [], None
    with np.errstate(all="ignore"):
        g64 = np.asarray(grad, dtype=np.float64)
        bad = ~np.isfinite(g64)
    if not g.ok:
        if bad.any():
            reasons.append((0, "nan grad" if np.isnan(g64).any() else "inf grad"))
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            parts.append(f"gradient: {int(bad.sum())} of {bad.size} entries NaN/inf "
                         f"(first at {where})")
        else:
            e = g.worst[0]
            reasons.append((2, "grad error"))
            where = tuple(e.index)
            parts.append(f"gradient: error {e.abs_err:.3g} at {e.index} > allowed {e.allowed:.3g} "
                         f"(reference {e.expected:.6g}, got {e.got:.6g})")
    if lc is not None and not lc.ok:
        got = np.asarray(loss, dtype=np.float64)
        if np.isnan(got).any():
            reasons.append((1, "nan loss"))
        elif np.isinf(got).any():
            reasons.append((1, "inf loss"))
        else:
            reasons.append((3, "loss error"))
        if got.size == 1:
            parts.append(f"loss {float(got.reshape(-1)[0]):.6g}, reference {ref_loss:.6g}")
        else:
            e = lc.worst[0]
            where = where if where is not None else tuple(e.index)
            parts.append(f"loss: error {e.abs_err:.3g} at {e.index} > allowed {e.allowed:.3g}")
    return min(reasons)[1] if reasons else "error", "; ".join(parts), where


# ---------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class BreakingPoint:
    """The smallest failing scale of an implementation in a dtype, over every scenario."""

    impl: str
    dtype: str
    first_fail: float | None         # None: holds on the whole grid
    last_ok: float | None            # largest scale below first_fail where every cell passed
    scenarios: tuple[str, ...]       # scenarios failing at first_fail
    per_scenario: dict = field(default_factory=dict)   # scenario -> its first failing scale


@dataclass(frozen=True)
class StressReport:
    kind: str
    mode: str                      # builtin | impl | impl-cmd
    impls: tuple[str, ...]
    reduction: str
    dtypes: tuple[str, ...]
    scales: tuple[float, ...]
    scenarios: tuple[Scenario, ...]
    cells: tuple[Cell, ...]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    saved: tuple[str, ...] = ()    # reproducer folders written by --save-failures

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cells)

    @property
    def failures(self) -> tuple[Cell, ...]:
        return tuple(c for c in self.cells if not c.ok)

    def breaking_points(self) -> list[BreakingPoint]:
        out = []
        for impl in self.impls:
            for dtype in self.dtypes:
                cells = [c for c in self.cells if c.impl == impl and c.dtype == dtype]
                failing = sorted({c.scale for c in cells if not c.ok})
                per = {}
                for sc in self.scenarios:
                    f = sorted(c.scale for c in cells if c.scenario == sc.name and not c.ok)
                    per[sc.name] = f[0] if f else None
                if not failing:
                    out.append(BreakingPoint(impl, dtype, None, max((c.scale for c in cells), default=None),
                                             (), per))
                    continue
                first = failing[0]
                below = sorted({c.scale for c in cells if c.scale < first})
                names = tuple(sc.name for sc in self.scenarios if per[sc.name] == first)
                out.append(BreakingPoint(impl, dtype, first, below[-1] if below else None, names, per))
        return out


def grid(kind: str, scenarios: Sequence[Scenario], scales: Sequence[float], dtypes: Sequence[str],
         seed: int = 0) -> tuple[list[Case], list[str]]:
    """Every representable case, scenario-major, and notes on the skipped ones."""
    cases, notes = [], []
    for sc in scenarios:
        for dtype in dtypes:
            for scale in scales:
                case = make_case(kind, sc, scale, dtype, seed)
                if case is None:
                    notes.append(f"{sc.name} at scale {scale:g} skipped for {dtype}: past its largest "
                                 f"value {_MAX[dtype]:.5g}")
                    continue
                cases.append(case)
    return cases, notes


Runner = Callable[[Case], Outcome]


def run_builtin(fn: Callable, reduction: str) -> Runner:
    def run(case: Case) -> Outcome:
        loss, grad = fn(case.logits, case.labels, reduction=reduction)
        return Outcome(loss=loss, grad=grad)

    return run


def run_cells(kind: str, impls: Iterable[tuple[str, Runner]], cases: Sequence[Case], reduction: str,
              on_cell: Callable[[Cell, Case, Outcome], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> list[Cell]:
    impls = list(impls)
    total, done = len(impls) * len(cases), 0
    cells = []
    for name, runner in impls:
        for case in cases:
            t0 = time.perf_counter()
            outcome = runner(case)
            cell = judge(kind, case, outcome, name, reduction, time.perf_counter() - t0)
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell, case, outcome)
            done += 1
            if progress is not None:
                progress(done, total)
    return cells


def builtin_sweep(kind: str = "multiclass", *, dtypes: Sequence[str] | None = None,
                  scales: Sequence[float] = DEFAULT_SCALES, scenarios: Sequence[Scenario] | None = None,
                  reduction: str = "mean", seed: int = 0) -> StressReport:
    """The built-in sweep as a library call (what `ce-check stress` prints)."""
    notes: list[str] = []
    if dtypes is None:
        dtypes, notes = parse_dtypes(None)
    scenarios = tuple(scenarios or SCENARIOS[kind])
    t0 = time.perf_counter()
    cases, skipped = grid(kind, scenarios, scales, dtypes, seed)
    impls = [(b.name, run_builtin(b.fn, reduction)) for b in BUILTINS[kind]]
    cells = run_cells(kind, impls, cases, reduction)
    return StressReport(kind, "builtin", tuple(b.name for b in BUILTINS[kind]), reduction,
                        tuple(dtypes), tuple(scales), scenarios, tuple(cells),
                        tuple(notes + skipped), time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# reproducers (--save-failures)


def reference_outputs(kind: str, case: Case, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """The float64 reference (loss, grad) of the case: the reduced loss, or per-sample losses
    for reduction 'none'."""
    with np.errstate(all="ignore"):
        if kind == "multiclass":
            ref = reference(case.logits64, case.labels64, reduction=reduction)
            return (ref.per_sample if reduction == "none" else np.array(ref.loss)), ref.grad
        problem, _ = build_sigmoid_bce(case.logits64, case.labels64, reduction=reduction)
        ev = problem.evaluate(0, problem.n_rows)
        grad = problem.layout.from_rows(ev.grad)
        if reduction == "none":
            return problem.layout.from_rows(ev.items), grad
        return np.array(problem.reduce(math.fsum(ev.loss.tolist()))), grad


def sub_case(case: Case, row: int) -> Case:
    """The case cut down to one row (the batch axis is the first axis in every scenario)."""
    sl = slice(row, row + 1)
    return replace(case, logits=case.logits[sl], labels=case.labels[sl],
                   logits64=case.logits64[sl], labels64=case.labels64[sl])


def candidate_row(kind: str, case: Case, cell: Cell, reduction: str) -> int | None:
    """The row to shrink a failing case to: the worst entry's, else the largest reference loss."""
    if case.logits.shape[0] <= 1:
        return None
    if cell.where:
        row = int(cell.where[0])
    else:
        per_sample, _ = reference_outputs(kind, case, "none")
        per_row = np.asarray(per_sample, dtype=np.float64).reshape(case.logits.shape[0], -1).sum(axis=1)
        row = int(np.nanargmax(per_row)) if np.isfinite(per_row).any() else 0
    if kind == "multiclass" and case.labels64[row] == IGNORE_INDEX:
        return None
    return row


def shrink(kind: str, case: Case, cell: Cell, run: Callable[[Case], Outcome], reduction: str):
    """One row of the failing case that fails on its own, with its outcome and cell; else None.
    Costs one more run of the implementation."""
    row = candidate_row(kind, case, cell, reduction)
    if row is None:
        return None
    small = sub_case(case, row)
    outcome = run(small)
    small_cell = judge(kind, small, outcome, cell.impl, reduction)
    return (row, small, outcome, small_cell) if not small_cell.ok else None


def folder_name(cell: Cell) -> str:
    raw = f"{cell.impl}__{cell.scenario}__s{cell.scale:g}__{cell.dtype}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")


def save_reproducer(root: Path, kind: str, reduction: str, case: Case, cell: Cell, outcome: Outcome,
                    rerun: Callable[[Path], str], note: str = "") -> Path:
    """Write logits.npy, labels.npy, expected_loss.npy, expected_grad.npy, the implementation's
    outputs (grad.npy, loss.npy) when it gave any, command.sh (rerun, then check) and README.txt.

    `rerun(folder)` gives the shell lines that run the implementation on the folder's inputs."""

    folder = (Path(root) / folder_name(cell)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "logits.npy", as_storable(case.logits))
    np.save(folder / "labels.npy", as_storable(case.labels))
    exp_loss, exp_grad = reference_outputs(kind, case, reduction)
    np.save(folder / "expected_loss.npy", np.asarray(exp_loss, dtype=np.float64))
    np.save(folder / "expected_grad.npy", np.asarray(exp_grad, dtype=np.float64))
    for name in ("grad", "loss"):
        value = getattr(outcome, name)
        path = folder / f"{name}.npy"
        path.unlink(missing_ok=True)
        if value is not None:
            try:
                np.save(path, as_storable(np.asarray(value)))
            except Exception:  # an object numpy cannot store: the README has the error
                path.unlink(missing_ok=True)
    sub = "binary" if kind == "binary" else "grad"
    check = (f"ce-check {sub} logits.npy labels.npy --grad grad.npy"
             + (" --loss loss.npy" if outcome.loss_expected else "")
             + f" --reduction {reduction} --precision {case.dtype} --fd off")
    (folder / "command.sh").write_text(
        "#!/bin/sh\n"
        f"# ce-check stress reproducer: {cell.impl}, scenario {cell.scenario}, scale {cell.scale:g}, "
        f"{case.dtype}\n"
        "# 1. run the implementation on logits.npy, labels.npy (writes grad.npy, loss.npy)\n"
        f"{rerun(folder)}\n"
        "# 2. check its outputs against the float64 reference (expected_*.npy hold it)\n"
        f"cd {shlex.quote(str(folder))} || exit 2\n"
        f"{check}\n")
    (folder / "command.sh").chmod(0o755)
    bf16 = ("logits.npy holds bfloat16 values as float32 (exactly); the implementation gets them "
            "as ml_dtypes.bfloat16\n" if case.dtype == "bf16" else "")
    lines = [
        f"implementation: {cell.impl}",
        f"scenario: {cell.scenario} at scale {cell.scale:g}, dtype {case.dtype} "
        f"({DTYPE_NAMES[case.dtype]}), reduction {reduction}",
        f"logits shape {tuple(case.logits.shape)}" + (f"; {note}" if note else ""),
        f"failure: {cell.error or cell.reason}",
    ]
    text = "\n".join(lines) + "\n" + bf16
    if cell.stderr_tail:
        text += "\noutput tail:\n" + cell.stderr_tail + "\n"
    text += "\nrerun and check: sh command.sh\n"
    (folder / "README.txt").write_text(text)
    return folder


def python_rerun(spec: str, cwd: str, kind: str, dtype: str, folder: Path,
                 kwargs: dict | None = None) -> str:
    """Shell lines that call `module:function` on the reproducer's inputs in `folder`."""
    module, _, attr = spec.partition(":")
    q = json.dumps  # double-quoted Python strings: the line is single-quoted for the shell
    load, labels, pre = 'np.load("logits.npy")', 'np.load("labels.npy")', ""
    if dtype == "bf16":
        pre = "import ml_dtypes; "
        load += ".astype(ml_dtypes.bfloat16)"
        if kind == "binary":
            labels += ".astype(ml_dtypes.bfloat16)"
    kw = "".join(f", {k}={q(v)}" for k, v in (kwargs or {}).items())
    code = (f"import sys, importlib, functools, numpy as np; {pre}sys.path.insert(0, {q(cwd)}); "
            f"fn = functools.reduce(getattr, {q(attr.split('.'))}, importlib.import_module({q(module)})); "
            f"loss, grad = fn({load}, {labels}{kw}); "
            'w = lambda a: np.asarray(a).astype(np.float32) if np.asarray(a).dtype.kind == "V" '
            'else np.asarray(a); np.save("grad.npy", w(grad)); np.save("loss.npy", w(loss))')
    return (f"cd {shlex.quote(str(folder))} || exit 2\n"
            f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}")
