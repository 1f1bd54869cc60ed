"""Liger-Kernel 0.8.1's Ascend NPU cross-entropy (`liger_kernel/ops/backends/_ascend`) on CPU
under Triton's interpreter: the released true-class gradient that PR #1341 ("[NPU] Fix:
recompute true-class CE gradient in fp32 on no-weight backward path") fixed.

    PYTHONPATH=DIR ASCEND_UB_CAPACITY_BITS=1572864 python liger_ascend_cases.py OUTDIR
    python liger_cases.py OUTDIR --check

(DIR: `pip install --no-deps --target DIR liger-kernel==0.8.1`; the capacity stands in for the
NPU's unified buffer size, which only sets block sizes.) Its no-weight backward stores
exp(x - lse) * scale in the logits' dtype, then reads the label's entry back and subtracts the
scale: in bf16, p_y is rounded before 1 is taken off, so a confident token's true-class
gradient (1 - p_y small) loses its significant bits. Completing the interpreter as
liger_cases.py does, plus: `triton.language.math.tanh` (gone from Triton 3.9, imported by the
module) and a loop induction variable that is an i32 scalar, as compiled, not a Python int.

Cases: 64 x 1,000 logits, std 3, each row's label its argmax pushed up by 2..12 (p_y from about
0.9 to 1 - 1e-5), one row -100; float32 and bf16, reduction mean; meta `old` (the sweep reports
whether ce-check catches it).
"""

from __future__ import annotations

import builtins
import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import liger_cases  # noqa: E402


def ascend_function():
    """(torch, the Ascend backend's LigerCrossEntropyFunction, version)."""
    torch = liger_cases.triton_interpreter()
    import liger_kernel
    import triton.language as tl
    import triton.language.math as tl_math
    from triton.runtime import interpreter as interp

    tl_math.tanh = liger_cases.numpy_elementwise(np.tanh)
    mod = importlib.import_module("liger_kernel.ops.backends._ascend.ops.cross_entropy")
    mod.tanh = tl_math.tanh

    def tl_range(*args):
        for i in builtins.range(*[int(a) for a in args]):
            yield tl.tensor(interp.TensorHandle(np.array([i], dtype=np.int32), tl.int32), tl.int32)

    mod.range = tl_range
    return torch, mod.LigerCrossEntropyFunction, liger_cases.dist_version(liger_kernel, "liger-kernel")


def main():
    args = common.parse_args("liger_ascend_cases.py")
    torch, fn, version = ascend_function()
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}
    cases = [dict(framework="liger", call_tag="ascend" + version.replace(".", ""), dtype=dt,
                  layout="nc", C=1000, scale=3.0, reduction="mean", variant="confident",
                  target="index") for dt in tdt]

    def one(case: dict, seed: int):
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((64, 1000)) * case["scale"]
        y = z.argmax(axis=1)
        z[np.arange(64), y] += np.linspace(2.0, 12.0, 64)
        y[3] = -100
        x = torch.from_numpy(z).to(tdt[case["dtype"]]).requires_grad_(True)
        x0 = x.detach().clone()
        loss = fn.apply(x, torch.from_numpy(y), None, -100, 0.0, 0.0, "mean", None, False)[0]
        loss.backward()
        common.write_case(args.outdir, case, logits=liger_cases.to_np(x0), labels=y,
                          grad=liger_cases.to_np(x.grad), loss=liger_cases.to_np(loss), axis=-1,
                          precision=case["dtype"], seed=seed,
                          ce_check=dict(reduction="mean", ignore_index=-100, precision=case["dtype"]),
                          meta_extra=dict(liger_version=version, kernel="ascend LigerCrossEntropyFunction",
                                          triton_interpret=True, old=True))
    common.run(cases, args, one)


if __name__ == "__main__":
    main()
