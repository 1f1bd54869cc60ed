"""Make fixtures/binary: PyTorch `binary_cross_entropy_with_logits` losses and gradients for
tests/test_binary.py.

Run with torch installed (and without ce_cli on the path; this script never imports it):

    PYTHONPATH= python scripts/make_binary_fixtures.py   (a Python with torch 2.13, transformers)

Each case is one compressed .npz in fixtures/binary/ holding

    logits      the case's dtype (any shape; the last axis is the pos_weight axis)
    labels      float64 labels in [0, 1], the logits' shape (hard 0/1 or soft)
    weight      float64, any shape that broadcasts to the logits (only if the case has one)
    pos_weight  float64, (K,) or a 0-d scalar (only if the case has one)
    loss        torch's loss in float64 (reduction 'none': per element, the logits' shape)
    grad        torch's float64 gradient w.r.t. the logits of the reduced loss ('none': of loss.sum())

and fixtures/binary/cases.json maps each case name to its options (file, reduction, has_weight,
has_pos_weight, note, dtype, shape, label kind, torch version). The torch reference is always
computed in float64 from the exact (upcast) stored logits, `torch.tensor(logits).double()`, with
`torch.nn.functional.binary_cross_entropy_with_logits`, so it is the same function ce_cli's
float64 reference computes; only rounding (and torch's NaN at -inf, see the case note) can
separate them.

One case, `two_class_softmax_mean`, is different (its manifest entry has "two_class": true):
(N, 2) logits with int64 class-index labels and torch's `F.cross_entropy` loss and gradient,
plus `bce_loss` / `bce_grad`: torch's BCE-with-logits of z1 - z0 against the labels (the
identity the two-class bridge checks, on torch's side).

Everything is deterministic: fixed per-case seeds, and the .npz archives are written with a
fixed zip timestamp, so rerunning the script reproduces the files byte for byte.

Training-code semantics go to fixtures/binary_semantics/ (tests/test_binary_semantics.py), one
.npz per case in the layout of fixtures/semantics: the inputs (`sample_weight`, `weight`,
`pos_weight` when the case has them), the float64 loss and the gradient w.r.t. the RAW logits
(autograd through the scale / softcap written out in torch), `call` (JSON: the check_binary
settings that express the call) and `source`: "real" when the library computed it (PyTorch
BCEWithLogitsLoss, HF transformers ForSequenceClassificationLoss), "recomputed" when a published
formula is written out in torch because the library is not installed in this venv (Keras
BinaryCrossentropy, optax sigmoid_binary_cross_entropy).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "binary"
OUT_SEMANTICS = OUT.parent / "binary_semantics"
NEG_INF = -np.inf
MAX_BYTES = 500_000


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


def torch_bce(logits, labels, *, weight=None, pos_weight=None, reduction="mean"):
    """torch's float64 BCE-with-logits loss and gradient (of loss.sum() for 'none')."""
    x = torch.tensor(np.asarray(logits)).double().requires_grad_(True)
    y = torch.tensor(np.asarray(labels, dtype=np.float64))
    w = None if weight is None else torch.tensor(np.asarray(weight, dtype=np.float64))
    pw = None if pos_weight is None else torch.tensor(np.asarray(pos_weight, dtype=np.float64))
    loss = F.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=pw, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach().numpy().astype(np.float64), x.grad.numpy().astype(np.float64)


CASES: dict[str, dict] = {}


def case(name: str, logits, labels, *, weight=None, pos_weight=None, reduction="mean", note=""):
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.float64)
    assert labels.shape == logits.shape, (name, labels.shape, logits.shape)
    assert np.all((labels >= 0) & (labels <= 1)), name
    loss, grad = torch_bce(logits, labels, weight=weight, pos_weight=pos_weight, reduction=reduction)
    assert grad.shape == logits.shape, (name, grad.shape, logits.shape)
    assert loss.shape == (logits.shape if reduction == "none" else ()), (name, loss.shape)
    arrays = {"logits": logits, "labels": labels, "loss": loss, "grad": grad}
    if weight is not None:
        arrays["weight"] = np.asarray(weight, dtype=np.float64)
    if pos_weight is not None:
        arrays["pos_weight"] = np.asarray(pos_weight, dtype=np.float64)
    file = f"{name}.npz"
    savez(OUT / file, **arrays)
    hard = bool(np.all((labels == 0) | (labels == 1)))
    CASES[name] = {
        "file": file,
        "reduction": reduction,
        "has_weight": weight is not None,
        "has_pos_weight": pos_weight is not None,
        "weight_shape": None if weight is None else list(np.shape(weight)),
        "pos_weight_shape": None if pos_weight is None else list(np.shape(pos_weight)),
        "two_class": False,
        "note": note,
        "dtype": str(logits.dtype),
        "shape": list(logits.shape),
        "labels": "hard" if hard else "soft",
    }


