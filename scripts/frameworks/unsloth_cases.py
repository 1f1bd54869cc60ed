"""Unsloth's real Triton cross-entropy on CPU (Triton's interpreter), for ce-check's options
(runs in a venv with torch, triton and numpy; the Unsloth wheel is read, never installed).

    python unsloth_cases.py OUTDIR --wheel unsloth-2026.10.9-py3-none-any.whl [--small]
                            [--only SUBSTR] [--fixtures] [--old]
    python unsloth_cases.py OUTDIR --check

`fast_cross_entropy_loss` (unsloth/kernels/cross_entropy_loss.py) is loaded on its own from the
wheel: Unsloth's package __init__ needs a GPU, so the kernel module runs with small stand-ins for
what it imports (`stubs`): `calculate_settings` and `MAX_FUSED_SIZE` are the wheel's own (read
from its kernels/utils.py), libdevice's tanh is numpy's float32 tanh (the interpreter returns
None for it), `tl.cast` is looked up when called (the interpreter patches `tl` while a kernel
runs), no device context, no eviction hints. Triton's interpreter is completed as for Liger
(`liger_cases.triton_interpreter`: a Python float argument is an fp32 scalar, bf16 rounded to
nearest and computed in float32).

What Unsloth computes, and the ce-check options that express it:

- per token `lse - z_y` of the transformed logits (`logit_scaling` s: z <- s z, then
  `logit_softcapping` t: z <- t tanh(z / t); the backward multiplies by s and 1 - tanh^2), 0 on
  labels -100; float32 inside, the gradient stored in the logits' dtype;
- vocabularies above 65,536 (MAX_FUSED_SIZE) in 65,536-wide chunks, each chunk's lse merged by
  torch.logsumexp;
- the reduction: `losses.sum() / n_items`, n_items the count of labels != -100 by default
  (-> reduction mean, ignore_index -100), or the caller's `n_items` (HF num_items_in_batch,
  gradient accumulation: -> reduction sum, denominator n_items).

Cases (logits (2, T, V), labels (2, T), ~15 % -100): `plain`; `softcap` 30; `scale` 0.0625
(Cohere); `scale1` (scaling on, factor 1); `combo` softcap 30 and scale 0.0625; `nitems` (n_items
= 3 x the batch's count, as in 3 accumulation steps); float32, float16, bfloat16; logit std 1,
10, 30; V 10, 1,000, 32,000 and (full mode) 128,256 for plain, softcap, combo, nitems (the
chunked path; --small: V 70,000, two chunks, one token); at most 2^17 logits per case (--small:
2^14). Half the labels are the row's largest logit (confident tokens, as a trained model's).

float32 cases hold planted bugs `grad_bug_<name>`: the real kernel with one line changed
(`PATCHES`): `nocap` the softcap's derivative 1 - tanh^2 dropped, `noscale` the scaling's factor
dropped from the backward, `chunklabel` the label's chunk lse without the label's own term,
`chunkdrop` the merge keeps only the first chunk's lse; or one argument: `noitems` n_items not
passed (the batch's own count instead of the accumulation's).

`--old`: another release's kernel (its wheel), the released bugs (`OLD_CASES`, meta `old`).

`--check` runs ce_cli.check_grad on every case in OUTDIR on both ce-check kernels (default and
CE_CHECK_FUSED=0): false alarms, planted bugs missed, old releases' bugs caught.
fixtures/frameworks_semantics/unsloth/ (tests/test_unsloth_real.py): `--small --fixtures` and the
old releases' `--old --fixtures`, without the .json files.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import json
import linecache
import logging
import os
import re
import sys
import types
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import liger_cases  # noqa: E402  (the interpreter's completion, shared with Liger's sweep)
from common import SEM_CAP as CAP, SEM_ZETA as ZETA  # noqa: E402

KERNEL = "unsloth/kernels/cross_entropy_loss.py"
UTILS = "unsloth/kernels/utils.py"
SCALE = 0.0625          # Cohere's logit_scale
ACCUM = 3               # n_items = ACCUM x the batch's count (`nitems`)
DTYPES = ("f32", "f16", "bf16")
SCALES = (1.0, 10.0, 30.0)
CLASSES = (10, 1000, 32_000)
BIG = 128_256
SMALL_BIG = 70_000      # --small's chunked case: two chunks, the second 4,464 wide
# variant -> (logit_softcapping, logit_scaling, n_items given)
VARIANTS = {
    "plain": (0, 0, False), "softcap": (CAP, 0, False), "scale": (0, SCALE, False),
    "scale1": (0, 1.0, False), "combo": (CAP, SCALE, False), "nitems": (0, 0, True),
}
BIG_VARIANTS = ("plain", "softcap", "combo", "nitems")
# planted bugs: one line of the real kernel changed (old -> new, each must occur once)
PATCHES = {
    "nocap": ("y = y * (1.0 - partial * partial)", "y = y"),
    "noscale": ("y = y * LOGIT_SCALE", "y = y"),
    "chunklabel": ("logsumexp = c + tl.log(sum_others + tl.exp(x_label - c))",
                   "logsumexp = logsumexp_others"),
    "chunkdrop": ("logsumexp = torch.logsumexp(logsumexp, dim = 1)",
                  "logsumexp = torch.logsumexp(logsumexp[:, :1], dim = 1)"),
}


# ---- loading one kernel module from a wheel ----

def wheel_sources(wheel: str) -> tuple[str, str, str]:
    """(cross_entropy_loss.py, kernels/utils.py, version) of an Unsloth wheel."""
    with zipfile.ZipFile(wheel) as z:
        ce, utils = z.read(KERNEL).decode(), z.read(UTILS).decode()
    m = re.search(r"unsloth-([0-9][^-]*)-", os.path.basename(wheel))
    return ce, utils, m.group(1) if m else "unknown"


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def _utils_namespace(utils_src: str) -> dict:
    """The wheel's own MAX_FUSED_SIZE, next_power_of_2 and calculate_settings."""
    import triton
    keep: list[ast.stmt] = []
    for node in ast.parse(utils_src).body:
        if isinstance(node, ast.FunctionDef) and node.name == "calculate_settings":
            keep.append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", "") in ("MAX_FUSED_SIZE", "next_power_of_2") for t in targets):
                keep.append(node)
    ns: dict = {"triton": triton}
    exec(compile(ast.Module(keep, []), "<unsloth kernels/utils.py>", "exec"), ns)
    return ns


