"""The training-code losses of torch_semantic_cases.py compiled by torch.compile (Inductor's
generated CPU code, not PyTorch's eager kernels), for ce-check's options (runs in a venv with
torch + numpy, and a C++ compiler for Inductor).

    python torch_compile_cases.py OUTDIR [--small] [--only SUBSTR]
    python torch_compile_cases.py OUTDIR --check      (ce_cli importable: runs ce-check on them)

Inductor fuses the forward and the backward into its own loops: an online softmax, its own
reduction order and vectorised exp, in float32 (bfloat16 inputs are upcast inside the fused
kernel and each result rounded to bf16 once). Each case is the same code as
torch_semantic_cases.py's (`forward`), or:

- `plain`       F.cross_entropy(x.float(), y) (HF's upcast), mean;
- `smooth_sum`  F.cross_entropy(x.float(), y, label_smoothing=0.1, reduction='sum');
- `weight_ignore` class weights in [0.5, 2] and -100 rows, mean over sum w_y;

wrapped in `torch.compile(dynamic=False)`, in float32 and bfloat16 (saved widened exactly to
float32). `meta.computed_in` is "f32" for the bf16 cases whose code upcasts to float32 before the
loss: those also pass with `precision="f32"` (computed in f32, stored in bf16: ce-check's
--precision f32 on a bf16 gradient). float32 cases hold the planted bugs of
torch_semantic_cases.BUGS, compiled the same way (`grad_bug_<name>`).

`--check` runs `ce_cli.check_grad` on every case on both kernels (default and
CE_CHECK_FUSED=0), with the case's precision and, where `computed_in` says so, f32: false
alarms and missed planted bugs.
fixtures/frameworks_semantics/torch_compile/ (tests/test_torch_compile_real.py) is a subset of
`--small`, without the .json files.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# the variants of torch_semantic_cases.py compiled here, then this script's own
SEMANTIC = ("softcap_hf", "zloss", "smooth_torch_softcap", "combo", "sw_mean", "scale03_float")
OWN = {"plain": ("plain", "mean", "nc"), "smooth_sum": ("smooth", "sum", "nc"),
       "weight_ignore": ("weight", "mean", "nc")}
DTYPES = ("f32", "bf16")
UPCAST = ("softcap_hf", "zloss", "combo", "scale03_float", "plain", "smooth_sum", "weight_ignore")


def cases(small: bool) -> list[dict]:
    import torch_semantic_cases as tsc
    variants = {**{v: tsc.VARIANTS[v] for v in SEMANTIC}, **OWN}
    out = common.semantic_cases("torch_compile", variants, DTYPES, small)
    return [c for c in out if not small or c["scale"] in (1.0, 30.0)]


def forward(case: dict, x, y, w, weight, bug: str = ""):
    """(loss, ce_check options, extra arrays) of the case's code on logits x."""
    import torch.nn.functional as F
    import torch_semantic_cases as tsc
    v, red = case["variant"], case["reduction"]
    if v == "plain":
        return F.cross_entropy(x.float(), y, reduction=red), dict(reduction=red), {}
    if v == "smooth_sum":
        return (F.cross_entropy(x.float(), y, label_smoothing=0.1, reduction=red),
                dict(label_smoothing=0.1, reduction=red), {})
    if v == "weight_ignore":
        return (F.cross_entropy(x.float(), y, weight=weight, reduction=red),
                dict(reduction=red, weight="weight"), {})
    return tsc.forward(case, x, y, w, bug)