def two_class_case(name: str, logits, labels, *, reduction="mean", note=""):
    """(N, 2) softmax logits with class-index labels: torch's CE, and torch's BCE on z1 - z0."""
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    assert logits.ndim == 2 and logits.shape[1] == 2 and labels.shape == logits.shape[:1]
    z = torch.tensor(logits).double().requires_grad_(True)
    loss = F.cross_entropy(z, torch.tensor(labels), reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    x = logits[:, 1].astype(np.float64) - logits[:, 0].astype(np.float64)
    bce_loss, bce_grad = torch_bce(x, labels.astype(np.float64), reduction=reduction)
    arrays = {"logits": logits, "labels": labels,
              "loss": loss.detach().numpy().astype(np.float64),
              "grad": z.grad.numpy().astype(np.float64),
              "bce_loss": bce_loss, "bce_grad": bce_grad}
    file = f"{name}.npz"
    savez(OUT / file, **arrays)
    CASES[name] = {
        "file": file, "reduction": reduction, "has_weight": False, "has_pos_weight": False,
        "weight_shape": None, "pos_weight_shape": None, "two_class": True, "note": note,
        "dtype": str(logits.dtype), "shape": list(logits.shape), "labels": "index",
    }


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(20261000 + seed)


def hard(rng, shape, p=0.4) -> np.ndarray:
    return (rng.random(shape) < p).astype(np.float64)


# --------------------------------------------------------------------------- cases


def make_cases() -> None:
    N, K = 16, 5

    r = rng_for(1)
    case("multilabel_hard_mean", (r.standard_normal((N, K)) * 2).astype(np.float32), hard(r, (N, K)),
         note="multi-label (16,5) float32, hard 0/1 labels, mean over N*K elements")

    r = rng_for(2)
    case("multilabel_hard_sum", r.standard_normal((N, K)) * 3, hard(r, (N, K)), reduction="sum",
         note="multi-label (16,5) float64, hard labels, sum")

    r = rng_for(3)
    case("multilabel_hard_none", r.standard_normal((N, K)) * 3, hard(r, (N, K)), reduction="none",
         note="multi-label (16,5) float64, hard labels, none (per-element loss, grad of the sum)")

    r = rng_for(4)
    case("soft_labels_mean", r.standard_normal((N, K)) * 2, r.random((N, K)),
         note="soft labels U[0,1), float64, mean")

    r = rng_for(5)
    y = r.random((N, K))
    y[0, :] = [0.0, 1.0, 0.5, 0.0, 1.0]  # exact endpoints mixed in
    case("soft_labels_none", (r.standard_normal((N, K)) * 2).astype(np.float32), y, reduction="none",
         note="soft labels (a few exactly 0/1/0.5), float32 logits, none")

    r = rng_for(6)
    case("pos_weight_vec_mean", r.standard_normal((N, K)) * 2, hard(r, (N, K)),
         pos_weight=r.uniform(0.2, 5.0, K),
         note="pos_weight (K,) on hard labels, mean (pos_weight scales the y*log s(x) term)")

    r = rng_for(7)
    case("pos_weight_scalar_mean", r.standard_normal((N, K)) * 2, r.random((N, K)),
         pos_weight=np.float64(3.0),
         note="scalar (0-d) pos_weight 3 on soft labels, mean")

    r = rng_for(8)
    case("weight_nk_mean", r.standard_normal((N, K)) * 2, hard(r, (N, K)),
         weight=r.uniform(0.1, 3.0, (N, K)),
         note="elementwise weight (N,K), mean divides by numel, not by sum w")

    r = rng_for(9)
    case("weight_k_broadcast_mean", (r.standard_normal((N, K)) * 2).astype(np.float32),
         hard(r, (N, K)), weight=r.uniform(0.1, 3.0, K),
         note="weight (K,) broadcast over rows, float32 logits, mean")

    r = rng_for(10)
    w = r.uniform(0.1, 3.0, (N, 1))
    w[3] = 0.0  # a zero-weight row
    case("weight_n1_broadcast_none", r.standard_normal((N, K)) * 2, r.random((N, K)), weight=w,
         reduction="none", note="weight (N,1) broadcast along K (one row has weight 0), soft labels, none")

    r = rng_for(11)
    case("weight_pos_weight_sum", r.standard_normal((N, K)) * 2, hard(r, (N, K)),
         weight=r.uniform(0.1, 3.0, (N, K)), pos_weight=r.uniform(0.2, 5.0, K), reduction="sum",
         note="weight (N,K) and pos_weight (K,) together, hard labels, sum")

    r = rng_for(12)
    case("weight_pos_weight_soft_none", r.standard_normal((N, K)) * 2, r.random((N, K)),
         weight=r.uniform(0.1, 3.0, K), pos_weight=r.uniform(0.2, 5.0, K), reduction="none",
         note="weight (K,) + pos_weight (K,) + soft labels, none")

    r = rng_for(13)
    case("one_d_mean", r.standard_normal(24) * 2, hard(r, 24),
         note="1-D (N,) logits (K = N: a single row), hard labels, mean")

    r = rng_for(14)
    case("one_d_pos_weight_sum", r.standard_normal(24) * 2, r.random(24),
         pos_weight=np.float64(0.5), reduction="sum",
         note="1-D (N,) logits, scalar pos_weight 0.5, soft labels, sum")

    r = rng_for(15)
    case("three_d_mean", (r.standard_normal((4, 3, 5)) * 2).astype(np.float32), hard(r, (4, 3, 5)),
         pos_weight=r.uniform(0.2, 5.0, 5),
         note="3-D (4,3,5) float32 logits, pos_weight along the last axis, mean over 60 elements")

    r = rng_for(16)
    case("three_d_weight_none", r.standard_normal((4, 3, 5)) * 2, r.random((4, 3, 5)),
         weight=r.uniform(0.1, 3.0, (3, 1)), reduction="none",
         note="3-D (4,3,5) float64, weight (3,1) broadcast over the middle axis, soft labels, none")

    r = rng_for(17)
    x = np.full((4, 4), 800.0, dtype=np.float32)
    x[:, 2:] = -800.0
    y = np.tile([0.0, 1.0, 0.0, 1.0], (4, 1))   # each sign with label 0 and label 1
    x[0] = [0.5, -0.25, 3.0, -3.0]             # one row of ordinary logits for scale
    y[0] = [1.0, 0.0, 1.0, 0.0]
    case("f32_pm800_hard_none", x, y, reduction="none",
         note="float32 logits at +-800 with labels 0 and 1 at both signs: loss 800 or 0, "
              "gradient of the sum exactly 0 or +-1; one ordinary row")

    r = rng_for(18)
    x = np.where(r.random((8, 4)) < 0.5, 800.0, -800.0).astype(np.float32)
    x[:, 0], x[:, 1] = 800.0, -800.0
    y = hard(r, (8, 4), p=0.5)
    y[:4, :2], y[4:, :2] = 0.0, 1.0
    case("f32_pm800_hard_mean", x, y,
         note="float32 logits at +-800, labels 0/1 at both signs, mean")

    r = rng_for(19)
    x = np.where(r.random((6, 4)) < 0.5, 1e4, -1e4)
    x[:, 0], x[:, 1] = 1e4, -1e4
    y = hard(r, (6, 4), p=0.5)
    y[:3, :2], y[3:, :2] = 0.0, 1.0
    case("f64_pm1e4_hard_none", x, y, reduction="none",
         note="float64 logits at +-1e4, hard labels: per-element loss exactly 1e4 or 0, "
              "gradient exactly 0 or +-1")

    r = rng_for(20)
    x = np.where(r.random((6, 4)) < 0.5, 1e4, -1e4)
    case("f64_pm1e4_soft_pos_weight_sum", x, r.random((6, 4)), pos_weight=r.uniform(0.2, 5.0, 4),
         reduction="sum",
         note="float64 logits at +-1e4, soft labels, pos_weight, sum (torch cancels (1-y)x + softplus(-x))")

    r = rng_for(21)
    case("f16_mean", (r.standard_normal((N, K)) * 3).astype(np.float16), hard(r, (N, K)),
         note="float16 logits (upcast exactly), hard labels, mean")

    r = rng_for(22)
    case("f16_weight_pos_weight_none", (r.standard_normal((N, K)) * 3).astype(np.float16),
         r.random((N, K)), weight=r.uniform(0.1, 3.0, (N, K)), pos_weight=r.uniform(0.2, 5.0, K),
         reduction="none", note="float16 logits, soft labels, weight + pos_weight, none")

    r = rng_for(23)
    x = r.standard_normal((8, 5)) * 2
    y = hard(r, (8, 5))
    mask = (r.random((8, 5)) < 0.3) & (y == 0)
    mask[0, :] = y[0] == 0
    x[mask] = NEG_INF
    case("neginf_label0_mean", x, y,
         note="-inf logits (only where the label is 0), mean: torch's loss is NaN "
              "((1-y)*x - log_sigmoid(x) = -inf + inf), its gradient 0 there; ce_cli gives the "
              "limit softplus(-inf) = 0")

    r = rng_for(24)
    x = (r.standard_normal((8, 5)) * 2).astype(np.float32)
    y = hard(r, (8, 5))
    x[(y == 0) & (r.random((8, 5)) < 0.4)] = NEG_INF
    case("neginf_label0_pos_weight_none", x, y, pos_weight=r.uniform(0.2, 5.0, 5), reduction="none",
         note="-inf logits at label 0, float32, pos_weight, none: torch NaN exactly at the -inf "
              "elements, finite elsewhere")

    r = rng_for(25)
    z = r.standard_normal((12, 2)) * 3
    two_class_case("two_class_softmax_mean", z, r.integers(0, 2, 12),
                   note="(12,2) softmax logits with class-index labels: torch CE, and torch BCE "
                        "on z1 - z0 (bce_loss, bce_grad = d/dz1 = -d/dz0)")


# --------------------------------------------------------------------------- training code


def semantic_case(name: str, source: str, call: dict, logits, labels, fn, **inputs) -> None:
    """fn(x) -> torch loss of the RAW logits x (float64); saves its loss and autograd gradient."""
    x = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    loss = fn(x)
    (loss.sum() if loss.ndim else loss).backward()
    arrays = {"logits": np.asarray(logits), "labels": np.asarray(labels, dtype=np.float64),
              "loss": loss.detach().numpy().astype(np.float64),
              "grad": x.grad.numpy().astype(np.float64),
              "call": np.array(json.dumps(call, sort_keys=True)), "source": np.array(source)}
    arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in inputs.items() if v is not None})
    savez(OUT_SEMANTICS / f"{name}.npz", **arrays)


