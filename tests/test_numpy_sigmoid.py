"""The numpy BCE kernel (ce_cli/kernels/numpy_sigmoid.py) against its formulas written out
plainly, bit for bit: its passes are arranged for speed (in-place operations, s(x) as one
division, no all-ones arrays), never reordered."""

from __future__ import annotations

import numpy as np
import pytest

from ce_cli.kernels.numpy_sigmoid import HARD_X_MAX, _hard_labels, sigmoid_rows
from ce_cli.models.sigmoid import build_sigmoid_bce


def _plain(model, x, rows, floor_coef):
    """The kernel's formulas, one numpy expression each."""
    x = np.asarray(x, dtype=np.float64)
    y, w, pw = model.coefficients(rows)
    pos = y if pw is None else pw * y
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(-np.abs(x))
        tail = np.log1p(e)
        items = (np.where(pos != 0, pos * (np.maximum(-x, 0.0) + tail), 0.0)
                 + np.where(y != 1, (1.0 - y) * (np.maximum(x, 0.0) + tail), 0.0))
        if w is not None:
            items = np.where(w != 0, items * w, 0.0)
        small, large = e / (1.0 + e), 1.0 / (1.0 + e)
    s_pos, s_neg = np.where(x >= 0, large, small), np.where(x >= 0, small, large)
    scale = model.grad_scale
    g = (1.0 - y) * s_pos - pos * s_neg
    g *= scale if w is None else w * scale
    coef = 1.0 + (pw - 1.0) * y if pw is not None else np.ones_like(y)
    c_floor = 1.0 + np.abs(pos) if pw is not None else 1.0  # 1 + pw y rounds in PyTorch's form
    floor = floor_coef * scale * (c_floor * s_pos + np.abs(pos) + np.abs(1.0 - y))
    if w is not None:
        floor *= np.abs(w)
    magnitude = np.abs(coef) * (1.0 if w is None else np.abs(w))
    return {"loss": items.sum(axis=1), "grad": g, "floor": floor, "items": items,
            "item_weight": magnitude, "total_weight": magnitude.sum(axis=1)}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("opt", ["plain", "pw", "w", "w+pw", "soft", "soft+w+sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "finite"])
def test_numpy_bce_kernel_is_its_formulas(opt, dtype, masked):
    """With -inf logits (the guarded products) and without (the kernel's shorter path)."""
    rng = np.random.default_rng(len(opt))
    R, K = 23, 517
    x = (rng.standard_normal((R, K)) * rng.choice([0.01, 3.0, 40.0, 800.0], size=(R, 1))).astype(dtype)
    if masked:
        x[rng.random((R, K)) < 0.05] = -np.inf
    x[0, :3] = [0.0, -0.0, 1e-300]
    x[1, :2] = [-746.0, 746.0]
    y = (rng.random((R, K)) < 0.3).astype(np.float64)
    kw: dict = {}
    if "soft" in opt:
        y[::2] = rng.random((len(y[::2]), K))
    if "pw" in opt:
        kw["pos_weight"] = rng.uniform(-1.0, 4.0, K)
    if "w" in opt.split("+"):
        kw["weight"] = rng.uniform(-1.0, 2.0, (R, K))
        kw["weight"][:, 0] = 0.0
    if "sum" in opt:
        kw["reduction"] = "sum"
    model = build_sigmoid_bce(x, y, **kw)[0]
    rows = np.arange(R)
    ev = sigmoid_rows(model, model.z, rows, grad=True, floor_coef=1e-7)
    want = _plain(model, model.z, rows, 1e-7)
    for key, value in want.items():
        got = np.broadcast_to(getattr(ev, key), value.shape)
        np.testing.assert_array_equal(got.view(np.uint64), value.view(np.uint64), err_msg=key)


@pytest.mark.parametrize("labels", ["float32", "float64", "float16", "bool", "int8", "near-hard",
                                    "extreme"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hard_labels_path_is_the_formulas(labels, dtype, reduction):
    """Labels exactly 0/1 (any dtype) take the short path (`_hard_labels`), bit for bit the
    general formulas, with gradient and floor, either alone, or neither; a label off 0/1 by
    the smallest subnormal, or logits at +-746 (s(-x) underflows to 0 there: 0 - 0 is +0, a
    sign flip would give -0), take the general path."""
    rng = np.random.default_rng(7)
    R, K = 19, 301
    x = (rng.standard_normal((R, K)) * rng.choice([1e-3, 3.0, 60.0], size=(R, 1))).astype(dtype)
    x[0, :4] = [0.0, -0.0, 1e-300 if dtype == np.float64 else 1e-40, -650.0]
    x[1, :2] = [650.0, 36.0]
    y = rng.random((R, K)) < 0.3
    y[0, :4] = [True, False, True, True]
    y[1, :2] = [True, True]
    if labels == "near-hard":
        y = y.astype(np.float32)
        y[5, 7] = np.float32(1e-45)
    elif labels == "extreme":
        y = y.astype(np.float32)
        x[2, :4] = [746.0, -746.0, 746.0, -746.0]
        y[2, :4] = [1.0, 0.0, 0.0, 1.0]
    else:
        y = y.astype(labels)
    model = build_sigmoid_bce(x, y, reduction=reduction)[0]
    rows = np.arange(R)
    top = np.asarray(model.z, dtype=np.float64).max(axis=1)
    hard = _hard_labels(model, np.asarray(model.z, dtype=np.float64), top, rows)
    assert (hard is None) == (labels in ("near-hard", "extreme"))
    want = _plain(model, model.z, rows, 1e-7)
    for grad, coef in [(True, 1e-7), (True, None), (False, 1e-7), (False, None)]:
        ev = sigmoid_rows(model, model.z, rows, grad=grad, floor_coef=coef)
        assert (ev.grad is None) != grad and (ev.floor is None) == (coef is None)
        for key, value in want.items():
            got = getattr(ev, key)
            if got is None:
                continue
            got = np.broadcast_to(got, value.shape)
            np.testing.assert_array_equal(got.view(np.uint64), value.view(np.uint64), err_msg=key)


def test_hard_path_declines_large_logits():
    """|x| >= HARD_X_MAX (where s(-x) may be 0 and its sign matter) and -inf take the general
    path."""
    y = np.array([[1.0, 0.0, 1.0]])
    for bad in (HARD_X_MAX, -HARD_X_MAX, -np.inf):
        model = build_sigmoid_bce(np.array([[bad, 1.0, -2.0]]), y)[0]
        x = np.asarray(model.z, dtype=np.float64)
        assert _hard_labels(model, x, x.max(axis=1), np.arange(1)) is None