def stubs(utils_src: str) -> None:
    """What cross_entropy_loss.py imports, without Unsloth's GPU-only package __init__."""
    import triton.language as tl
    from packaging.version import Version
    ns = _utils_namespace(utils_src)
    _module("unsloth", __path__=[])
    _module("unsloth.kernels", __path__=[])
    nullctx = lambda device: contextlib.nullcontext()  # noqa: E731
    _module("unsloth.kernels.utils", MAX_FUSED_SIZE=ns["MAX_FUSED_SIZE"],
            calculate_settings=ns["calculate_settings"],
            triton_tanh=liger_cases.numpy_elementwise(np.tanh),
            triton_cast=lambda x, dtype: tl.cast(x, dtype),
            torch_gpu_device=nullctx, torch_cuda_device=nullctx, is_cdna=lambda: False)
    _module("unsloth.kernels.rope_embedding", _eviction_hints_ok=lambda device: False)
    _module("transformers.models.llama.modeling_llama", logger=logging.getLogger("unsloth"))
    _module("unsloth_zoo", __path__=[])
    _module("unsloth_zoo.utils", Version=Version)
    _module("unsloth_zoo.loss_utils", patch_loss_functions=lambda *a, **k: None,
            post_patch_loss_function=lambda *a, **k: None)


_KERNELS: dict = {}


def kernel(wheel: str, bug: str = ""):
    """The wheel's cross_entropy_loss module under Triton's interpreter (`bug`: one line of
    PATCHES changed), its version in `__unsloth_version__`."""
    key = (wheel, bug)
    if key in _KERNELS:
        return _KERNELS[key]
    liger_cases.triton_interpreter()
    src, utils_src, version = wheel_sources(wheel)
    stubs(utils_src)
    if bug in PATCHES:
        old, new = PATCHES[bug]
        assert src.count(old) == 1, (bug, version)
        src = src.replace(old, new)
    name = "unsloth.kernels.cross_entropy_loss" + (f"_{bug}" if bug else "")
    filename = f"<unsloth {version} {KERNEL}{' ' + bug if bug else ''}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # for triton.jit
    mod = _module(name, __package__="unsloth.kernels", __file__=filename,
                  __unsloth_version__=version)
    exec(compile(src, filename, "exec"), mod.__dict__)
    _KERNELS[key] = mod
    return mod


# ---- the cases ----