def capped(x, scale=1.0, cap=None):
    """z = cap * tanh(scale * x / cap), or scale * x without a cap."""
    z = x * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def bce(z, y, **kw):
    return F.binary_cross_entropy_with_logits(z, torch.tensor(y), **{k: torch.tensor(v) for k, v
                                                                   in kw.items() if v is not None}
                                              | {"reduction": "none"})


def make_semantic_cases() -> None:
    N, K = 10, 6
    r = rng_for(101)
    x, y, pw = r.standard_normal((N, K)) * 4, hard(r, (N, K)), r.uniform(0.3, 4.0, K)
    semantic_case("torch_softcap", "real: torch BCEWithLogitsLoss on cap*tanh(x/cap)",
                  {"softcap": 3.0}, x, y,
                  lambda t: bce(capped(t, cap=3.0), y, pos_weight=pw).mean(), pos_weight=pw)
    r = rng_for(102)
    x, y, w = r.standard_normal((N, K)) * 3, r.random((N, K)), r.uniform(0.2, 2.0, K)
    semantic_case("torch_logit_scale_sum", "real: torch BCEWithLogitsLoss(reduction='sum') on S*x",
                  {"logit_scale": 0.625, "reduction": "sum"}, x, y,
                  lambda t: bce(capped(t, 0.625), y, weight=w).sum(), weight=w)
    r = rng_for(103)
    x, y = r.standard_normal((N, K)) * 5, r.random((N, K))
    semantic_case("torch_scale_softcap_none", "real: torch BCEWithLogitsLoss(reduction='none') on "
                  "cap*tanh(S*x/cap)", {"logit_scale": 2.5, "softcap": 4.0, "reduction": "none"},
                  x, y, lambda t: bce(capped(t, 2.5, 4.0), y))
    r = rng_for(104)
    x, y, s = r.standard_normal((N, K)) * 3, hard(r, (N, K)), r.uniform(0.0, 2.0, N)
    s[[2, 7]] = 0.0  # masked samples
    semantic_case("torch_sample_weight_mean", "real: torch BCEWithLogitsLoss(reduction='none') "
                  "times s, / (K sum s)", {}, x, y,
                  lambda t: (bce(t, y) * torch.tensor(s)[:, None]).sum() / (K * s.sum()),
                  sample_weight=s)
    r = rng_for(105)
    x, y = r.standard_normal((3, 4, 5)) * 3, hard(r, (3, 4, 5))
    s, w, pw = (r.random((3, 4)) < 0.7).astype(np.float64), r.uniform(0.2, 2, 5), r.uniform(0.5, 3, 5)
    semantic_case("torch_token_weight_denominator", "real: torch BCEWithLogitsLoss(weight, "
                  "pos_weight, reduction='none') times a (B, T) token mask, sum / 37",
                  {"denominator": 37.0, "reduction": "sum"}, x, y,
                  lambda t: (bce(t, y, weight=w, pos_weight=pw) * torch.tensor(s)[..., None]).sum()
                  / 37.0, sample_weight=s, weight=w, pos_weight=pw)
    r = rng_for(106)
    x, y, s = r.standard_normal(24) * 3, hard(r, 24), r.uniform(0.0, 3.0, 24)
    semantic_case("torch_1d_sample_weight_mean", "real: torch BCEWithLogitsLoss(reduction='none') "
                  "on (N,) logits times s, / sum s", {"label_smoothing": 0.2}, x, y,
                  lambda t: (bce(t, y * 0.8 + 0.1) * torch.tensor(s)).sum() / s.sum(),
                  sample_weight=s)
    keras_optax_hf(N, K)


