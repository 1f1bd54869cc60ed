"""Make fixtures/parity: PyTorch `F.cross_entropy` losses and gradients for tests/test_parity.py.

Run with torch installed (and without ce_cli on the path; this script never imports it):

    PYTHONPATH= /tmp/torchvenv/bin/python scripts/make_fixtures.py

Each case is one compressed .npz in fixtures/parity/ holding

    logits  the case's dtype, in OUR layout (class axis last unless the case says class_axis 1)
    labels  int64 class indices (batch shape) or float64 probability targets (the logits' shape)
    weight  float64 class weights (only for weighted cases)
    loss    torch's loss in float64 (reduction 'none': the per-sample vector, batch shape)
    grad    torch's float64 gradient w.r.t. the logits of the reduced loss ('none': of loss.sum())

and fixtures/parity/cases.json maps each case name to its options. The torch reference is always
computed in float64 from the exact (upcast) stored logits, `torch.tensor(logits).double()`, so it
is the same function ce_cli's float64 reference computes; only rounding can separate them.
Our layout puts the class axis last ((B, T, V) logits with (B, T) labels); torch wants it at 1,
so the generator moves it (the gradient comes back in our layout because the leaf is ours).

Also writes the CSV case: csv_logits.csv / csv_labels.csv (header line each) and
csv_expected.npz (loss, grad), the torch reference for the values as parsed back from the CSV.

Everything is deterministic: fixed per-case seeds, and the .npz archives are written with a
fixed zip timestamp, so rerunning the script reproduces the files byte for byte.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "parity"
NEG_INF = -np.inf


# --------------------------------------------------------------------------- helpers


def savez(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed, but byte-for-byte reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def torch_reference(logits, labels, *, weight=None, reduction="mean", ignore_index=-100,
                    label_smoothing=0.0, class_axis=-1):
    """torch's float64 loss and gradient, with the logits in our layout."""
    x = torch.tensor(np.asarray(logits)).double().requires_grad_(True)
    labels = np.asarray(labels)
    soft = labels.dtype.kind == "f"
    t = torch.tensor(labels).double() if soft else torch.tensor(labels, dtype=torch.int64)
    xin = x
    if x.ndim >= 2 and class_axis in (-1, x.ndim - 1):
        xin = x.movedim(-1, 1)  # our class-last layout -> torch's (N, C, d1, ...)
        if soft:
            t = t.movedim(-1, 1)
    elif x.ndim >= 2 and class_axis != 1:
        raise ValueError(f"unsupported class_axis {class_axis}")
    w = None if weight is None else torch.tensor(np.asarray(weight, dtype=np.float64))
    loss = F.cross_entropy(xin, t, weight=w, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach().numpy().astype(np.float64), x.grad.numpy().astype(np.float64)


CASES: dict[str, dict] = {}


def case(name: str, logits, labels, *, weight=None, reduction="mean", ignore_index=-100,
         label_smoothing=0.0, class_axis=-1, note=""):
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    else:
        labels = labels.astype(np.float64)
    loss, grad = torch_reference(logits, labels, weight=weight, reduction=reduction,
                                 ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 class_axis=class_axis)
    assert grad.shape == logits.shape, (name, grad.shape, logits.shape)
    arrays = {"logits": logits, "labels": labels, "loss": loss, "grad": grad}
    if weight is not None:
        arrays["weight"] = np.asarray(weight, dtype=np.float64)
    file = f"{name}.npz"
    savez(OUT / file, **arrays)
    CASES[name] = {
        "file": file,
        "reduction": reduction,
        "ignore_index": int(ignore_index),
        "label_smoothing": float(label_smoothing),
        "class_axis": int(class_axis),
        "weighted": weight is not None,
        "note": note,
        "dtype": str(logits.dtype),
        "shape": list(logits.shape),
        "targets": "probability" if labels.dtype.kind == "f" else "index",
    }


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(20260000 + seed)


def index_labels(rng, batch, C, *, ignore_frac=0.0, ignore_value=-100):
    y = rng.integers(0, C, size=batch)
    if ignore_frac:
        y = np.where(rng.random(batch) < ignore_frac, ignore_value, y)
    return y.astype(np.int64)


def dirichlet(rng, batch, C, alpha=0.5):
    t = rng.dirichlet(np.full(C, alpha), size=int(np.prod(batch, dtype=np.int64)))
    return t.reshape(tuple(batch) + (C,))


# --------------------------------------------------------------------------- cases


def make_cases() -> None:
    B, T, V = 4, 7, 50

    r = rng_for(1)
    x = (r.standard_normal((B, T, V)) * 2).astype(np.float32)
    y = index_labels(r, (B, T), V)
    y[0, :3] = 0  # make sure some targets hit ignore_index=0
    case("btv_ignore0_sum", x, y, reduction="sum", ignore_index=0,
         note="(B,T,V) float32, ignore_index=0 (a valid class), sum")

    r = rng_for(2)
    x = (r.standard_normal((B, T, V)) * 2).astype(np.float32)
    y = index_labels(r, (B, T), V, ignore_frac=0.25)
    w = r.uniform(0.1, 3.0, V)
    case("btv_weights_ignore_mean", x, y, weight=w,
         note="(B,T,V) float32, class weights, -100 rows ignored, mean = sum / sum w_y")

    r = rng_for(3)
    x = (r.standard_normal((B, T, V)) * 2).astype(np.float32)
    y = index_labels(r, (B, T), V, ignore_frac=0.25)
    w = r.uniform(0.1, 3.0, V)
    case("btv_smooth_weights_ignore_mean", x, y, weight=w, label_smoothing=0.1,
         note="smoothing 0.1 + weights + ignore: smoothing term weighted by every w_c, "
              "divided by sum w_y (pytorch#104776)")

    r = rng_for(4)
    x = r.standard_normal((9, 20)) * 3
    y = index_labels(r, (9,), 20, ignore_frac=0.3)
    case("smooth_none", x, y, reduction="none", label_smoothing=0.2,
         note="float64, smoothing 0.2, reduction none (ignored rows 0), grad of loss.sum()")

    r = rng_for(5)
    x = (r.standard_normal((B, T, V)) * 2).astype(np.float32)
    y = index_labels(r, (B, T), V, ignore_frac=0.2)
    w = r.uniform(0.1, 3.0, V)
    case("smooth_weights_none", x, y, weight=w, reduction="none", label_smoothing=0.3,
         note="(B,T,V) float32, smoothing 0.3 + weights + ignore, reduction none")

    r = rng_for(6)
    x = (r.standard_normal((B, T, V)) * 2).astype(np.float32)
    case("soft_dirichlet_mean", x, dirichlet(r, (B, T), V),
         note="probability targets Dirichlet(0.5), mean over B*T positions")

    r = rng_for(7)
    x = r.standard_normal((B, T, V)) * 2
    w = r.uniform(0.1, 3.0, V)
    case("soft_smooth_weights_mean", x, dirichlet(r, (B, T), V, alpha=0.3), weight=w,
         label_smoothing=0.15,
         note="probability targets + smoothing 0.15 + weights, mean divides by positions, not weights")

    r = rng_for(8)
    x = r.standard_normal((B, T, V)) * 2
    w = r.uniform(0.1, 3.0, V)
    case("soft_smooth_weights_sum", x, dirichlet(r, (B, T), V, alpha=2.0), weight=w,
         label_smoothing=0.05, reduction="sum",
         note="probability targets + smoothing + weights, sum")

    r = rng_for(9)
    x = (r.standard_normal((16, 12)) * 2).astype(np.float32)
    onehot = np.eye(12)[r.integers(0, 12, 16)]
    case("onehot_float_mean", x, onehot,
         note="one-hot float targets take the probability path; equals index targets unweighted")

    r = rng_for(10)
    x = (r.standard_normal((16, 12)) * 2).astype(np.float32)
    onehot = np.eye(12)[r.integers(0, 12, 16)]
    w = r.uniform(0.1, 3.0, 12)
    case("onehot_float_weighted_mean", x, onehot, weight=w,
         note="one-hot float targets + weights, mean: divides by N (not sum w_y as index targets do)")

    r = rng_for(11)
    x = (r.standard_normal((16, 30)) * 1e3).astype(np.float32)
    y = index_labels(r, (16,), 30)
    # a few near-ties so the softmax is not one-hot everywhere
    x[:4, 1] = x[:4, 0] + np.float32(3.0)
    x[4:8, 2] = x[4:8].max(axis=1) + r.uniform(-5, 5, 4).astype(np.float32)
    y[:4] = 1
    y[4:8] = 2
    case("f32_scale1e3_none", x, y, reduction="none",
         note="float32 logits at scale 1e3, near-ties in 8 rows; per-sample losses")

    r = rng_for(12)
    x = r.standard_normal((16, 30)) * 1e6
    y = index_labels(r, (16,), 30)
    x[:5, 3] = x[:5].max(axis=1) + r.uniform(-20, 20, 5)
    y[:5] = 3
    case("f64_scale1e6_mean", x, y,
         note="float64 logits at scale 1e6 (5 rows with a near-tie at the max)")

    r = rng_for(13)
    x = (r.standard_normal((12, 10)) * 1e-3 + 1e4).astype(np.float32)
    x += (r.standard_normal((12, 10)) * 2).astype(np.float32)
    y = index_labels(r, (12,), 10)
    case("f32_offset1e4_none", x, y, reduction="none",
         note="float32 logits around 1e4 (spacing 1e-3): the reference uses the rounded inputs")

    r = rng_for(14)
    x = (r.standard_normal((8, 100)) * 3).astype(np.float16)
    y = index_labels(r, (8,), 100, ignore_frac=0.2)
    w = r.uniform(0.5, 2.0, 100)
    case("f16_weights_mean", x, y, weight=w, note="float16 logits, weights, ignore, mean")

    r = rng_for(15)
    C = 10
    margins = [20.0, 30.0, 50.0, 50.0, 800.0, 800.0]
    x = r.standard_normal((len(margins), C))
    y = r.integers(0, C, len(margins))
    for i, m in enumerate(margins):
        x[i, y[i]] = x[i].max() + m
    case("confident_none", x, y, reduction="none",
         note="confident rows, margins 20/30/50/800: p_y - 1 cancels in torch (loss 0 at margin 50) "
              "while the true loss is ~1e-21")

    r = rng_for(16)
    x = r.standard_normal((6, C))
    y = r.integers(0, C, 6)
    for i, m in enumerate(margins):
        x[i, y[i]] = x[i].max() + m
    case("confident_smooth_mean", x, y, label_smoothing=0.1,
         note="confident rows with smoothing 0.1, mean")

    r = rng_for(17)
    x = (r.standard_normal((10, 12)) * 2).astype(np.float32)
    y = index_labels(r, (10,), 12)
    mask = r.random((10, 12)) < 0.4
    mask[np.arange(10), y] = False
    x[mask] = NEG_INF
    x[0, :] = NEG_INF
    x[0, y[0]] = 1.5  # a row with a single finite logit: loss exactly 0
    case("neginf_masked_mean", x, y,
         note="-inf masked logits (never on the target), float32, mean")

    r = rng_for(18)
    x = r.standard_normal((10, 12)) * 2
    y = index_labels(r, (10,), 12)
    mask = r.random((10, 12)) < 0.4
    mask[np.arange(10), y] = False
    x[mask] = NEG_INF
    w = r.uniform(0.1, 3.0, 12)
    case("neginf_masked_weights_none", x, y, weight=w, reduction="none",
         note="-inf masked logits (never on the target), weights, none")

    r = rng_for(19)
    x = r.standard_normal((12, 8)) * 2
    y = index_labels(r, (12,), 8)
    y[:4] = 3
    case("ignore_index_is_class3_mean", x, y, ignore_index=3,
         note="ignore_index=3 is a valid class: its rows are ignored")

    r = rng_for(20)
    x = r.standard_normal((12, 8)) * 2
    y = index_labels(r, (12,), 8)
    y[:4] = 3
    w = r.uniform(0.1, 3.0, 8)
    case("ignore_index_is_class3_smooth_weights_mean", x, y, weight=w, ignore_index=3,
         label_smoothing=0.1,
         note="ignore_index=3 + smoothing + weights: ignored rows masked in both terms")

    r = rng_for(21)
    x = r.standard_normal((5, 6))
    case("all_ignored_mean", x, np.full(5, -100), note="every target ignored, mean: NaN loss, zero grad")

    r = rng_for(22)
    x = r.standard_normal((5, 6))
    case("all_ignored_smooth_mean", x, np.full(5, -100), label_smoothing=0.1,
         note="every target ignored + smoothing, mean: NaN loss, zero grad")

    r = rng_for(23)
    x = r.standard_normal((14, 7)) * 2
    y = index_labels(r, (14,), 7, ignore_frac=0.2)
    w = r.uniform(0.5, 2.0, 7)
    w[[1, 4]] = 0.0
    y[:3] = 1  # targets on zero-weight classes
    case("zero_class_weights_mean", x, y, weight=w,
         note="classes 1 and 4 have weight 0 (3+ targets on them); mean over the nonzero sum")

    r = rng_for(24)
    x = r.standard_normal((14, 7)) * 2
    y = index_labels(r, (14,), 7, ignore_frac=0.2)
    w = r.uniform(0.5, 2.0, 7)
    w[[1, 4]] = 0.0
    y[:3] = 4
    case("zero_class_weights_smooth_sum", x, y, weight=w, label_smoothing=0.2, reduction="sum",
         note="zero class weights + smoothing, sum: zero-weight targets still get the smoothing term")

    r = rng_for(25)
    x = r.standard_normal((15, 9)) * 2
    y = index_labels(r, (15,), 9, ignore_frac=0.2)
    w = r.uniform(0.1, 3.0, 9)
    case("weights_none", x, y, weight=w, reduction="none",
         note="weights + ignore, reduction none: w_y * -log p_y per row")

    r = rng_for(26)
    x = r.standard_normal((3, 6, 5)) * 2
    y = index_labels(r, (3, 5), 6, ignore_frac=0.2)
    w = r.uniform(0.1, 3.0, 6)
    case("class_axis1_weights_ignore_mean", x, y, weight=w, class_axis=1,
         note="torch layout (N,C,d1)=(3,6,5) passed as is, class_axis=1, weights + ignore")

    r = rng_for(27)
    x = (r.standard_normal((3, 6, 5)) * 2).astype(np.float32)
    t = np.moveaxis(dirichlet(r, (3, 5), 6), -1, 1)
    case("class_axis1_soft_smooth_sum", x, t, class_axis=1, label_smoothing=0.1, reduction="sum",
         note="class_axis=1 (3,6,5) with (3,6,5) probability targets + smoothing, sum")

    r = rng_for(28)
    x = r.standard_normal(9) * 2
    case("single_sample_mean", x, np.int64(4), note="(C,) logits with a scalar label")

    r = rng_for(29)
    x = r.standard_normal(9) * 2
    w = r.uniform(0.1, 3.0, 9)
    case("single_sample_weighted_sum", x, np.int64(7), weight=w, reduction="sum",
         note="(C,) logits, scalar label, weights, sum (= w_y * -log p_y)")

    r = rng_for(30)
    x = r.standard_normal(9) * 2
    case("single_sample_soft_mean", x, r.dirichlet(np.ones(9)), label_smoothing=0.1,
         note="(C,) logits with (C,) probability target + smoothing, mean divides by 1")

    r = rng_for(31)
    # quantized logits (steps of 1/4) keep the float32 logits and the float64 gradient
    # compressible (few distinct values per row): the fixture stays ~1 MB
    x = (np.round(r.standard_normal((8, 32000)) * 3 * 4) / 4).astype(np.float32)
    y = index_labels(r, (8,), 32000)
    x[np.arange(8), y] += 8.0
    case("large_vocab_32000_f32_mean", x, y,
         note="(8, 32000) float32 logits on a 1/4 grid, targets boosted by 8, mean")

    r = rng_for(32)
    x = r.standard_normal((12, 2)) * 3
    y = index_labels(r, (12,), 2, ignore_frac=0.2)
    case("two_classes_mean", x, y, note="2 classes, ignore, mean")

    # --- cases where ce_cli's float64 reference is known to differ from torch 2.13
    r = rng_for(33)
    x = r.standard_normal((6, 5))
    y = np.array([0, 0, -100, 2, 2, -100])
    w = np.array([0.0, 1.0, 0.0, 2.0, 0.5])
    case("zero_weight_sum_mean_nan", x, y, weight=w,
         note="every non-ignored target has weight 0, mean: torch gives NaN loss AND NaN gradient "
              "rows at the non-ignored targets (-w_y * g / total_weight = 0 * inf), zeros at ignored rows")

    r = rng_for(34)
    x = r.standard_normal((6, 8))
    t = dirichlet(r, (6,), 8)
    x[0, 2] = NEG_INF
    t[0] = 0.0
    t[0, [0, 5]] = [0.3, 0.7]  # t = 0 where the logit is -inf
    case("soft_neginf_zero_target_mean", x, t,
         note="probability targets with t=0 at a -inf logit: torch's loss is NaN (0 * -inf); "
              "its gradient is finite")

    r = rng_for(35)
    x = r.standard_normal((6, 8))
    y = index_labels(r, (6,), 8)
    x[1, (y[1] + 1) % 8] = NEG_INF
    case("smooth_neginf_inf_mean", x, y, label_smoothing=0.1,
         note="smoothing with a -inf logit: the smoothing term is -inf, torch's loss is +inf, "
              "its gradient finite")


def make_csv_case() -> None:
    r = rng_for(100)
    N, C = 10, 5
    x = np.round(r.standard_normal((N, C)) * 2, 6)
    y = r.integers(0, C, N)
    with open(OUT / "csv_logits.csv", "w", newline="") as fh:
        fh.write(",".join(f"logit_{c}" for c in range(C)) + "\n")
        for row in x:
            fh.write(",".join(repr(float(v)) for v in row) + "\n")
    with open(OUT / "csv_labels.csv", "w", newline="") as fh:
        fh.write("label\n")
        for v in y:
            fh.write(f"{int(v)}\n")
    # the reference for the values as a CSV reader parses them back
    xp = np.loadtxt(OUT / "csv_logits.csv", delimiter=",", skiprows=1, dtype=np.float64)
    yp = np.loadtxt(OUT / "csv_labels.csv", skiprows=1, dtype=np.int64)
    assert np.array_equal(xp, x) and np.array_equal(yp, y)
    loss, grad = torch_reference(xp, yp)
    savez(OUT / "csv_expected.npz", loss=loss, grad=grad)


def main() -> None:
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    make_cases()
    make_csv_case()
    manifest = {name: {**CASES[name], "torch": torch.__version__} for name in CASES}
    (OUT / "cases.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(CASES)} cases + the CSV case to {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
