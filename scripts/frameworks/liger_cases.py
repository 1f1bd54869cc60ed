"""Liger-Kernel's real Triton kernels on CPU (Triton's interpreter), for ce-check's options
(runs in a venv with torch, triton, liger-kernel and numpy).

    python liger_cases.py OUTDIR [--small] [--only SUBSTR] [--linear | --ce] [--old]
                          [--fixtures] [--raw-bf16]
    python liger_cases.py OUTDIR --check

TRITON_INTERPRET=1 runs the kernels' Python bodies on numpy arrays: the same float32 online
softmax, recomputed true class and in-place gradient as on a GPU, with numpy's float32 exp2,
log and tanh in place of the GPU's approximations. What the interpreter lacks is supplied as
the compiled kernel has it (`triton_interpreter`): a Python float argument (`softcap`,
`weight_sum`) is an fp32 scalar (the compiled kernel's signature type; the interpreter passes a
Python float, which has no `.to`); libdevice's `tanh` (not interpreted: it returns None) is
numpy's float32 tanh; bf16 is rounded to nearest and computed in float32 (`bf16_as_compiled`;
`--raw-bf16`: the interpreter's own, truncating and mis-scaling float32 subnormals).

`LigerCrossEntropyLoss` (`ce` cases, 2-D (BT, V) logits, ~15% of the labels -100):

- `plain`, `sum`: reduction mean / sum;
- `none`: reduction none, backward of a random upstream vector g (zeros included) -> reduction
  sum with sample_weight g (the rows' losses are also kept as `loss_rows`, checked with
  reduction none);
- `smooth` label_smoothing 0.1; `softcap` 30; `zloss` lse_square_scale 1e-4 with return_z_loss
  (-> z_loss, z_loss_value); `weight` class weights in [0.5, 2]; `weight_smooth`; `combo`
  softcap + z-loss + smoothing; `none_combo` the combo with reduction none;
- `weight_zloss`: Liger's mean divides the z-loss by the non-ignored count and the cross-entropy
  by the weights' sum Σ w_y, which ce-check (both by Σ w_y) expresses as z_loss = 1e-4 Σ w_y / n.

`LigerFusedLinearCrossEntropyLoss` (`flce` cases, for `check_linear`): hidden (N, H), weight
(V, H), optional bias, logits std about s; `plain`, `sum`, `none` (upstream g), `bias`,
`smooth`, `softcap`, `zloss`, `weight`, `combo`; .npz arrays `hidden`, `weight`, `labels`,
`grad_hidden`, `grad_weight`, `loss`, optional `bias`, `grad_bias`, `class_weight`,
`sample_weight`.

float32 cases hold planted bugs: the real kernel's output with one argument changed while the
options stay (`nozloss`: lse_square_scale 0, `nosmooth`, `noweight`, `g0`: every row's upstream
gradient g[0], Liger < 0.5.10's reduction='none' backward), or `nocap` (the gradient divided by
the softcap's 1 - tanh^2 in float32). CE: `grad_bug_<name>`; FLCE: `bug_<name>_grad_<side>`.

With an older liger-kernel on PYTHONPATH (`pip install --no-deps --target DIR
liger-kernel==0.5.8`), `--old` writes the reduction='none' cases only, meta `liger_version`
naming it: 0.5.8's LigerCrossEntropyLoss and 0.8.1's FLCE scale every row by g[0]
(linkedin/Liger-Kernel#678, #968; fixed in 0.5.10 and 0.8.2).

`--check` runs ce-check (ce_cli importable) on every case written in OUTDIR instead: false
alarms on the correct gradients, planted bugs missed.

dtypes f32 and bf16 (bf16 saved widened exactly to float32); logit std 1, 10, 30, 50; C 10, 1000,
32000 (full: also 128,256); at most 2^17 logits per case (--small: 2^14), at least 8 rows.
fixtures/frameworks_semantics/liger/ (tests/test_liger_real.py): `--small --fixtures` and the
old versions' `--small --old --fixtures`, without the .json files (`fixture_keep`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import SEM_CAP as CAP, SEM_EPS_LS as EPS_LS, SEM_ZETA as ZETA  # noqa: E402

# variant -> (family, reduction, layout); the Liger arguments follow from the name
VARIANTS = {
    "plain": ("ce", "mean", "nc"), "sum": ("ce", "sum", "nc"), "none": ("ce", "none", "nc"),
    "smooth": ("ce", "mean", "nc"), "softcap": ("ce", "mean", "nc"),
    "zloss": ("ce", "mean", "nc"), "weight": ("ce", "mean", "nc"),
    "weight_smooth": ("ce", "sum", "nc"), "combo": ("ce", "mean", "nc"),
    "none_combo": ("ce", "none", "nc"), "weight_zloss": ("ce", "mean", "nc"),
}
BIG_VOCAB = {v: (128_256,) for v in ("plain", "none", "combo", "weight_smooth")}
LINEAR = {
    "plain": "mean", "sum": "sum", "none": "none", "bias": "mean", "smooth": "mean",
    "softcap": "mean", "zloss": "mean", "weight": "mean", "combo": "sum",
}
LIN_CLASSES = (1000, 32_000)
LIN_SCALES = (1.0, 10.0, 30.0)
LIN_SMALL = (16, 32, 256)  # N, H, V of --small
LIN_FULL = (128, 128)


def fixture_keep(c: dict) -> bool:
    """The committed subset (with --small; about 3 MB): CE at C = 10 (std 1, 30, 50 in float32,
    1 and 30 in bf16), the two combos at C = 1,000 std 30 in float32; FLCE at std 10 (bf16:
    plain, none, zloss, combo); the old versions' C = 10 std 1 (g[0] = 0) and 30, FLCE std 1
    and 10; the weighted z-loss at C = 10 std 30 in float32."""
    v, s, f32, old = c["variant"], c["scale"], c["dtype"] == "f32", "old" in c["call_tag"]
    if v == "weight_zloss":
        return c["C"] == 10 and s == 30.0 and f32
    if c["call_tag"].startswith("flce"):
        return s in (1.0, 10.0) if old else s == 10.0 and (f32 or v in ("plain", "none", "zloss", "combo"))
    if c["C"] == 10:
        return s in ((1.0, 30.0) if old or not f32 else (1.0, 30.0, 50.0))
    return c["C"] == 1000 and s == 30.0 and f32 and not old and v in ("combo", "none_combo")


_LOADED: tuple = ()
RAW_BF16 = False  # --raw-bf16: the interpreter's own bfloat16 conversions and arithmetic


def triton_interpreter():
    """torch, with Triton's interpreter on (TRITON_INTERPRET=1) and completed as the compiled
    kernel has it: a Python float argument is an fp32 scalar, bf16 as `bf16_as_compiled`."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton.language as tl
    from triton.runtime import interpreter as interp

    if getattr(interp, "_ce_check_completed", False):
        return torch
    base_cvt = interp._implicit_cvt

    def cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32),
                             tl.float32)
        return base_cvt(arg)

    interp._implicit_cvt = cvt
    if not RAW_BF16:
        bf16_as_compiled(torch, tl, interp)
    interp._ce_check_completed = True
    return torch