def keras_optax_hf(N: int, K: int) -> None:
    """Keras and optax (formulas written out in torch), HF multi-label (the library)."""
    r = rng_for(107)
    x, y, s = r.standard_normal((N, K)) * 3, hard(r, (N, K)), r.uniform(0.0, 2.0, N)
    a = 0.1

    def keras(t, reduction):
        # keras.losses.binary_crossentropy: y*(1 - a) + 0.5*a, mean over the last axis; then the
        # Loss reduction: sum_over_batch_size = sum(s*l)/N, mean_with_sample_weight = /sum(s)
        per_sample = bce(t, y * (1.0 - a) + 0.5 * a).mean(dim=-1) * torch.tensor(s)
        return per_sample.sum() / (N if reduction == "sum_over_batch_size" else s.sum())

    semantic_case("keras_smoothing_sample_weight", "recomputed: Keras BinaryCrossentropy("
                  "from_logits=True, label_smoothing=0.1) with sample_weight "
                  "(sum_over_batch_size)", {"label_smoothing": a, "reduction": "sum",
                                            "denominator": float(N * K)}, x, y,
                  lambda t: keras(t, "sum_over_batch_size"), sample_weight=s)
    semantic_case("keras_mean_with_sample_weight", "recomputed: Keras BinaryCrossentropy("
                  "from_logits=True, label_smoothing=0.1, reduction='mean_with_sample_weight')",
                  {"label_smoothing": a}, x, y, lambda t: keras(t, "mean_with_sample_weight"),
                  sample_weight=s)
    r = rng_for(108)
    x, y = r.standard_normal((N, K)) * 3, r.random((N, K))
    # optax.sigmoid_binary_cross_entropy(logits, labels): -y log s(x) - (1 - y) log s(-x), per element
    semantic_case("optax_sigmoid_bce", "recomputed: optax sigmoid_binary_cross_entropy",
                  {"reduction": "none"}, x, y,
                  lambda t: -torch.tensor(y) * F.logsigmoid(t) - (1 - torch.tensor(y)) * F.logsigmoid(-t))
    from types import SimpleNamespace

    import transformers
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    r = rng_for(109)
    x, y = r.standard_normal((N, K)) * 3, hard(r, (N, K))
    config = SimpleNamespace(num_labels=K, problem_type="multi_label_classification")
    semantic_case("hf_multi_label", f"real: transformers {transformers.__version__} "
                  "ForSequenceClassificationLoss, problem_type='multi_label_classification'",
                  {}, x, y, lambda t: ForSequenceClassificationLoss(torch.tensor(y), t, config))


def main() -> None:
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    OUT_SEMANTICS.mkdir(parents=True, exist_ok=True)
    make_cases()
    make_semantic_cases()
    manifest = {name: {**CASES[name], "torch": torch.__version__} for name in CASES}
    (OUT / "cases.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    assert total < MAX_BYTES, f"fixtures/binary is {total} bytes"
    print(f"wrote {len(CASES)} cases to {OUT} ({total / 1e3:.1f} KB)")


if __name__ == "__main__":
    main()
