"""The bug zoo and the no-false-alarm side: `check_grad` verdicts must be trustworthy both ways.

Everything is generated with numpy (no torch), from fixed seeds:

- correct gradients, written the ways real code writes them (naive softmax, max-shifted softmax,
  exp(log_softmax), exp(z - lse) with lse = m + log(sum)), computed in float16/32/64 and stored
  in the same or a narrower dtype, MUST pass;
- the classic bugs (wrong sign, wrong reduction, wrong axis, off-by-one labels, shuffled rows,
  a single entry 1% off, ignore_index mistakes, NaN, weights in the wrong place, ...) MUST fail
  the `grad_vs_reference` check, and where the bug is one entry it must be located exactly.

The generators are also used by `scripts/calibrate_tolerance.py`, which measures how much margin
the tolerance model has on both sides.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ce_cli.verify.checks import check_grad

# every test runs through the compiled kernel and through the numpy kernel
pytestmark = pytest.mark.usefixtures("both_kernels")

# --------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------

# name -> (dtype the gradient is computed in, dtype it is stored in)
CONFIGS = {
    "f64": (np.float64, np.float64),
    "f32": (np.float32, np.float32),
    "f32->f16": (np.float32, np.float16),
    "f16": (np.float16, np.float16),
}
STYLES = ("naive", "shifted", "logsoftmax", "lse")


def naive_ok(style: str, compute, scale: float, n_classes: int, n_entries: int = 1,
             margin: float = 0.0) -> bool:
    """exp(z) without the max shift is a correct implementation only while exp(z) and its row sum
    cannot overflow: sum ~ C*exp(scale^2/2) + exp(z_max), z_max ~ scale*sqrt(2 ln n) + margin."""
    if style != "naive":
        return True
    z_max = scale * np.sqrt(2.0 * np.log(max(2, n_entries))) + 1.0 + margin
    log_sum = np.logaddexp(np.log(n_classes) + min(scale * scale / 2.0, z_max), z_max)
    return bool(log_sum < np.log(np.finfo(compute).max) - 1.0)


def naive_fits(z: np.ndarray) -> bool:
    """Whether naive softmax exp(z)/sum is numerically sound on z in z's dtype: the row sums stay
    finite and no exp(z) underflows into subnormals. (Underflow is a real defect of the naive form,
    not rounding: e = exp(z) loses up to tiny/2 absolute, and p = e/s amplifies that by 1/s when
    every logit of the row is negative: e.g. float32, 2 classes, logits ~ -95 and -26, gives p
    ~ 3e-30 with relative error 2e-4, which the check rightly flags.)"""
    with np.errstate(over="ignore", under="ignore"):
        e = np.exp(z)
        return bool(np.all(np.isfinite(e.sum(axis=-1)))
                    and np.all(e >= np.finfo(z.dtype).smallest_normal))


def make_logits(rng, shape, scale, dtype, labels=None, margin=0.0):
    """scale * N(0, 1) logits (class axis last), the target logit raised by `margin`."""
    z = rng.standard_normal(shape) * scale
    if margin and labels is not None:
        flat = z.reshape(-1, shape[-1])
        yl = np.asarray(labels).reshape(-1)
        ok = yl >= 0
        flat[np.flatnonzero(ok), yl[ok]] += margin
    return z.astype(dtype)


def softmax_rows(z: np.ndarray, style: str) -> np.ndarray:
    """Softmax over the last axis of `z`, in z's own dtype, the way `style` code computes it."""
    if style == "naive":
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)
    m = z.max(axis=-1, keepdims=True)
    if style == "shifted":
        e = np.exp(z - m)
        return e / e.sum(axis=-1, keepdims=True)
    s = np.exp(z - m).sum(axis=-1, keepdims=True)
    if style == "logsoftmax":
        return np.exp((z - m) - np.log(s))
    if style == "lse":
        lse = m + np.log(s)
        return np.exp(z - lse)
    raise ValueError(style)


def log_softmax_rows(z: np.ndarray, style: str) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    s = np.exp(z - m).sum(axis=-1, keepdims=True)
    if style == "lse":
        return z - (m + np.log(s))
    return (z - m) - np.log(s)