def cases(small: bool) -> list[dict]:
    out = []
    for big in (False, True):
        for v in (BIG_VARIANTS if big else VARIANTS):
            _, _, n_items = VARIANTS[v]
            for dt in DTYPES:
                for C in (((SMALL_BIG if small else BIG),) if big else CLASSES):
                    for s in SCALES:
                        out.append(dict(framework="unsloth", call_tag="ce", dtype=dt, layout="btv",
                                        C=C, scale=s, reduction="sum" if n_items else "mean",
                                        variant=v, target="index"))
    return out


def shape(C: int, small: bool) -> tuple[int, int, int]:
    """(B, T, V): 2 sequences, at most 2^17 (small: 2^14) logits, at least 8 tokens; --small's
    chunked case one token."""
    if small and C > 65_536:
        return 1, 1, C
    n = max(8, min(256, (1 << (14 if small else 17)) // C))
    return 2, n // 2, C


def draw(shp: tuple[int, int, int], scale: float, seed: int):
    """float64 logits (std = scale); labels: half the tokens (the first always) the row's
    largest logit (a trained model's confident predictions: p_y near 1 at std 10 and 30), the
    rest uniform, then ~15 % -100 (never the first or last token)."""
    rng = np.random.default_rng(seed)
    B, T, V = shp
    z = rng.standard_normal(shp) * scale
    y = rng.integers(0, V, size=(B, T), dtype=np.int64)
    confident = rng.random((B, T)) < 0.5
    confident.flat[0] = True
    y[confident] = z.argmax(-1)[confident]
    mask = rng.random((B, T)) < 0.15
    mask.flat[0] = mask.flat[-1] = False
    y[mask] = -100
    return z, y


def run(mod, torch, x0, y, cap, scale, n_items=None):
    """(loss, grad) of `fast_cross_entropy_loss` on a fresh leaf copy of x0."""
    x = x0.clone().requires_grad_(True)
    kw = {} if n_items is None else {"n_items": n_items}
    with np.errstate(all="ignore"):  # the untaken branch of a tl.where may divide 0 by 0
        loss = mod.fast_cross_entropy_loss(x, y, logit_softcapping=cap, logit_scaling=scale, **kw)
        loss.backward()
    return loss, x.grad


def ce_check_options(v: str, dt: str, n_items: int | None) -> dict:
    cap, scale, _ = VARIANTS[v]
    opts: dict = dict(reduction="mean", ignore_index=-100, precision=dt)
    if cap:
        opts["softcap"] = float(cap)
    if scale:
        opts["logit_scale"] = float(scale)
    if n_items is not None:
        opts.update(reduction="sum", denominator=float(n_items))
    return opts


def bugs_of(v: str, C: int) -> tuple[str, ...]:
    cap, scale, n_items = VARIANTS[v]
    out = ["nocap"] if cap else []
    out += ["noscale"] if scale and scale != 1.0 else []
    out += ["noitems"] if n_items else []
    out += ["chunklabel", "chunkdrop"] if C > 65_536 else []
    return tuple(out)


def compute(outdir: str, wheel: str, small: bool):
    mod = kernel(wheel)
    torch = sys.modules["torch"]
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    version = mod.__unsloth_version__

    def one(case: dict, seed: int):
        v, dt, C = case["variant"], case["dtype"], case["C"]
        cap, scale, with_items = VARIANTS[v]
        shp = shape(C, small)
        z64, y64 = draw(shp, case["scale"], seed)
        x0 = torch.from_numpy(z64).to(tdt[dt])
        y = torch.from_numpy(y64)
        n_items = ACCUM * int((y64 != -100).sum()) if with_items else None
        items = None if n_items is None else torch.tensor(n_items)
        loss, grad = run(mod, torch, x0, y, cap, scale, items)
        arrays = {}
        for bug in bugs_of(v, C) if dt == "f32" else ():
            bmod = mod if bug == "noitems" else kernel(wheel, bug)
            bitems = None if bug == "noitems" else items
            arrays["grad_bug_" + bug] = liger_cases.to_np(run(bmod, torch, x0, y, cap, scale,
                                                               bitems)[1])
        meta = dict(unsloth_version=version, kernel="fast_cross_entropy_loss", shape=list(shp),
                    triton_interpret=True, old="", n_items=n_items,
                    logit_softcapping=cap, logit_scaling=scale)
        common.write_case(outdir, case, logits=liger_cases.to_np(x0), labels=y64,
                          grad=liger_cases.to_np(grad), loss=liger_cases.to_np(loss), axis=-1,
                          precision=dt, seed=seed, arrays_extra=arrays,
                          ce_check=ce_check_options(v, dt, n_items), meta_extra=meta)
    return one


def fixture_keep(c: dict) -> bool:
    """The committed subset of --small (about 3 MB): V 10 at every std and dtype, V 1,000 std 10
    in float32 for the variants with planted bugs, the chunked V 70,000 at std 10: plain in
    float32 (its chunk bugs), combo in bf16."""
    if c["C"] == 10:
        return True
    if c["C"] == 1000:
        return c["scale"] == 10.0 and c["dtype"] == "f32" and c["variant"] not in ("plain", "scale1")
    return c["C"] == SMALL_BIG and c["scale"] == 10.0 and (c["variant"], c["dtype"]) in (
        ("plain", "f32"), ("combo", "bf16"))

# ---- released bugs, run with an older wheel (--old) and the fixed one ----

# scenario -> (release that fixed it, what it is)
FIXED_IN = {
    "pad": ("2026.9.7", "unslothai/unsloth#10616: the padded lanes past V (-inf) become -softcap "
            "after the cap and join the logsumexp"),
    "inplace": ("2026.10.1", "unslothai/unsloth#5002: the backward writes the gradient into the "
                "saved logits, so a second loss on the same logits differentiates the gradient"),
}
OLD_MEAN = -40.0        # `pad`: strongly negative logits (each capped near -30, as the padding)


def version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("."))


def old_cases() -> list[dict]:
    """`pad`: softcap 30, logits N(-40, 1), V 1,000 (24 padded lanes in the 1,024 block) and
    70,000 (the second chunk 4,464 wide, 61,072 padded lanes), float32 and bfloat16 (checked as
    Unsloth computes it: `--precision f32` on the bf16 gradient). At std 10 the row's largest
    capped logit is far above -30 and the padded lanes' mass rounds away: the old release's
    outputs are bitwise the fixed one's. `inplace`: loss = z-loss (1e-4 lse^2 over the labelled
    tokens / their count) + fast_cross_entropy_loss on the same float32 logits, std 1 and 10
    (on bf16 logits the z-loss's `x.float()` is a copy the kernel does not overwrite: no bug)."""
    out = []
    for scenario, dtypes, classes, scales in (("pad", ("f32", "bf16"), (1000, SMALL_BIG), (1.0,)),
                                              ("inplace", ("f32",), (1000,), (1.0, 10.0))):
        for dt in dtypes:
            for C in classes:
                for s in scales:
                    out.append(dict(framework="unsloth", call_tag=scenario, dtype=dt, layout="btv",
                                    C=C, scale=s, reduction="mean", variant="", target="index"))
    return out


def run_inplace(mod, torch, x0, y):
    """(loss, grad) of a z-loss written in PyTorch plus Unsloth's loss, on the same logits. The
    CE node is created last, so autograd runs its backward first."""
    x = x0.clone().requires_grad_(True)
    valid = y != -100
    lse = torch.logsumexp(x.float(), dim=-1)
    z_loss = ZETA * (lse * lse * valid).sum() / valid.sum()
    with np.errstate(all="ignore"):
        loss = z_loss + mod.fast_cross_entropy_loss(x, y)
        loss.backward()
    return loss, x.grad


def compute_old(outdir: str, wheel: str):
    mod = kernel(wheel)
    torch = sys.modules["torch"]
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}
    version = mod.__unsloth_version__

    def one(case: dict, seed: int):
        scenario, dt, C = case["call_tag"], case["dtype"], case["C"]
        shp = shape(C, True)
        z64, y64 = draw(shp, case["scale"], seed)
        opts: dict = dict(reduction="mean", ignore_index=-100, precision="f32")
        if scenario == "pad":
            z64 = z64 + OLD_MEAN
            opts["softcap"] = CAP
        x0 = torch.from_numpy(z64).to(tdt[dt])
        y = torch.from_numpy(y64)
        if scenario == "pad":
            loss, grad = run(mod, torch, x0, y, CAP, 0)
        else:
            loss, grad = run_inplace(mod, torch, x0, y)
            opts["z_loss"] = ZETA
        fixed, what = FIXED_IN[scenario]
        meta = dict(unsloth_version=version, kernel="fast_cross_entropy_loss", shape=list(shp),
                    triton_interpret=True, scenario=scenario, fixed_in=fixed, bug=what,
                    old=version_key(version) < version_key(fixed), grad_storage=dt)
        tag = dict(case, call_tag=scenario + version.replace(".", ""))
        common.write_case(outdir, tag, logits=liger_cases.to_np(x0), labels=y64,
                          grad=liger_cases.to_np(grad), loss=liger_cases.to_np(loss), axis=-1,
                          precision=dt, seed=seed, ce_check=opts, meta_extra=meta)
    return one