def numpy_elementwise(f):
    """A libdevice function (not interpreted: it returns None) as numpy's, in the argument's
    float32."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    def g(x):
        d = x.handle.data
        return tl.tensor(interp.TensorHandle(f(d).astype(d.dtype), x.handle.dtype.scalar), x.type)
    return g


def interpreted():
    """(torch, LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss, version) under Triton's
    interpreter (`triton_interpreter`), libdevice's tanh as numpy's float32 tanh."""
    global _LOADED
    if _LOADED:
        return _LOADED
    import importlib
    torch = triton_interpreter()
    import liger_kernel
    for name in ("liger_kernel.ops.cross_entropy", "liger_kernel.ops.fused_linear_cross_entropy"):
        mod = importlib.import_module(name)
        if hasattr(mod, "tanh"):
            mod.tanh = numpy_elementwise(np.tanh)
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    _LOADED = (torch, LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss,
               dist_version(liger_kernel, "liger-kernel"))
    return _LOADED


def dist_version(module, dist: str) -> str:
    version = getattr(module, "__version__", None)
    if version is None:
        from importlib.metadata import version as metadata_version
        try:
            version = metadata_version(dist)
        except Exception:  # a --target install may have no metadata on the path's front
            version = "unknown"
    return version


def bf16_as_compiled(torch, tl, interp) -> None:
    """bfloat16 as the compiled kernel has it. The interpreter (Triton 3.9) stores bf16 as uint16
    and (1) converts float32 -> bf16 by truncation, with float32 subnormals mis-scaled (3.6e-43
    becomes 1.17e-38), where the GPU's cvt.rn.bf16.f32 rounds to nearest even; (2) applies
    arithmetic and tl.dot to the uint16 bits (bf16 * bf16 is an integer product), where the GPU
    computes in float32 and rounds (a dot accumulates in float32). Here: exact widening,
    rounding to nearest even, float32 arithmetic."""
    base_cast, base_binary = interp.InterpreterBuilder.cast_impl, interp.InterpreterBuilder.binary_op

    def narrow(a: np.ndarray) -> np.ndarray:
        bf = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)
        return bf.view(torch.int16).numpy().view(np.uint16)

    def widen(a: np.ndarray) -> np.ndarray:
        return (np.asarray(a).astype(np.uint32) << np.uint32(16)).view(np.float32)

    def cast_impl(self, src, dst_type):
        a, b = src.dtype.scalar, dst_type.scalar
        if a == tl.float32 and b == tl.bfloat16:
            return interp.TensorHandle(narrow(src.data), b)
        if a == tl.bfloat16 and b == tl.float32:
            return interp.TensorHandle(widen(src.data), b)
        return base_cast(self, src, dst_type)

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar != tl.bfloat16 or rhs.dtype.scalar != tl.bfloat16:
            return base_binary(self, lhs, rhs, op)
        out = op(widen(lhs.data), widen(rhs.data))
        return interp.TensorHandle(narrow(out) if out.dtype == np.float32 else out, tl.bfloat16)

    def unary_op(self, arg, op):
        if arg.dtype.scalar != tl.bfloat16:
            return base_unary(self, arg, op)
        out = op(widen(arg.data))
        return interp.TensorHandle(narrow(out) if out.dtype == np.float32 else out, tl.bfloat16)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return base_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        wa = widen(a.data) if a.dtype.scalar == tl.bfloat16 else a.data
        wb = widen(b.data) if b.dtype.scalar == tl.bfloat16 else b.data
        return interp.TensorHandle(np.matmul(wa, wb, dtype=d.data.dtype) + d.data, d.dtype.scalar)

    base_unary, base_dot = interp.InterpreterBuilder.unary_op, interp.InterpreterBuilder.create_dot
    interp.InterpreterBuilder.cast_impl = cast_impl
    interp.InterpreterBuilder.binary_op = binary_op
    interp.InterpreterBuilder.unary_op = unary_op
    interp.InterpreterBuilder.create_dot = create_dot


def to_np(t) -> np.ndarray:
    """Detached, bf16 exactly widened to float32."""
    t = t.detach()
    if t.dtype != t.float().dtype and t.dtype.itemsize == 2:
        t = t.float()
    return t.numpy().copy()


def liger_args(v: str, red: str, weight, bug: str = "") -> dict:
    """LigerCrossEntropyLoss's / FLCE's keyword arguments of variant `v` (`bug` changes one)."""
    combo = "combo" in v
    kw = dict(reduction=red, ignore_index=-100,
              label_smoothing=EPS_LS if ("smooth" in v or combo) and bug != "nosmooth" else 0.0,
              lse_square_scale=ZETA if ("zloss" in v or combo) and bug != "nozloss" else 0.0,
              softcap=CAP if ("softcap" in v or combo) else None,
              return_z_loss=bool("zloss" in v or combo))
    if "weight" in v and bug != "noweight":
        kw["weight"] = weight
    return kw


def ce_check_options(v: str, red: str, dtype: str) -> dict:
    combo = "combo" in v
    opts = dict(reduction="sum" if red == "none" else red, ignore_index=-100, precision=dtype,
                label_smoothing=EPS_LS if "smooth" in v or combo else 0.0)
    if "softcap" in v or combo:
        opts["softcap"] = CAP
    if "zloss" in v or combo:
        opts["z_loss"] = ZETA
    if "weight" in v:
        opts["weight"] = "weight"
    if red == "none":
        opts["sample_weight"] = "sample_weight"
    return opts


def bugs_of(v: str) -> tuple[str, ...]:
    combo = "combo" in v
    out = []
    if "zloss" in v or combo:
        out.append("nozloss")
    if "smooth" in v or combo:
        out.append("nosmooth")
    if "softcap" in v or combo:
        out.append("nocap")
    if "weight" in v:
        out.append("noweight")
    if "none" in v:
        out.append("g0")
    return tuple(out)


def draw(shape: tuple[int, int], scale: float, seed: int):
    """float64 logits (std = scale), labels with ~15% -100 (never the first or last row),
    class weights in [0.5, 2], an upstream vector (zeros included)."""
    rng = np.random.default_rng(seed)
    R, C = shape
    z = rng.standard_normal(shape) * scale
    y = rng.integers(0, C, size=R, dtype=np.int64)
    mask = rng.random(R) < 0.15
    mask[0] = mask[-1] = False
    y[mask] = -100
    w = rng.uniform(0.5, 2.0, size=C)
    g = rng.uniform(0.0, 2.0, size=R)
    g[rng.random(R) < 0.2] = 0.0
    g[0] = 1.5
    return z, y, w, g, rng


def ce_shape(C: int, small: bool) -> tuple[int, int]:
    return (max(8, min(256, (1 << (14 if small else 17)) // C)), C)


def unpack(out):
    """(loss, z_loss or None): a CrossEntropyOutput, an older version's (loss, z_loss) tuple, or
    the loss alone."""
    if hasattr(out, "loss"):
        return out.loss, out.z_loss
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def ce_run(torch, Loss, x0, y, w, g, v: str, red: str, bug: str = ""):
    """(loss, loss rows or None, z_loss or None, grad) of LigerCrossEntropyLoss on a copy of x0
    (Liger writes the gradient into its input)."""
    x = x0.clone().requires_grad_(True)
    out = Loss(**liger_args(v, red, w, bug))(x, y)
    loss, z = unpack(out)
    if red == "none":
        up = torch.full_like(g, float(g[0])) if bug == "g0" else g
        loss.backward(up)
        total = (loss * g).sum()
        return total, loss, z, x.grad
    loss.backward()
    return loss, None, z, x.grad


def ce_compute(outdir: str, small: bool, version: str, old: bool):
    torch, Loss, _, _ = interpreted()
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}

    def one(case: dict, seed: int):
        v, red, dt = case["variant"], case["reduction"], case["dtype"]
        z64, y64, w64, g64, _ = draw(ce_shape(case["C"], small), case["scale"], seed)
        if old and case["scale"] == 1.0:
            g64[0] = 0.0  # #678: the first token masked out zeroes every row's gradient
        x0 = torch.from_numpy(z64).to(tdt[dt])
        y = torch.from_numpy(y64)
        w = torch.from_numpy(w64).float()
        g = torch.from_numpy(g64).to(tdt[dt])
        loss, rows, zl, grad = ce_run(torch, Loss, x0, y, w, g, v, red)
        arrays = {}
        opts = ce_check_options(v, red, dt)
        if red == "none":
            arrays["sample_weight"] = to_np(g).astype(np.float64)
            arrays["loss_rows"] = to_np(rows)
        if zl is not None:
            arrays["z_loss_rows" if red == "none" else "z_loss_value"] = to_np(zl)
            if red != "none":
                opts["z_loss_value"] = "z_loss_value"
        if "weight" in v:
            arrays["weight"] = w64.astype(np.float32).astype(np.float64)
            if "z_loss" in opts and red == "mean":  # Liger: the z-loss over the count, not Σ w_y
                keep = y64 != -100
                opts["z_loss"] = ZETA * float(arrays["weight"][y64[keep]].sum() / keep.sum())
        for bug in bugs_of(v) if dt == "f32" and not old else ():
            if bug == "nocap":
                t = torch.tanh(x0.float() / CAP)
                arrays["grad_bug_nocap"] = to_np(grad / (1 - t * t))
            else:
                arrays["grad_bug_" + bug] = to_np(ce_run(torch, Loss, x0, y, w, g, v, red, bug)[3])
        weight = arrays.pop("weight", None)
        meta = dict(liger_version=version, shape=list(z64.shape), kernel="LigerCrossEntropyLoss",
                    triton_interpret=True, old=old)
        common.write_case(outdir, case, logits=to_np(x0), labels=y64, grad=to_np(grad), loss=to_np(loss), weight=weight, axis=-1,
            precision=dt, seed=seed, arrays_extra=arrays, ce_check=opts, meta_extra=meta)
    return one


def lin_cases(small: bool) -> list[dict]:
    out = []
    for v, red in LINEAR.items():
        for dt in ("f32", "bf16"):
            for C in LIN_SMALL[2:] if small else LIN_CLASSES:
                for s in LIN_SCALES:
                    out.append(dict(framework="liger", call_tag="flce", dtype=dt, layout="nh", C=C,
                                    scale=s, reduction=red, variant=v, target="linear"))
    return out


def lin_run(torch, Loss, t: dict, y, w, g, v: str, red: str, bug: str = ""):
    """(loss, z_loss, grads dict) of LigerFusedLinearCrossEntropyLoss on fresh leaves of `t`."""
    kw = liger_args(v, red, w, bug)
    kw["ce_weight"] = kw.pop("weight", None)
    leaves = {k: a.clone().requires_grad_(True) for k, a in t.items()}
    out = Loss(**kw)(leaves["weight"], leaves["hidden"], y, leaves.get("bias"))
    loss, zl = unpack(out)
    if red == "none":
        loss.backward(torch.full_like(g, float(g[0])) if bug == "g0" else g)
        loss = (loss * g).sum()
    else:
        loss.backward()
    return loss, zl, {"grad_" + k: a.grad for k, a in leaves.items()}


def lin_compute(outdir: str, small: bool, version: str, old: bool):
    torch, _, Loss, _ = interpreted()
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}

    def one(case: dict, seed: int):
        v, red, dt, V, s = case["variant"], case["reduction"], case["dtype"], case["C"], case["scale"]
        N, H = LIN_SMALL[:2] if small else LIN_FULL
        rng = np.random.default_rng(seed)
        h64 = rng.standard_normal((N, H))
        W64 = rng.standard_normal((V, H)) * (s / np.sqrt(H))
        _, y64, w64, g64, _ = draw((N, V), 1.0, seed + 1)
        if old and s == 1.0:
            g64[0] = 0.0  # #968: grad 0 when the first token is masked out
        t = {"hidden": torch.from_numpy(h64).to(tdt[dt]), "weight": torch.from_numpy(W64).to(tdt[dt])}
        if v in ("bias", "combo"):
            t["bias"] = torch.from_numpy(rng.standard_normal(V) * s * 0.1).to(tdt[dt])
        y = torch.from_numpy(y64)
        w = torch.from_numpy(w64).float()
        g = torch.from_numpy(g64).to(tdt[dt])
        loss, _, grads = lin_run(torch, Loss, t, y, w, g, v, red)
        opts = ce_check_options(v, red, dt)
        opts.pop("weight", None)
        arrays = {k: to_np(a) for k, a in t.items()}
        arrays["labels"] = y64
        arrays.update({k: to_np(a) for k, a in grads.items()})
        if "weight" in v:
            arrays["class_weight"] = w64.astype(np.float32).astype(np.float64)
            opts["class_weight"] = "class_weight"
        if red == "none":
            arrays["sample_weight"] = to_np(g).astype(np.float64)
        for bug in bugs_of(v) if dt == "f32" and not old else ():
            if bug == "nocap":
                continue  # the cap's derivative sits inside the kernel, before the products
            bg = lin_run(torch, Loss, t, y, w, g, v, red, bug)[2]
            arrays.update({f"bug_{bug}_{k}": to_np(a) for k, a in bg.items()})
        write_linear(outdir, case, arrays, to_np(loss), opts, seed,
                     dict(liger_version=version, N=N, H=H, kernel="LigerFusedLinearCrossEntropyLoss",
                          triton_interpret=True, old=old))
    return one


def write_linear(outdir: str, case: dict, arrays: dict, loss, opts: dict, seed: int, extra: dict):
    name = common.case_name(case)
    meta = dict(case, seed=seed, ce_check=opts, **extra)
    np.savez_compressed(os.path.join(outdir, name + ".npz"), loss=loss,
                        meta=np.array([json.dumps(meta)]), **arrays)
    with open(os.path.join(outdir, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


# ---- --check: ce-check on every case of OUTDIR ----

def load(path: str) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as d:
        arr = {k: d[k] for k in d.files}
    return arr, json.loads(str(arr.pop("meta").reshape(-1)[0]))


def check(arr: dict, meta: dict, grads: dict | None = None, loss: bool = True):
    """ce-check's report on the case (its own gradients, or `grads`)."""
    import ce_cli
    opts = dict(meta["ce_check"])
    named = {k: arr[opts.pop(k)] for k in ("sample_weight", "class_weight", "z_loss_value")
             if isinstance(opts.get(k), str)}
    if isinstance(opts.get("weight"), str):
        named["weight"] = arr[opts.pop("weight")]
    if not loss:
        named.pop("z_loss_value", None)
    if meta.get("target") == "linear":
        g = grads or {k: arr[k] for k in ("grad_hidden", "grad_weight", "grad_bias") if k in arr}
        return ce_cli.check_linear(arr["hidden"], arr["weight"], arr["labels"], bias=arr.get("bias"),
                                   loss=arr["loss"] if loss else None, **g, **named, **opts)
    grad = arr["grad"] if grads is None else grads["grad"]
    return ce_cli.check_grad(arr["logits"], arr["labels"], grad=grad,
                             loss=arr["loss"] if loss else None, **named, **opts)