def targets(y, n_classes, *, weight=None, smoothing=0.0, ignore_index=-100):
    """float64 targets of each row: q = alpha*onehot(ys) + beta_w, Q = sum_c q_c; also the
    labels with ignored rows mapped to 0 (ys), the valid mask and w_y (0 when ignored)."""
    y = np.asarray(y).reshape(-1)
    C = n_classes
    valid = y != ignore_index
    ys = np.where(valid, y, 0)
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    wy = np.where(valid, w[ys], 0.0)
    alpha = (1.0 - smoothing) * wy
    beta_w = np.where(valid, smoothing / C, 0.0)[:, None] * w[None, :]
    Q = alpha + beta_w.sum(axis=1)
    return alpha, beta_w, Q, ys, valid, wy


def correct_grad(z, y, style="shifted", *, reduction="mean", weight=None, smoothing=0.0,
                 ignore_index=-100, store=None, denominator=None):
    """A correct gradient of F.cross_entropy w.r.t. `z` (class axis last), computed in z's dtype.

    g = (Q * softmax(z) - q) / D, every operation in z.dtype; stored as `store` (default z.dtype).
    `denominator` overrides D (the bug zoo uses it).
    """
    shape = z.shape
    C = shape[-1]
    zr = z.reshape(-1, C)
    dt = zr.dtype.type
    N = zr.shape[0]
    alpha, beta_w, Q, ys, valid, wy = targets(y, C, weight=weight, smoothing=smoothing,
                                              ignore_index=ignore_index)
    p = softmax_rows(zr, style)
    if weight is None and not smoothing:
        g = p.copy()
    else:
        g = p * Q.astype(dt)[:, None]
    if smoothing:
        g -= beta_w.astype(dt)
    g[np.arange(N), ys] -= alpha.astype(dt)
    if denominator is None and reduction == "mean":
        denominator = wy.sum()
    if denominator is not None:
        g = g / dt(denominator)
    g[~valid] = 0
    return g.reshape(shape).astype(store or dt)


def correct_loss(z, y, style="shifted", *, reduction="mean", weight=None, smoothing=0.0,
                 ignore_index=-100):
    """The matching loss, in z's dtype: -sum_c q_c log_softmax_c, reduced."""
    C = z.shape[-1]
    zr = z.reshape(-1, C)
    dt = zr.dtype.type
    N = zr.shape[0]
    alpha, beta_w, Q, ys, valid, wy = targets(y, C, weight=weight, smoothing=smoothing,
                                              ignore_index=ignore_index)
    lsm = log_softmax_rows(zr, style)
    per = -(lsm[np.arange(N), ys] * alpha.astype(dt))
    if smoothing:
        per = per - (lsm * beta_w.astype(dt)).sum(axis=1)
    per = np.where(valid, per, dt(0))
    if reduction == "none":
        return per.reshape(z.shape[:-1])
    # half-precision reductions accumulate in float32 (as PyTorch does), then round once
    acc = np.float32 if dt == np.float16 else dt
    total = per.sum(dtype=acc)
    if reduction == "mean":
        total = total / acc(wy.sum())
    with np.errstate(over="ignore"):
        out = np.asarray(total).astype(dt)
    return out if np.isfinite(out) else None  # a float16 sum beyond 65504 is no loss to check


def grad_check(report):
    [c] = [c for c in report.checks if c.name == "grad_vs_reference"]
    return c


def worst_ratio(check) -> float:
    """max |got - ref| / allowed over the check (its first worst entry)."""
    if not check.worst:
        return 0.0
    e = check.worst[0]
    if not np.isfinite(e.abs_err):
        return float("inf")
    return e.abs_err / e.allowed if e.allowed > 0 else (0.0 if e.abs_err == 0 else float("inf"))


def describe(report) -> str:
    lines = []
    for c in report.checks:
        w = c.worst[0] if c.worst else None
        lines.append(f"{c.name}: ok={c.ok} mismatches={c.mismatches}/{c.total} "
                     f"ratio={worst_ratio(c):.3g} worst={w}")
    return "\n".join(lines)


def run(z, y, g, **kw):
    kw.setdefault("fd", "sample")
    kw.setdefault("samples", 64)
    return check_grad(z, y, grad=g, **kw)