# ---- --check ----

def check(arr: dict, meta: dict, grad=None, loss: bool = True):
    """ce-check's report on the case (its own gradient, or `grad`; a `grad_storage` bf16 case:
    the gradient in bf16, checked at the case's precision, float32: as Unsloth computes it)."""
    import ce_cli
    grad = arr["grad"] if grad is None else grad
    if meta.get("grad_storage") == "bf16":
        from ce_cli.io.bfloat16 import BF16
        grad = grad.astype(BF16)
    return ce_cli.check_grad(arr["logits"], arr["labels"], grad=grad,
                             loss=arr["loss"] if loss else None, **meta["ce_check"])


def planted(arr: dict) -> dict:
    return {k[9:]: arr[k] for k in arr if k.startswith("grad_bug_")}


def failed(report) -> list:
    return [(c.name, c.note[:160]) for c in report.checks if not c.ok]


def as_computed_in_f32(arr: dict, meta: dict):
    """A 16-bit case's gradient in its storage dtype, checked as computed in float32 (Unsloth's
    kernel computes in float32 and rounds each entry once)."""
    from ce_cli.io.bfloat16 import BF16
    stored = arr["grad"].astype(BF16 if meta["dtype"] == "bf16" else np.float16)
    meta = dict(meta, ce_check=dict(meta["ce_check"], precision="f32"))
    return check(arr, meta, grad=stored, loss=False)