def compute(outdir: str, small: bool):
    import torch
    import torch_semantic_cases as tsc
    from torch_binary_cases import to_np

    def one(case: dict, seed: int):
        torch.manual_seed(seed)
        z64, y64, w64 = tsc.draw(case, small, seed)
        dt = tsc.TDT[case["dtype"]]
        x = torch.from_numpy(z64).to(dt).requires_grad_(True)
        y, w = torch.from_numpy(y64), torch.from_numpy(w64).to(dt)
        cw = torch.from_numpy(np.random.default_rng(seed).uniform(0.5, 2.0, z64.shape[-1])).float()
        _loss, opts, extra = forward(case, x.detach(), y, w, cw)  # eager: the options only

        def grad_of(bug: str = ""):
            torch._dynamo.reset()  # each case compiled afresh (no recompile limit, no eager fallback)
            xb = x.detach().clone().requires_grad_(True)
            fn = torch.compile(lambda a: forward(case, a, y, w, cw, bug)[0], dynamic=False)
            loss = fn(xb)
            loss.backward()
            return loss, xb.grad

        loss, grad = grad_of()
        for bug in tsc.BUGS.get(case["variant"], ()) if case["dtype"] == "f32" else ():
            extra["grad_bug_" + bug] = grad_of(bug)[1]
        arrays = {k: to_np(t).astype(np.float64 if k == "sample_weight" else np.float32)
                  for k, t in extra.items()}
        if "weight" in opts:
            arrays["weight"] = cw.numpy().astype(np.float64)
        ce_check = dict(opts, precision=case["dtype"], ignore_index=-100,
                        **{k: k for k in arrays if not k.startswith("grad_bug_")})
        computed = "f32" if case["variant"] in UPCAST or case["dtype"] == "f32" else case["dtype"]
        common.write_case(
            outdir, case, logits=to_np(x).astype(np.float32), labels=y64,
            grad=to_np(grad).astype(np.float32), loss=to_np(loss).astype(np.float32), axis=-1,
            precision=case["dtype"], seed=seed, arrays_extra=arrays, ce_check=ce_check,
            meta_extra=dict(version=torch.__version__, shape=list(z64.shape), computed_in=computed,
                            compiled="torch.compile(dynamic=False), inductor CPU"))
    return one


def load(path: str) -> tuple[dict, dict]:
    """(arrays, meta) of one case."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != "meta"}
        meta = json.loads(str(f["meta"][0]))
    return arrays, meta


def check_case(arrays: dict, meta: dict, precision: str, grad_key: str = "grad", **settings):
    """ce-check's report on one case (`settings`: more check_grad settings), the bf16 gradient
    passed as stored bf16."""
    import ce_cli
    from ce_cli.io.bfloat16 import widen_bfloat16
    opts = dict(meta["ce_check"], precision=precision, **settings)
    named = {k: arrays[v] for k, v in opts.items() if isinstance(v, str) and v in arrays}
    opts = {k: v for k, v in opts.items() if k not in named}
    grad = arrays[grad_key]
    if meta["dtype"] == "bf16":
        grad = widen_bfloat16((grad.view(np.uint32) >> 16).astype(np.uint16))
    return ce_cli.check_grad(arrays["logits"], arrays["labels"], grad=grad,
                             loss=arrays["loss"], **named, **opts)


def check(outdir: str) -> int:
    """False alarms and missed planted bugs over the cases in `outdir`, on this process's kernel."""
    alarms, missed, runs, bugs = [], [], 0, 0
    for path in sorted(glob.glob(os.path.join(outdir, "*.npz"))):
        arrays, meta = load(path)
        precisions = {meta["dtype"], meta["computed_in"]}
        for p in sorted(precisions):
            runs += 1
            rep = check_case(arrays, meta, p)
            if not rep.ok:
                alarms.append((os.path.basename(path), p,
                               [(c.name, c.mismatches) for c in rep.checks if not c.ok]))
        for key in (k for k in arrays if k.startswith("grad_bug_")):
            bugs += 1
            if check_case(arrays, meta, meta["dtype"], key).ok:
                missed.append((os.path.basename(path), key))
    return common.check_summary(f"{runs} checks", alarms, bugs, missed)


def main():
    if "--check" in sys.argv:
        sys.exit(common.on_both_kernels(__file__, sys.argv[1:], lambda: check(sys.argv[1])))
    args = common.parse_args("torch_compile_cases.py")
    common.run(cases(args.small), args, compute(args.outdir, args.small))


if __name__ == "__main__":
    main()