def assert_passes(report):
    assert report.ok, describe(report)
    for c in report.checks:
        assert c.mismatches == 0, describe(report)


def assert_caught(report):
    assert not report.ok, describe(report)
    c = grad_check(report)
    assert not c.ok and (c.mismatches > 0 or np.isinf(c.max_abs_err)), describe(report)


# --------------------------------------------------------------------------------------------
# 1. the bug zoo: every one of these MUST fail grad_vs_reference
# --------------------------------------------------------------------------------------------

N_ZOO, C_ZOO, SCALE_ZOO = 256, 1000, 3.0


def _zoo_problem(seed=1, N=N_ZOO, C=C_ZOO, scale=SCALE_ZOO):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, size=N)
    z = make_logits(rng, (N, C), scale, np.float32)
    return rng, z, y


def _bug_wrong_sign(rng, z, y):
    return z, y, -correct_grad(z, y), {}


def _bug_missing_div_n(rng, z, y):
    return z, y, correct_grad(z, y, reduction="sum"), {}


def _bug_div_by_nc(rng, z, y):
    return z, y, correct_grad(z, y, denominator=z.shape[0] * z.shape[1]), {}


def _bug_softmax_axis0(rng, z, y):
    N = z.shape[0]
    p = softmax_rows(z.T, "shifted").T  # softmax over the batch axis
    p[np.arange(N), y] -= 1
    return z, y, p / np.float32(N), {}


def _bug_label_off_by_one(rng, z, y):
    return z, y, correct_grad(z, (y + 1) % z.shape[1]), {}


def _bug_rows_shuffled(rng, z, y):
    perm = rng.permutation(z.shape[0])
    while np.any(perm == np.arange(perm.size)):  # a derangement: every row moves
        perm = rng.permutation(z.shape[0])
    return z, y, correct_grad(z, y)[perm], {}


def _bug_onehot_not_subtracted(rng, z, y):
    return z, y, softmax_rows(z, "shifted") / np.float32(z.shape[0]), {}


def _bug_naive_overflow(rng, z, y):
    # exp without the max shift, logits scaled so the largest is 1.5x log(max float): inf/inf = NaN
    dt = z.dtype.type
    factor = 1.5 * np.log(np.finfo(dt).max) / float(np.abs(z).max())
    z = (z.astype(np.float64) * factor).astype(dt)
    with np.errstate(over="ignore", invalid="ignore"):
        g = correct_grad(z, y, style="naive")
    assert not np.all(np.isfinite(g))
    return z, y, g, {}


def _bug_smoothing_forgotten(rng, z, y):
    return z, y, correct_grad(z, y), {"label_smoothing": 0.1}


def _bug_ignored_rows_not_zeroed(rng, z, y):
    y = y.copy()
    y[rng.choice(y.size, 16, replace=False)] = -100
    g = correct_grad(z, y)
    ign = y == -100
    g[ign] = softmax_rows(z[ign], "shifted") / np.float32(np.count_nonzero(~ign))
    return z, y, g, {}


def _bug_ignore_index_used_as_index(rng, z, y):
    # -100 not masked: p[r, -100] -= 1 hits class C - 100 (numpy/PyTorch negative indexing)
    y = y.copy()
    y[rng.choice(y.size, 16, replace=False)] = -100
    N, C = z.shape
    p = softmax_rows(z, "shifted")
    p[np.arange(N), y] -= 1
    return z, y, p / np.float32(np.count_nonzero(y != -100)), {}


def _bug_mean_over_all_rows(rng, z, y):
    y = y.copy()
    y[rng.choice(y.size, 16, replace=False)] = -100
    return z, y, correct_grad(z, y, denominator=y.size), {}


def _weights(rng, C, wmax=3.0):
    return rng.uniform(0.5, 3.0, size=C) * (wmax / 3.0)


def _bug_weight_denominator_n(rng, z, y):
    w = _weights(rng, z.shape[1])
    return z, y, correct_grad(z, y, weight=w, denominator=z.shape[0]), {"weight": w}


def _bug_weight_denominator_class_sum(rng, z, y):
    w = _weights(rng, z.shape[1])
    return z, y, correct_grad(z, y, weight=w, denominator=w.sum()), {"weight": w}