def check_rows(arr: dict, meta: dict):
    """reduction='none' cases: ce-check's report on the kernel's per-row losses (reduction
    none, no gradient), or None."""
    if "loss_rows" not in arr:
        return None
    import ce_cli
    opts = {k: v for k, v in meta["ce_check"].items() if k not in ("sample_weight", "weight")}
    opts["reduction"] = "none"
    return ce_cli.check_grad(arr["logits"], arr["labels"], loss=arr["loss_rows"],
                             weight=arr.get("weight"), **opts)


def planted(arr: dict, meta: dict) -> dict:
    """{bug: gradients}: the planted bugs' arrays of a case."""
    out = {}
    for k in arr:
        if k.startswith("grad_bug_"):
            out[k[9:]] = {"grad": arr[k]}
        elif k.startswith("bug_"):
            bug, side = k[4:].split("_grad_")
            out.setdefault(bug, {})["grad_" + side] = arr[k]
    return out


def sweep(outdir: str) -> None:
    import glob
    n = fa = bugs = missed = caught = old = 0
    for p in sorted(glob.glob(os.path.join(outdir, "*.npz"))):
        arr, meta = load(p)
        name = os.path.basename(p)[:-4]
        n += 1
        r = check(arr, meta)
        bad = [(c.name, c.note[:160]) for c in r.checks if not c.ok]
        rows = check_rows(arr, meta)
        bad += [("rows:" + c.name, c.note[:160]) for c in rows.checks if not c.ok] if rows else []
        if meta.get("old"):
            old += 1
            caught += bool(bad)
            print("OLD BUG " + ("CAUGHT" if bad else "MISSED"), name, bad, flush=True)
            continue
        if bad:
            fa += 1
            print("FALSE ALARM", name, bad, flush=True)
        for bug, g in planted(arr, meta).items():
            bugs += 1
            if check(arr, meta, grads=g, loss=False).ok:
                missed += 1
                print("MISSED", bug, name, flush=True)
    print(f"cases {n} false alarms {fa} planted bugs {bugs} missed {missed}"
          f" old-version bugs caught {caught} of {old}")


