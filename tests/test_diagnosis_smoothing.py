"""The `smoothing_form` diagnosis names the form NOT in force: a gradient smoothed the torch way
(alpha/C on every class) under `smoothing_form="others"` is the wrong form, and a gradient
smoothed the others way (1 - alpha on the target, alpha/(C-1) elsewhere) under the default torch
form too; a gradient of the form in force passes with no diagnosis."""

from __future__ import annotations

import numpy as np
import pytest

import ce_cli
from tests.conftest import softmax

EPS = 0.1
FORMS = ("torch", "others")


def smoothed_grad(z: np.ndarray, y: np.ndarray, form: str, weight: np.ndarray | None = None
                  ) -> np.ndarray:
    """d/dz of mean label-smoothed CE, written out: coef_c = q_c w_c per row, the gradient
    (a sum_c coef_c - coef) / sum_n w_{y_n} (PyTorch's weighted mean)."""
    n, c = z.shape
    onehot = np.eye(c)[y]
    q = ((1 - EPS) * onehot + EPS / c if form == "torch"
         else (1 - EPS) * onehot + EPS / (c - 1) * (1 - onehot))
    w = np.ones(c) if weight is None else weight
    coef = q * w
    return (softmax(z) * coef.sum(axis=1, keepdims=True) - coef) / w[y].sum()


def case(seed: int = 5, n: int = 48, c: int = 30, weighted: bool = False):
    """Logits, labels and class weights (None unless `weighted`)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 2.0, c) if weighted else None
    return rng.standard_normal((n, c)), rng.integers(0, c, size=n), w


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class_weights"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_force", FORMS)
def test_wrong_form_is_diagnosed_as_the_other_form(in_force, dtype, weighted):
    z, y, w = case(weighted=weighted)
    used = "others" if in_force == "torch" else "torch"
    g = smoothed_grad(z, y, used, w).astype(dtype)
    report = ce_cli.check_grad(z.astype(dtype), y, grad=g, weight=w, label_smoothing=EPS,
                               smoothing_form=in_force, fd="off")
    assert not report.ok
    codes = [d.code for d in report.diagnosis]
    assert codes and codes[0] == "smoothing_form", [d.message for d in report.diagnosis]
    spread = {"torch": "alpha/C over every class", "others": "alpha/(C-1) over the other classes"}
    assert f"yours spreads {spread[used]}" in report.diagnosis[0].message


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class_weights"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", FORMS)
def test_the_form_in_force_gets_no_diagnosis(form, dtype, weighted):
    z, y, w = case(seed=9, weighted=weighted)
    g = smoothed_grad(z, y, form, w).astype(dtype)
    report = ce_cli.check_grad(z.astype(dtype), y, grad=g, weight=w, label_smoothing=EPS,
                               smoothing_form=form, fd="off")
    assert report.ok and report.diagnosis == (), [d.message for d in report.diagnosis]


@pytest.mark.parametrize("in_force", FORMS)
def test_another_bug_under_smoothing_is_not_called_the_form(in_force):
    """A sign error under either form is a sign error, not the other smoothing form."""
    z, y, _ = case(seed=3)
    g = -smoothed_grad(z, y, in_force)
    report = ce_cli.check_grad(z, y, grad=g, label_smoothing=EPS, smoothing_form=in_force,
                               fd="off")
    codes = [d.code for d in report.diagnosis]
    assert not report.ok and "smoothing_form" not in codes and codes[0] == "sign"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smoothing_left_on_ignored_rows_is_named(dtype):
    """PyTorch #73205 (and tinygrad's fix, PR #3570): the smoothing term not masked, so ignored
    rows carry eps (a - 1/C) / D. Every error sits in those rows, whose reference is 0: named as
    such, not as a row factor, though the valid rows' own smallest entries differ from the
    float64 reference by more than the rule's rtol."""
    z, y, _w = case(seed=8, n=64, c=400)
    y[::4] = -100
    valid = y != -100
    g = np.zeros_like(z)
    g[valid] = smoothed_grad(z[valid], y[valid], "torch")
    bug = g.copy()
    bug[~valid] = EPS * (softmax(z[~valid]) - 1.0 / z.shape[1]) / valid.sum()
    report = ce_cli.check_grad(z.astype(dtype), y, grad=bug.astype(dtype), label_smoothing=EPS,
                               fd="off")
    assert [d.code for d in report.diagnosis] == ["ignored_rows"], report.diagnosis
    assert ce_cli.check_grad(z.astype(dtype), y, grad=g.astype(dtype), label_smoothing=EPS,
                             fd="off").ok
