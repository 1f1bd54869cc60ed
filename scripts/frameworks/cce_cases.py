"""Apple Cut Cross-Entropy's real Triton kernels (`impl="cce"`) on CPU under Triton's
interpreter, for `ce-check linear` (runs in a venv with torch, triton, cut-cross-entropy and
numpy).

    python cce_cases.py OUTDIR [--small] [--only SUBSTR]
    python liger_cases.py OUTDIR --check        (ce-check on the cases, ce_cli importable)

The interpreter is completed as in liger_cases.py (`triton_interpreter`: fp32 scalars, bf16
rounded to nearest and computed in float32, tl.dot on bf16 in float32), and libdevice's `tanh`
and `log1p` (which CCE's tl_utils calls, and the interpreter returns None for: the
"'NoneType' object has no attribute 'dtype'" of `_cce_lse_forward_kernel`) are numpy's.
CCE's backward takes bf16 / fp16 only: bf16 embeddings and classifier.

`linear_cross_entropy(e, c, y, impl="cce", filter_eps=...)`: `filtered` is CCE's default
("high": finfo(bf16).eps / 32 = 2^-12; a (token block x vocabulary block) tile whose every
|softmax - onehot| is below it contributes nothing to either gradient), `exact` filter_eps=None.
Hidden e (N, D) with a constant feature e[:, 0] = 1 whose classifier column is a Zipf prior
-ZIPF * log(1 + v), as an LM head's frequency bias: the rare classes' probabilities sit far below
2^-12, so whole vocabulary tiles are filtered (random Gaussian logits alone leave none). Logit std
(the rest of the product) s. Cases are written in liger_cases' linear format (`target` linear,
`ce_check` options, `zero_weight_rows`: the classifier rows whose gradient is exactly 0).
"""

from __future__ import annotations

import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import liger_cases  # noqa: E402

ZIPF = 1.5
VARIANTS = {"filtered": "high", "exact": None}


def load_cce():
    """(torch, linear_cross_entropy, version) under the completed interpreter."""
    torch = liger_cases.triton_interpreter()
    import cut_cross_entropy
    import cut_cross_entropy.tl_utils as tl_utils
    tl_utils.tl_libdevice = types.SimpleNamespace(tanh=liger_cases.numpy_elementwise(np.tanh),
                                                  log1p=liger_cases.numpy_elementwise(np.log1p))
    from cut_cross_entropy import linear_cross_entropy
    return torch, linear_cross_entropy, liger_cases.dist_version(cut_cross_entropy,
                                                                 "cut-cross-entropy")


def cases(small: bool) -> list[dict]:
    out = []
    for V in ((1024, 8192) if small else (8192, 32_000)):
        for s in (1.0, 3.0, 10.0):
            for red in ("mean", "sum"):
                for v in VARIANTS:
                    out.append(dict(framework="cce", call_tag="lce", dtype="bf16", layout="nd", C=V,
                                    scale=s, reduction=red, variant=v, target="linear"))
    return out


def draw(V: int, scale: float, seed: int, N: int = 64, D: int = 64):
    """float64 hidden (N, D) with e[:, 0] = 1, classifier (V, D) with the Zipf prior in column 0
    and N(0, s^2 / D) elsewhere, labels drawn from the prior (~15% -100)."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((N, D))
    e[:, 0] = 1.0
    c = rng.standard_normal((V, D)) * (scale / np.sqrt(D - 1))
    c[:, 0] = -ZIPF * np.log1p(np.arange(V))
    p = np.exp(c[:, 0])
    y = rng.choice(V, size=N, p=p / p.sum()).astype(np.int64)
    y[rng.random(N) < 0.15] = -100
    y[0] = max(int(y[0]), 0)  # one label kept at least
    return e, c, y


def compute(outdir: str, small: bool):
    torch, lce, version = load_cce()

    def one(case: dict, seed: int):
        V, s, red = case["C"], case["scale"], case["reduction"]
        e64, c64, y64 = draw(V, s, seed - VARIANT_INDEX[case["variant"]])  # both variants: one draw
        e = torch.from_numpy(e64).to(torch.bfloat16).requires_grad_(True)
        c = torch.from_numpy(c64).to(torch.bfloat16).requires_grad_(True)
        t0 = time.time()
        loss = lce(e, c, torch.from_numpy(y64), impl="cce", reduction=red,
                   filter_eps=VARIANTS[case["variant"]])
        loss.backward()
        seconds = time.time() - t0
        arrays = {"hidden": liger_cases.to_np(e), "weight": liger_cases.to_np(c), "labels": y64,
                  "grad_hidden": liger_cases.to_np(e.grad), "grad_weight": liger_cases.to_np(c.grad)}
        zero_rows = int((~arrays["grad_weight"].any(axis=1)).sum())
        opts = dict(reduction=red, ignore_index=-100, precision="bf16")
        liger_cases.write_linear(outdir, case, arrays, liger_cases.to_np(loss), opts, seed,
                                 dict(cce_version=version, N=e64.shape[0], D=e64.shape[1],
                                      filter_eps=VARIANTS[case["variant"]], zipf=ZIPF,
                                      zero_weight_rows=zero_rows, seconds=round(seconds, 1),
                                      triton_interpret=True, old=False))
    return one


VARIANT_INDEX = {v: i for i, v in enumerate(VARIANTS)}


def main():
    args = common.parse_args("cce_cases.py")
    common.run(cases(args.small), args, compute(args.outdir, args.small))


if __name__ == "__main__":
    main()