def sweep_one(outdir: str) -> dict:
    n = fa = bugs = missed = old = caught = f32fa = 0
    for p in sorted(glob.glob(os.path.join(outdir, "*.npz"))):
        arr, meta = liger_cases.load(p)
        name = os.path.basename(p)[:-4]
        n += 1
        bad = failed(check(arr, meta))
        if meta.get("old"):
            old += 1
            caught += bool(bad)
            print("OLD BUG " + ("CAUGHT" if bad else "MISSED"), name, bad[:2], flush=True)
            continue
        if bad:
            fa += 1
            print("FALSE ALARM", name, bad, flush=True)
        if meta["dtype"] in ("f16", "bf16") and not meta.get("scenario"):
            bad32 = failed(as_computed_in_f32(arr, meta))
            f32fa += bool(bad32)
            if bad32:
                print("FALSE ALARM as computed in f32", name, bad32, flush=True)
        for bug, g in planted(arr).items():
            bugs += 1
            if check(arr, meta, grad=g, loss=False).ok:
                missed += 1
                size = np.abs(g - arr["grad"]).max() / np.abs(arr["grad"]).max()
                print(f"MISSED {bug} {name}: the bug moves the gradient by {size:.2g} of its"
                      " largest entry", flush=True)
    return dict(cases=n, false_alarms=fa, planted=bugs, missed=missed, old=old, old_caught=caught,
                f32_alarms=f32fa)


def sweep(outdir: str) -> None:
    for fused in ("1", "0"):
        os.environ["CE_CHECK_FUSED"] = fused
        r = sweep_one(outdir)
        print(f"CE_CHECK_FUSED={fused}: cases {r['cases']} false alarms {r['false_alarms']}"
              f" planted bugs {r['planted']} missed {r['missed']}"
              f" old-release bugs caught {r['old_caught']} of {r['old']}"
              f" 16-bit as computed in f32: false alarms {r['f32_alarms']}", flush=True)


def take(flag: str, value: bool = False):
    if flag not in sys.argv:
        return None if value else False
    i = sys.argv.index(flag)
    sys.argv.pop(i)
    return sys.argv.pop(i) if value else True


def main():
    if take("--check"):
        sweep(sys.argv[1])
        return
    wheel = take("--wheel", value=True)
    old = take("--old")
    fixtures = take("--fixtures")
    args = common.parse_args("unsloth_cases.py")
    if not wheel:
        raise SystemExit("unsloth_cases.py: --wheel WHEEL is required (pip download --no-deps "
                         "unsloth==VERSION)")
    if old:
        common.run(old_cases(), args, compute_old(args.outdir, wheel))
        return
    common.run(cases(args.small), args, compute(args.outdir, wheel, args.small), fixture_keep if fixtures else None)


if __name__ == "__main__":
    main()
