"""Fixtures for the training-code semantics (fixtures/semantics/*.npz), float64 throughout.

Run where torch is installed:  python scripts/make_semantics_fixtures.py

Each file holds the inputs, the framework's loss and its gradient w.r.t. the RAW logits
(autograd), the ce-check settings that express the call (`call`, JSON) and `source`: "real"
when the library itself computed it (PyTorch F.cross_entropy / BCEWithLogitsLoss, HF
transformers ForCausalLMLoss), "recomputed" when the published formula is written out in torch
because the library needs a GPU (Liger, Cut Cross-Entropy, Megatron) or another framework
(optax, Keras).
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "semantics"
torch.set_default_dtype(torch.float64)
GEN = torch.Generator().manual_seed(20261129)


def randn(*shape, scale=3.0):
    return torch.randn(*shape, generator=GEN) * scale


def labels(shape, C, ignore=()):
    y = torch.randint(0, C, shape, generator=GEN)
    flat = y.view(-1)
    for i in ignore:
        flat[i] = -100
    return y


def save(name, source, call, z, y, loss, grad, **extra):
    arrays = {"logits": z.detach().numpy(), "labels": y.numpy(),
              "loss": np.asarray(loss.detach().numpy()), "grad": grad.numpy(),
              "call": np.array(json.dumps(call)), "source": np.array(source)}
    arrays.update({k: (v.detach().numpy() if torch.is_tensor(v) else np.asarray(v))
                   for k, v in extra.items()})
    np.savez_compressed(OUT / f"{name}.npz", **arrays)


def run(fn, z):
    z = z.clone().requires_grad_(True)
    out = fn(z)
    loss = out[0] if isinstance(out, tuple) else out
    loss.sum().backward() if loss.ndim else loss.backward()
    return out, z.grad


def zloss_rows(lse, y, coef):
    """coef * lse^2 on non-ignored rows (PaLM, OLMo, Liger lse_square_scale)."""
    return coef * lse**2 * (y != -100)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    N, C = 12, 16
    z, y = randn(N, C), labels((N,), C, ignore=(3, 7))
    # --- PyTorch itself
    loss, g = run(lambda t: F.cross_entropy(t, y), z)
    save("torch_plain", "real", {}, z, y, loss, g)
    loss, g = run(lambda t: F.cross_entropy(t, y, label_smoothing=0.1), z)
    save("torch_smoothing", "real", {"label_smoothing": 0.1}, z, y, loss, g)
    cap = 4.0
    loss, g = run(lambda t: F.cross_entropy(cap * torch.tanh(t / cap), y), z)
    save("torch_softcap", "real", {"softcap": cap}, z, y, loss, g)
    loss, g = run(lambda t: F.cross_entropy(0.0625 * t * 10, y, reduction="sum"), z)
    save("torch_logit_scale", "real", {"logit_scale": 0.625, "reduction": "sum"}, z, y, loss, g)
    w = torch.rand(N, generator=GEN)
    loss, g = run(lambda t: (F.cross_entropy(t, y, reduction="none") * w).sum()
                  / (w * (y != -100)).sum(), z)
    save("torch_sample_weight", "real", {}, z, y, loss, g, sample_weight=w)
    loss, g = run(lambda t: F.cross_entropy(t, y, reduction="sum") / 50.0, z)
    save("torch_denominator", "real", {"denominator": 50.0, "reduction": "sum"}, z, y, loss, g)
    coef = 1e-2

    def with_zloss(t):
        lse = torch.logsumexp(t, dim=-1)
        n = (y != -100).sum()
        return F.cross_entropy(t, y) + zloss_rows(lse, y, coef).sum() / n

    loss, g = run(with_zloss, z)
    lse = torch.logsumexp(z, dim=-1)
    save("torch_z_loss", "real", {"z_loss": coef}, z, y, loss, g, lse=lse,
         z_loss_value=zloss_rows(lse, y, coef).sum() / (y != -100).sum())
    # --- BCEWithLogitsLoss
    zb, yb = randn(6, 5), torch.rand(6, 5, generator=GEN)
    pw = torch.rand(5, generator=GEN) + 0.5
    loss, g = run(lambda t: F.binary_cross_entropy_with_logits(t, yb, pos_weight=pw), zb)
    save("torch_bce_pos_weight", "real", {"binary": True}, zb, yb, loss, g, pos_weight=pw)
    hf(C)
    recomputed(z, y, C)


def hf(C: int) -> None:
    """HF transformers ForCausalLMLoss (the library itself, CPU)."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    import transformers

    B, T = 3, 6
    z = randn(B, T, C)
    y = labels((B, T), C, ignore=(2, 9))
    src = (f"real: transformers {transformers.__version__} ForCausalLMLoss (its float32 upcast "
           "`logits.float()` kept off for the float64 values; loss_f32/grad_f32 with it)")
    for name, kw, call in (("hf_causal_lm", {}, {"shift_labels": True}),
                           ("hf_causal_lm_num_items", {"num_items_in_batch": 40},
                            {"shift_labels": True, "denominator": 40.0, "reduction": "sum"})):
        loss32, g32 = run(lambda t: ForCausalLMLoss(t, y, vocab_size=C, **kw), z)
        with patch.object(torch.Tensor, "float", lambda self: self):
            loss, g = run(lambda t: ForCausalLMLoss(t, y, vocab_size=C, **kw), z)
        save(name, src, call, z, y, loss, g, loss_f32=loss32.float(), grad_f32=g32.float())