def _bug_weight_per_column(rng, z, y):
    # weights multiplied onto the gradient's columns (w_c) instead of the row's target weight w_y
    w = _weights(rng, z.shape[1])
    g = correct_grad(z, y) * w.astype(np.float32)[None, :]
    g = g * np.float32(z.shape[0] / w[y].sum())
    return z, y, g, {"weight": w}


def _bug_btv_label_off_by_one(rng, z, y):
    B, T, V = 8, 32, z.shape[1]
    z3 = z.reshape(B, T, V)
    y3 = y.reshape(B, T)
    return z3, y3, correct_grad(z3, (y3 + 1) % V), {}


def _bug_btv_softmax_over_time(rng, z, y):
    B, T, V = 8, 32, z.shape[1]
    z3 = z.reshape(B, T, V)
    y3 = y.reshape(B, T)
    p = np.moveaxis(softmax_rows(np.moveaxis(z3, 1, -1), "shifted"), -1, 1)
    b, t = np.indices((B, T))
    p[b, t, y3] -= 1
    return z3, y3, p / np.float32(B * T), {}


def _bug_class_axis1_transposed(rng, z, y):
    # (N, C, d) logits with class_axis=1, the gradient computed as if classes were last
    N, C = 64, 1000
    z4 = z.reshape(N, 4, C)            # (N, d, C) memory
    zc = np.ascontiguousarray(np.moveaxis(z4, -1, 1))  # (N, C, d) user layout
    yc = y.reshape(N, 4)
    g = correct_grad(z4, yc)           # right numbers, (N, d, C)
    return zc, yc, g.reshape(N, C, 4), {"class_axis": 1}


BUGS = {
    "wrong_sign": _bug_wrong_sign,
    "missing_div_N": _bug_missing_div_n,
    "div_by_N_times_C": _bug_div_by_nc,
    "softmax_axis0": _bug_softmax_axis0,
    "label_off_by_one": _bug_label_off_by_one,
    "rows_shuffled": _bug_rows_shuffled,
    "onehot_not_subtracted": _bug_onehot_not_subtracted,
    "naive_exp_overflow": _bug_naive_overflow,
    "label_smoothing_forgotten": _bug_smoothing_forgotten,
    "ignored_rows_not_zeroed": _bug_ignored_rows_not_zeroed,
    "ignore_index_used_as_negative_index": _bug_ignore_index_used_as_index,
    "mean_over_all_rows_not_valid": _bug_mean_over_all_rows,
    "weights_denominator_N": _bug_weight_denominator_n,
    "weights_denominator_sum_of_class_weights": _bug_weight_denominator_class_sum,
    "weights_per_column": _bug_weight_per_column,
    "BTV_label_off_by_one": _bug_btv_label_off_by_one,
    "BTV_softmax_over_time": _bug_btv_softmax_over_time,
    "NCd_classes_last": _bug_class_axis1_transposed,
}


def make_bug(name, seed=1, dtype=np.float32):
    rng, z, y = _zoo_problem(seed)
    z = z.astype(dtype)
    z, y, g, kw = BUGS[name](rng, z, y)
    return z, y, g, kw


@pytest.mark.parametrize("name", list(BUGS))
def test_bug_is_caught(name):
    z, y, g, kw = make_bug(name)
    report = run(z, y, g, **kw)
    assert_caught(report)


@pytest.mark.parametrize("name", ["wrong_sign", "label_off_by_one", "weights_denominator_N",
                                  "ignored_rows_not_zeroed", "BTV_label_off_by_one"])
@pytest.mark.parametrize("config", ["f64", "f32->f16", "f16"])
def test_bug_is_caught_other_precisions(name, config):
    compute, store = CONFIGS[config]
    z, y, g, kw = make_bug(name, dtype=compute)
    report = run(z, y, g.astype(store), **kw)
    assert_caught(report)