def main():
    if "--check" in sys.argv:
        sys.argv.remove("--check")
        sweep(sys.argv[1])
        return
    which = "both"
    for flag in ("--linear", "--ce"):
        if flag in sys.argv:
            sys.argv.remove(flag)
            which = flag[2:]
    old = "--old" in sys.argv
    if old:
        sys.argv.remove("--old")
    global RAW_BF16
    RAW_BF16 = "--raw-bf16" in sys.argv
    if RAW_BF16:
        sys.argv.remove("--raw-bf16")
    fixtures = "--fixtures" in sys.argv
    if fixtures:
        sys.argv.remove("--fixtures")
    args = common.parse_args("liger_cases.py")
    keep = fixture_keep if fixtures else None
    version = interpreted()[3]
    if which in ("both", "ce"):
        cs = common.semantic_cases("liger", VARIANTS, ("f32", "bf16"), args.small, BIG_VOCAB)
        if old:
            cs = [dict(c, call_tag="old" + version.replace(".", "")) for c in cs
                  if c["reduction"] == "none"]
        common.run(cs, args, ce_compute(args.outdir, args.small, version, old), keep)
    if which in ("both", "linear"):
        cs = lin_cases(args.small)
        if old:
            cs = [dict(c, call_tag="flceold" + version.replace(".", "")) for c in cs
                  if c["reduction"] == "none"]
        common.run(cs, args, lin_compute(args.outdir, args.small, version, old), keep)


if __name__ == "__main__":
    main()