def recomputed(z, y, C: int) -> None:
    """Published formulas of GPU-only kernels and other frameworks, written out in torch."""
    # Megatron vocab_parallel_cross_entropy, label smoothing: s = a C/(C-1),
    # loss = (1 - s) nll - s mean_c log p_c, per token (reduction none)
    a = 0.1

    def megatron(t):
        logp = torch.log_softmax(t, dim=-1)
        nll = -logp.gather(1, y.clamp(min=0)[:, None])[:, 0]
        s = a * C / (C - 1)
        return ((1 - s) * nll - s * logp.mean(dim=-1)) * (y != -100)

    loss, g = run(megatron, z)
    save("megatron_smoothing", "recomputed: Megatron vocab_parallel_cross_entropy",
         {"label_smoothing": a, "smoothing_form": "others", "reduction": "none"}, z, y, loss, g)
    # Megatron's vocabulary shard: rank holds columns [4, 12); global lse all-reduced
    K, V = 4, 8
    yy = y.clone()
    yy[0], yy[1] = 1, 14  # two labels in other shards
    loss_full, g_full = run(lambda t: F.cross_entropy(t, yy, reduction="sum"), z)
    inside = (yy >= K) & (yy < K + V)
    lse = torch.logsumexp(z, dim=-1)
    # the shard's share of the loss: lse - z_y where the label is inside, lse elsewhere
    shard_loss = (lse - torch.where(inside, z.gather(1, yy.clamp(min=0)[:, None])[:, 0]
                                    + 0 * lse, 0 * lse)) * (yy != -100)
    save("megatron_vocab_shard", "real: torch full-vocabulary F.cross_entropy, shard columns",
         {"vocab_offset": K, "reduction": "sum"}, z[:, K:K + V].contiguous(), yy,
         shard_loss.sum(), g_full[:, K:K + V].contiguous(), lse=lse)
    # Liger LigerCrossEntropyLoss(softcap, lse_square_scale, label_smoothing, return_z_loss):
    # CE on softcap*tanh(z/softcap) + lse_square_scale * lse^2, both / n_non_ignore
    cap, coef = 5.0, 1e-3

    def liger(t):
        zc = cap * torch.tanh(t / cap)
        lse = torch.logsumexp(zc, dim=-1)
        n = (y != -100).sum()
        zl = zloss_rows(lse, y, coef).sum() / n
        return F.cross_entropy(zc, y, label_smoothing=0.05) + zl, zl, lse

    (loss, zl, lse), g = run(liger, z)
    save("liger_softcap_zloss", "recomputed: Liger LigerCrossEntropyLoss",
         {"softcap": cap, "z_loss": coef, "label_smoothing": 0.05}, z, y, loss, g,
         z_loss_value=zl, lse=lse)
    # Apple Cut Cross-Entropy: F.cross_entropy((e @ c.T).float(), targets) with softcap
    loss, g = run(lambda t: F.cross_entropy(cap * torch.tanh(t / cap), y, reduction="sum"), z)
    save("cce_softcap", "recomputed: Apple cut_cross_entropy linear_cross_entropy",
         {"softcap": cap, "reduction": "sum"}, z, y, loss, g)
    # optax softmax_cross_entropy (probabilities, per example) and _with_integer_labels
    t = torch.softmax(randn(z.shape[0], C), dim=-1)
    loss, g = run(lambda u: -(t * torch.log_softmax(u, dim=-1)).sum(-1), z)
    save("optax_softmax_ce", "recomputed: optax softmax_cross_entropy", {"reduction": "none"},
         z, t, loss, g)
    yi = y.clamp(min=0)
    loss, g = run(lambda u: torch.logsumexp(u, -1) - u.gather(1, yi[:, None])[:, 0], z)
    save("optax_integer_labels", "recomputed: optax softmax_cross_entropy_with_integer_labels",
         {"reduction": "none"}, z, yi, loss, g)
    # Keras SparseCategoricalCrossentropy(from_logits=True, ignore_class=2): mean over the
    # entries whose label is not the ignored class
    yk = yi.clone()
    yk[:3] = 2
    keep = yk != 2
    loss, g = run(lambda u: ((torch.logsumexp(u, -1) - u.gather(1, yk[:, None])[:, 0])
                             * keep).sum() / keep.sum(), z)
    save("keras_ignore_class", "recomputed: Keras SparseCategoricalCrossentropy",
         {"ignore_index": 2}, z, yk, loss, g)


if __name__ == "__main__":
    main()