def _pick_entry(g: np.ndarray, y: np.ndarray, kind: str, rng) -> tuple[int, ...]:
    """The target entry of a random row, or a typical (median-sized) non-tiny non-target entry."""
    N, C = g.shape
    if kind == "target":
        r = int(rng.integers(N))
        return r, int(y[r])
    mag = np.abs(g.astype(np.float64))
    mask = mag >= 1e-3 * mag.max()
    mask[np.arange(N), y] = False
    cand = np.argwhere(mask)
    order = np.argsort(mag[mask], kind="stable")
    r, c = cand[order[order.size // 2]]
    return int(r), int(c)


@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("kind", ["target", "typical"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_one_entry_one_percent_off_is_caught_and_located(dtype, kind, scale):
    rng = np.random.default_rng(7)
    N, C = 256, 1000
    y = rng.integers(0, C, size=N)
    z = make_logits(rng, (N, C), scale, dtype)
    g = correct_grad(z, y, style="lse")
    assert_passes(run(z, y, g))
    r, c = _pick_entry(g, y, kind, rng)
    bad = g.copy()
    bad[r, c] *= dtype(1.01)
    report = run(z, y, bad)
    assert_caught(report)
    chk = grad_check(report)
    assert chk.mismatches == 1, describe(report)
    assert chk.worst[0].index == (r, c), describe(report)


def test_one_entry_one_percent_off_btv_located():
    rng = np.random.default_rng(8)
    B, T, V = 4, 64, 1000
    y = rng.integers(0, V, size=(B, T))
    z = make_logits(rng, (B, T, V), 5.0, np.float32)
    g = correct_grad(z, y)
    assert_passes(run(z, y, g))
    idx = (2, 17, int(y[2, 17]))
    g[idx] *= np.float32(1.01)
    report = run(z, y, g)
    assert_caught(report)
    assert grad_check(report).worst[0].index == idx


def test_one_entry_one_percent_off_class_axis1_located():
    rng = np.random.default_rng(9)
    N, C, d = 16, 500, 8
    y = rng.integers(0, C, size=(N, d))
    zl = make_logits(rng, (N, d, C), 5.0, np.float32)          # classes last
    g = np.ascontiguousarray(np.moveaxis(correct_grad(zl, y), -1, 1))
    z = np.ascontiguousarray(np.moveaxis(zl, -1, 1))           # (N, C, d)
    assert_passes(run(z, y, g, class_axis=1))
    idx = (5, int(y[5, 3]), 3)
    g[idx] *= np.float32(1.01)
    report = run(z, y, g, class_axis=1)
    assert_caught(report)
    assert grad_check(report).worst[0].index == idx


@pytest.mark.parametrize("config", ["f64", "f32", "f32->f16", "f16"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_entry_is_caught_and_located(config, value):
    compute, store = CONFIGS[config]
    rng = np.random.default_rng(3)
    N, C = 128, 300
    y = rng.integers(0, C, size=N)
    z = make_logits(rng, (N, C), 3.0, compute)
    g = correct_grad(z, y, store=store)
    idx = (77, 123)
    g[idx] = value
    report = run(z, y, g)
    assert_caught(report)
    chk = grad_check(report)
    assert chk.worst[0].index == idx, describe(report)
    assert not np.isfinite(chk.max_abs_err)


# --------------------------------------------------------------------------------------------
# 2. correct gradients MUST pass
# --------------------------------------------------------------------------------------------

GRID = [
    (config, style, scale)
    for config in CONFIGS
    for style in STYLES
    for scale in (1.0, 10.0, 60.0)
    if naive_ok(style, CONFIGS[config][0], scale, 1000, 256 * 1000)
]


@pytest.mark.parametrize("config,style,scale", GRID)
def test_correct_gradient_passes(config, style, scale):
    compute, store = CONFIGS[config]
    rng = np.random.default_rng(11)
    N, C = 256, 1000
    y = rng.integers(0, C, size=N)
    z = make_logits(rng, (N, C), scale, compute)
    g = correct_grad(z, y, style, store=store)
    if style == "naive":
        assert naive_fits(z)  # naive_ok() chose a scale where the naive form is sound
    loss = correct_loss(z, y, style)
    assert_passes(run(z, y, g, loss=loss))


VARIANTS = {
    # name: (shape, scale, options)
    "mean_4096x100": ((4096, 100), 10.0, {}),
    "sum_4096x100": ((4096, 100), 10.0, {"reduction": "sum"}),
    "none_256x1000": ((256, 1000), 10.0, {"reduction": "none"}),
    "mean_64x32000": ((64, 32000), 10.0, {}),
    "mean_64x32000_scale60": ((64, 32000), 60.0, {}),
    "ignored_rows": ((1024, 300), 10.0, {"ignore": 0.25}),
    "ignore_index_is_a_class": ((1024, 300), 10.0, {"ignore": 0.1, "ignore_index": 0}),
    "weights": ((1024, 300), 10.0, {"weight": True}),
    "weights_sum": ((1024, 300), 10.0, {"weight": 1.0, "reduction": "sum"}),
    "smoothing": ((1024, 300), 10.0, {"label_smoothing": 0.1}),
    "weights_smoothing_ignore": ((1024, 300), 10.0,
                                 {"weight": True, "label_smoothing": 0.2, "ignore": 0.2}),
    "confident_margin30": ((1024, 300), 1.0, {"margin": 30.0}),
    "scale60_smoothing_weights": ((512, 300), 60.0, {"weight": True, "label_smoothing": 0.1}),
    "btv": ((4, 64, 500), 10.0, {"ignore": 0.1}),
}


def make_variant(name, config, style, seed=21):
    shape, scale, opts = VARIANTS[name]
    opts = dict(opts)
    compute, store = CONFIGS[config]
    rng = np.random.default_rng(seed)
    C = shape[-1]
    ignore_index = opts.pop("ignore_index", -100)
    y = rng.integers(1 if ignore_index == 0 else 0, C, size=shape[:-1])
    frac = opts.pop("ignore", 0.0)
    if frac:
        y.reshape(-1)[rng.random(y.size) < frac] = ignore_index
    margin = opts.pop("margin", 0.0)
    z = make_logits(rng, shape, scale, compute, labels=np.where(y == ignore_index, -1, y),
                    margin=margin)
    wopt = opts.pop("weight", False)
    weight = _weights(rng, C, 3.0 if wopt is True else wopt) if wopt else None
    kw = {"reduction": opts.pop("reduction", "mean"), "weight": weight,
          "label_smoothing": opts.pop("label_smoothing", 0.0), "ignore_index": ignore_index}
    assert not opts
    gkw = dict(kw, smoothing=kw["label_smoothing"])
    del gkw["label_smoothing"]
    g = correct_grad(z, y, style, store=store, **gkw)
    loss = correct_loss(z, y, style, **gkw)
    return z, y, g, loss, kw


@pytest.mark.parametrize("style", ["shifted", "lse"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_correct_gradient_variants_pass(name, config, style):
    z, y, g, loss, kw = make_variant(name, config, style)
    assert_passes(run(z, y, g, loss=loss, **kw))


@pytest.mark.parametrize("C", [10, 100, 1000])
def test_float64_naive_cancellation_to_zero_is_no_false_alarm(C):
    """p_y - 1 computed naively in float64 cancels to exactly 0 at margin 40 (the true value is
    ~ -C*exp(-40)); the floor must allow it, and the 1% bug on a non-target entry must still fail."""
    rng = np.random.default_rng(5)
    N = 512
    y = rng.integers(0, C, size=N)
    z = make_logits(rng, (N, C), 1.0, np.float64, labels=y, margin=40.0)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    p_y = p[np.arange(N), y]
    g = p.copy()
    g[np.arange(N), y] -= 1.0
    g /= N
    if C <= 100:
        assert np.count_nonzero(p_y == 1.0) > 0  # the cancellation really happens
    assert_passes(run(z, y, g, fd="full" if C <= 100 else "sample"))
    bad = g.copy()
    r = 3
    c = (int(y[r]) + 1) % C
    bad[r, c] *= 1.01
    report = run(z, y, bad)
    assert_caught(report)
    assert grad_check(report).worst[0].index == (r, c)


@pytest.mark.parametrize("config", ["f32", "f32->f16", "f16"])
def test_reported_precision_widens_for_wider_storage(config):
    """A float16-computed gradient stored as float32 passes with --precision f16."""
    compute, _ = CONFIGS[config]
    z, y, g, loss, kw = make_variant("weights_smoothing_ignore", config, "lse")
    g32 = g.astype(np.float32)
    name = {"f32": "f32", "f32->f16": "f16", "f16": "f16"}[config]
    assert_passes(run(z, y, g32, precision=name, **kw))


# --------------------------------------------------------------------------------------------
# property: a correct float32 gradient passes; one non-tiny entry x 1.01 fails, located
# --------------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    N = draw(st.integers(1, 64))
    C = draw(st.integers(2, 300))
    scale = draw(st.floats(0.1, 80.0))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    style = draw(st.sampled_from(STYLES))
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.1]))
    weighted = draw(st.booleans())
    ignore = draw(st.sampled_from([0.0, 0.0, 0.3]))
    seed = draw(st.integers(0, 2**32 - 1))
    return N, C, scale, reduction, style, smoothing, weighted, ignore, seed


def build_problem(N, C, scale, reduction, style, smoothing, weighted, ignore, seed,
                  dtype=np.float32):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, size=N)
    if ignore:
        y[rng.random(N) < ignore] = -100
        if reduction == "mean" and np.all(y == -100):
            y[0] = 0
    z = make_logits(rng, (N, C), scale, dtype)
    if not naive_fits(z):
        style = "shifted"
    weight = _weights(rng, C) if weighted else None
    g = correct_grad(z, y, style, reduction=reduction, weight=weight, smoothing=smoothing)
    kw = {"reduction": reduction, "weight": weight, "label_smoothing": smoothing}
    return rng, z, y, g, weight, kw


def detectable_entries(g, z, y, weight, smoothing, reduction):
    """Entries a 1% change must be caught at, by a criterion independent of the tolerance model:
    not tiny (|g| >= 1e-3 max|g|, and a normal float32 far from underflow) and not the result of
    a cancellation (|g| >= 0.5 (Q a + q)/D, e.g. every non-target entry without smoothing)."""
    N, C = g.shape
    alpha, beta_w, Q, ys, valid, wy = targets(y, C, weight=weight, smoothing=smoothing)
    zz = z.astype(np.float64)
    a = np.exp(zz - zz.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    q = beta_w.copy()
    q[np.arange(N), ys] += alpha
    D = wy.sum() if reduction == "mean" else 1.0
    mag = np.abs(g.astype(np.float64))
    ok = (mag >= 1e-3 * mag.max()) & (mag >= 1e-30)
    ok &= mag >= 0.5 * (Q[:, None] * a + q) / D
    ok &= valid[:, None]
    return np.argwhere(ok)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(0, 2**32 - 1))
def test_property_correct_passes_one_percent_fails(params, pick):
    rng, z, y, g, weight, kw = build_problem(*params)
    assert_passes(run(z, y, g, **kw))
    cand = detectable_entries(g, z, y, weight, kw["label_smoothing"], kw["reduction"])
    if cand.size == 0:
        return
    r, c = (int(v) for v in cand[pick % len(cand)])
    bad = g.copy()
    bad[r, c] *= np.float32(1.01)
    report = run(z, y, bad, **kw)
    assert_caught(report)
    assert grad_check(report).worst[0].index == (r, c), describe(report)


# --------------------------------------------------------------------------------------------
# the best possible float64 gradient (exact value, rounded once) must pass with room to spare
# --------------------------------------------------------------------------------------------

HAVE_LONG_DOUBLE = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps


def exact_grad_f64(z, y, *, reduction="mean", weight=None, smoothing=0.0, ignore_index=-100):
    """(Q softmax(z) - q)/D in long double (64-bit mantissa on x86), rounded once to float64."""
    C = z.shape[-1]
    zl = np.asarray(z, dtype=np.longdouble).reshape(-1, C)
    N = zl.shape[0]
    alpha, beta_w, Q, ys, valid, wy = targets(y, C, weight=weight, smoothing=smoothing,
                                              ignore_index=ignore_index)
    e = np.exp(zl - zl.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    g = p * Q.astype(np.longdouble)[:, None] - beta_w.astype(np.longdouble)
    g[np.arange(N), ys] -= alpha.astype(np.longdouble)
    if reduction == "mean":
        g /= np.longdouble(wy.sum())
    g[~valid] = 0
    return g.astype(np.float64).reshape(z.shape)


EXACT_CASES = [
    # (name, N, C, scale, margin, options)
    pytest.param("scale10_C1000", 64, 1000, 10.0, 0.0, {}, id="scale10_C1000"),
    pytest.param("confident", 64, 1000, 1.0, 30.0, {}, id="confident_margin30"),
    pytest.param("scale3_smoothing_weights", 64, 300, 3.0, 0.0,
                 {"label_smoothing": 0.1, "weight": True}, id="scale3_smoothing_weights"),
    pytest.param("near_init_C1000", 64, 1000, 0.01, 0.0, {}, id="near_init_C1000"),
    pytest.param("scale1_C32000", 16, 32000, 1.0, 0.0, {}, id="scale1_C32000"),
]


@pytest.mark.skipif(not HAVE_LONG_DOUBLE, reason="needs an extended-precision long double")
@pytest.mark.parametrize("name,N,C,scale,margin,opts", EXACT_CASES)
def test_correctly_rounded_float64_gradient_passes(name, N, C, scale, margin, opts):
    rng = np.random.default_rng(31)
    y = rng.integers(0, C, size=N)
    z = make_logits(rng, (N, C), scale, np.float64, labels=y, margin=margin)
    weight = _weights(rng, C) if opts.get("weight") else None
    smoothing = opts.get("label_smoothing", 0.0)
    g = exact_grad_f64(z, y, weight=weight, smoothing=smoothing)
    report = run(z, y, g, weight=weight, label_smoothing=smoothing)
    assert_passes(report)
    # one rounding to float64 is far inside the tolerance
    assert worst_ratio(grad_check(report)) < 0.5, describe(report)


@pytest.mark.parametrize("C", [1000, 32000])
def test_float64_flat_rows_no_false_alarm(C):
    """Correct float64 gradients of near-uniform rows (logits at initialisation) pass: the
    reference's arg-max entry is Q*a - q there, not Q*(a - 1) + (Q - q), which would cancel."""
    rng = np.random.default_rng(12)
    N = 16
    y = rng.integers(0, C, size=N)
    z = make_logits(rng, (N, C), 0.01, np.float64)
    g = correct_grad(z, y, "shifted")
    assert_passes(run(z, y, g))


@pytest.mark.parametrize("config,wmax", [("f16", 3.0), ("f32", 3.0), ("f32", 1.0)])
def test_subnormal_times_weight_no_false_alarm(config, wmax):
    """Subnormal softmax entries times a weight > 1: up to three roundings of tiny/2 each,
    scaled by Q; the allowance (k/2)*(1 + Q*scale)*tiny covers them."""
    compute, store = CONFIGS[config]
    rng = np.random.default_rng(4)
    N, C = 1024, 300
    y = rng.integers(0, C, size=N)
    scale = 10.0 if config == "f16" else 40.0
    z = make_logits(rng, (N, C), scale, compute)
    w = _weights(rng, C, wmax)
    g = correct_grad(z, y, "shifted", reduction="sum", weight=w, store=store)
    assert_passes(run(z, y, g, reduction="sum", weight=w))


# --------------------------------------------------------------------------------------------
# float16: what a single-entry error of a given size is detected
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["f32->f16", "f16"])
@pytest.mark.parametrize("kind,rel", [("target", 0.01), ("typical", 0.2), ("largest", 0.2)])
def test_float16_detects_single_entry_error(config, kind, rel):
    """In float16 the tolerance is ~eps*(2 + 4(1 + |log a| + |lse|)): ~0.6% at a target entry
    (a_y - 1, with a_y small), several % at a non-target entry (|log a| + |lse| ~ 15-30).
    A 1% error at a target entry and a 20% error anywhere non-tiny are caught."""
    compute, store = CONFIGS[config]
    rng = np.random.default_rng(17)
    N, C = 256, 1000
    y = rng.integers(0, C, size=N)
    z = make_logits(rng, (N, C), 3.0, compute)
    g = correct_grad(z, y, "shifted")
    assert_passes(run(z, y, g.astype(store)))
    if kind == "largest":
        m = np.abs(g.astype(np.float64))
        m[np.arange(N), y] = -1
        r, c = (int(v) for v in np.unravel_index(np.argmax(m), m.shape))
    else:
        r, c = _pick_entry(g, y, kind, rng)
    bad = g.copy()
    bad[r, c] = bad[r, c] * compute(1 + rel)
    report = run(z, y, bad.astype(store))
    assert_caught(report)
    assert grad_check(report).worst[0].index == (r, c), describe(report)
