"""flash-attn's real Triton cross-entropy on CPU (Triton's interpreter), for ce-check's options
(runs in a venv with torch and triton; flash-attn is not installed: it builds CUDA).

    python flash_attn_cases.py OUTDIR --src SDIST [--small] [--only SUBSTR] [--fixtures]
    python flash_attn_cases.py OUTDIR --src SDIST --tp WORLD      (vocabulary parallel, gloo)
    python flash_attn_cases.py OUTDIR --check [--both]

SDIST: an unpacked flash-attn source tree (`pip download --no-deps --no-binary :all:
flash-attn==2.8.3.post2`, untarred). Only `flash_attn/ops/triton/cross_entropy.py` (the
kernels and the autograd Function) and `flash_attn/losses/cross_entropy.py` (the
`CrossEntropyLoss` module: reduction and `return_z_loss`) are loaded, under stub parent packages;
they import nothing but torch and triton. Triton's interpreter is completed as
`liger_cases.triton_interpreter` has it (fp32 scalar arguments, bf16 rounded to nearest even and
computed in float32). Two CUDA-only lines are passed on CPU: `torch.cuda.device(None)` (the
kernels' launch context; torch 2.13 raises on a CPU tensor's device index) is a null context,
and the module's `assert input.is_cuda` sees True while its forward runs.

flash-attn's loss per row, on z = logit_scale * x in float32 (`cross_entropy_fwd_kernel`):
`lse - eps * sum_c z_c / C - (1 - eps) z_y + lse_square_scale * lse^2`, 0 on an ignored row;
its gradient (`cross_entropy_bwd_kernel`) `g * logit_scale * ((1 + 2 zeta lse) p - (1 - eps)[c = y]
- eps / C)`, written in the logits' dtype. `mean` divides by the non-ignored count.

Cases (`CrossEntropyLoss`, 2-D (BT, V) logits, ~15% of the labels -100):
- `plain`, `sum`: reduction mean / sum; `none`: reduction none, backward of a random upstream
  vector g (zeros included) -> reduction sum with sample_weight g (the rows' losses and z-losses
  kept as `loss_rows`, `z_loss_rows`, checked with reduction none);
- `smooth` label_smoothing 0.1; `scale` logit_scale 0.7; `zloss` lse_square_scale 1e-4 with
  return_z_loss (-> z_loss_value); `combo` all three; `none_combo` the combo, reduction none;
- `inplace` inplace_backward=True (the gradient written into the logits); `pad` ignore_index 0
  (a padding token id; the -100 labels become 0); `prelse` precomputed_lse (torch's float32
  logsumexp, compared with `lse`).

float32 cases hold planted bugs (`grad_bug_<name>`): the real kernel with one argument changed
while the options stay (`nosmooth`, `nozloss`, `noscale`: logit_scale 1, `noignore`: ignore_index
-1, so the -100 rows (pad: the 0 rows) are trained, `g0`: every row's upstream gradient g[0],
`lse_bf16`: the precomputed lse rounded to bf16), or `gradscale`: the gradient divided by
logit_scale in float32 (the scale left out of the backward). A change that leaves the gradient
bit for bit as it is (`noignore` on a batch without an ignored row: at C >= 16,384 the 8 rows
may hold none) is not a bug there and is neither kept nor counted.

dtypes f32, f16, bf16 (half precision saved widened exactly to float32); logit std 1, 10, 30;
C 10, 1000, 32000, 50257 (full: and 128256 for plain, none, combo); at most 2^17 logits per case
(--small: 2^14 and C 10, 1000), at least 8 rows.

`--tp WORLD`: the vocabulary-parallel path (`process_group`) on WORLD gloo processes (rank r holds
columns [r V/p, (r + 1) V/p)); one .npz per case with `logits` (the whole (R, V) batch),
`grad` (the ranks' shards side by side), `loss`, `lse` (the kernel's global lse) and
`shard_offsets`; `--check` runs ce-check's vocabulary shards on them (`grad --shards vocab`, and
each shard alone with `--vocab-offset K --lse GLOBAL --vocab-size V`).

`--check` runs ce-check (ce_cli importable) on every case written in OUTDIR: false alarms on the
correct gradients, planted bugs missed; `--both`: once on each kernel (default, then
CE_CHECK_FUSED=0).
fixtures/frameworks_semantics/flash_attn/ (tests/test_flash_attn_real.py): `--small --fixtures`,
without the .json files (`fixture_keep`).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import re
import sys
import types
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import liger_cases  # noqa: E402  (the interpreter's completion, to_np, load)
from common import SEM_EPS_LS as EPS_LS, SEM_ZETA as ZETA  # noqa: E402

SCALE = 0.7  # logit_scale: not a power of two, so S * x is rounded in float32
IGNORE = -100
# variant -> reduction
VARIANTS = {
    "plain": "mean", "sum": "sum", "none": "none", "smooth": "mean", "scale": "mean",
    "zloss": "mean", "combo": "mean", "none_combo": "none", "inplace": "mean", "pad": "mean",
    "prelse": "mean",
}
BIG = ("plain", "none", "combo")
# --old: flash-attn < 2.8.0 took a negative logit_scale (02541ac9 "[CE] Assert logit_scale > 0")
OLD_VARIANTS = {"negscale": "mean", "negscale_none": "none"}
OLD_CLASSES = (1000, 1024)
CLASSES = (10, 1000, 32_000, 50_257)
SMALL_CLASSES = (10, 1000)
BIG_CLASSES = (128_256,)
SCALES = (1.0, 10.0, 30.0)
DTYPES = ("f32", "f16", "bf16")


def cases(small: bool) -> list[dict]:
    """Every variant x dtype x C x std, then (full) the big vocabulary: a case keeps its seed
    (its place in the list) when variants are added at the end."""
    out = []
    for big in (False, True):
        for v, red in VARIANTS.items():
            for dt in DTYPES:
                for C in (BIG_CLASSES if v in BIG else ()) if big else (
                        SMALL_CLASSES if small else CLASSES):
                    for s in SCALES:
                        out.append(dict(framework="flashattn", call_tag="ce", dtype=dt, layout="nc",
                                        C=C, scale=s, reduction=red, variant=v, target="index"))
        if small:
            break
    return out


def old_cases() -> list[dict]:
    """flash-attn < 2.8.0 with logit_scale -0.7: masked columns of the last block load -inf,
    times a negative scale +inf, so lse and every entry are NaN unless C is a power of two."""
    return [dict(framework="flashattn", call_tag="old", dtype=dt, layout="nc", C=C, scale=s,
                 reduction=red, variant=v, target="index")
            for v, red in OLD_VARIANTS.items() for dt in ("f32", "bf16") for C in OLD_CLASSES
            for s in (1.0, 10.0)]


def fixture_keep(c: dict) -> bool:
    """The committed subset (with --small): every variant at C = 10, std 1 and 30, in float32;
    half precision at C = 10 std 30 (plain, none, combo); C = 1,000 std 30 for the combos."""
    v, s, C, f32 = c["variant"], c["scale"], c["C"], c["dtype"] == "f32"
    if v in OLD_VARIANTS:
        return s == 1.0 and (f32 or C == 1000) and (v == "negscale" or C == 1000)
    if C == 10:
        return s in (1.0, 30.0) if f32 else s == 30.0 and v in ("plain", "none", "combo")
    return C == 1000 and s == 30.0 and f32 and v in ("combo", "none_combo")


# ---- the real kernel, under the interpreter ----

_LOADED: tuple = ()


def sdist_version(src: str) -> str:
    with open(os.path.join(src, "flash_attn", "__init__.py")) as f:
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
    return m.group(1) if m else "unknown"


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def interpreted(src: str):
    """(torch, ops module, losses module or None, version): flash-attn's cross-entropy from the
    source tree `src` under Triton's interpreter (module docstring)."""
    global _LOADED
    if _LOADED:
        return _LOADED
    torch = liger_cases.triton_interpreter()
    base_device = torch.cuda.device
    torch.cuda.device = lambda i: contextlib.nullcontext() if i is None else base_device(i)
    for name in ("flash_attn", "flash_attn.ops", "flash_attn.ops.triton", "flash_attn.losses"):
        pkg = types.ModuleType(name)
        pkg.__path__ = []
        sys.modules.setdefault(name, pkg)
    root = os.path.join(src, "flash_attn")
    ops = _load("flash_attn.ops.triton.cross_entropy", os.path.join(root, "ops", "triton",
                                                                    "cross_entropy.py"))
    path = os.path.join(root, "losses", "cross_entropy.py")
    losses = _load("flash_attn.losses.cross_entropy", path) if os.path.exists(path) else None
    _LOADED = (torch, ops, losses, sdist_version(src))
    return _LOADED


@contextlib.contextmanager
def on_cuda(torch):
    """The module's `assert input.is_cuda` passes (the tensors stay on CPU)."""
    saved = torch.Tensor.is_cuda
    torch.Tensor.is_cuda = property(lambda self: True)
    try:
        yield
    finally:
        torch.Tensor.is_cuda = saved


def fa_args(v: str, bug: str = "") -> dict:
    """CrossEntropyLoss's keyword arguments of variant `v` (`bug` changes one)."""
    combo = "combo" in v
    return dict(
        reduction={**VARIANTS, **OLD_VARIANTS}[v],
        ignore_index=(0 if v == "pad" else IGNORE) if bug != "noignore" else -1,
        label_smoothing=EPS_LS if (v == "smooth" or combo) and bug != "nosmooth" else 0.0,
        logit_scale=(-SCALE if v.startswith("negscale") else
                     SCALE if (v == "scale" or combo) and bug != "noscale" else 1.0),
        lse_square_scale=ZETA if (v == "zloss" or combo) and bug != "nozloss" else 0.0,
        inplace_backward=v == "inplace",
        return_z_loss=v == "zloss" or combo)


def ce_check_options(v: str, dtype: str) -> dict:
    """The ce-check options that express variant `v` (array-valued ones name a .npz array)."""
    combo = "combo" in v
    red = {**VARIANTS, **OLD_VARIANTS}[v]
    opts: dict = dict(reduction="sum" if red == "none" else red, precision=dtype,
                      ignore_index=0 if v == "pad" else IGNORE)
    if v == "smooth" or combo:
        opts["label_smoothing"] = EPS_LS
    if v == "scale" or combo or v.startswith("negscale"):
        opts["logit_scale"] = SCALE  # negscale: on the negated logits
    if v == "zloss" or combo:
        opts["z_loss"] = ZETA
        if red != "none":
            opts["z_loss_value"] = "z_loss_value"
    if red == "none":
        opts["sample_weight"] = "sample_weight"
    if v == "prelse":
        opts["lse"] = "lse"
    return opts


def bugs_of(v: str) -> tuple[str, ...]:
    combo = "combo" in v
    out = []
    if v == "smooth" or combo:
        out.append("nosmooth")
    if v == "zloss" or combo:
        out.append("nozloss")
    if v == "scale" or combo:
        out += ["noscale", "gradscale"]
    if "none" in v:
        out.append("g0")
    if v in ("plain", "sum", "inplace", "pad"):
        out.append("noignore")
    if v == "prelse":
        out.append("lse_bf16")
    return tuple(out)


def draw(shape: tuple[int, int], scale: float, seed: int, pad: bool):
    """float64 logits (std = scale), labels with ~15% ignored (never the first or last row),
    an upstream vector (zeros included)."""
    z, y, _, g, _ = liger_cases.draw(shape, scale, seed)
    if pad:
        y[y == IGNORE] = 0
    return z, y, g


def run_module(torch, losses, x0, y, g, v: str, bug: str = "", group=None):
    """(loss, loss rows or None, z-loss (mean/sum: a scalar, none: rows) or None, grad, lse or
    None) of flash-attn's CrossEntropyLoss on a copy of x0."""
    kw = fa_args(v, bug)
    red = kw["reduction"]
    x = x0.clone().requires_grad_(True)
    leaf = x
    if kw["inplace_backward"]:
        x = x * 1  # the kernel overwrites its input: give it a non-leaf copy
        x.retain_grad()
    pre = None
    if v == "prelse":
        pre = torch.logsumexp(x0.float(), dim=-1)
        if bug == "lse_bf16":
            pre = pre.to(torch.bfloat16).float()
    with on_cuda(torch):
        out = losses.CrossEntropyLoss(**kw, process_group=group)(x, y, precomputed_lse=pre)
    loss, zl = out if kw["return_z_loss"] else (out, None)
    if red == "none":
        loss.backward(torch.full_like(g, float(g[0])) if bug == "g0" else g)
        return (loss * g).sum(), loss, zl, leaf.grad, pre
    loss.backward()
    return loss, None, zl, leaf.grad, pre


def ce_compute(outdir: str, small: bool, src: str):
    torch, _, losses, version = interpreted(src)
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

    def one(case: dict, seed: int):
        v, dt = case["variant"], case["dtype"]
        z64, y64, g64 = draw(liger_cases.ce_shape(case["C"], small), case["scale"], seed, v == "pad")
        x0 = torch.from_numpy(z64).to(tdt[dt])
        y = torch.from_numpy(y64)
        g = torch.from_numpy(g64).float()
        loss, rows, zl, grad, pre = run_module(torch, losses, x0, y, g, v)
        arrays = {}
        if rows is not None:
            arrays["sample_weight"] = g64.astype(np.float32).astype(np.float64)
            arrays["loss_rows"] = liger_cases.to_np(rows)
        if zl is not None:
            arrays["z_loss_rows" if rows is not None else "z_loss_value"] = liger_cases.to_np(zl)
        if pre is not None:
            arrays["lse"] = liger_cases.to_np(pre)
        sign = -1.0 if v.startswith("negscale") else 1.0  # S x = |S| (-x): ce-check's S > 0
        for bug in bugs_of(v) if dt == "f32" else ():
            if bug == "gradscale":
                arrays["grad_bug_" + bug] = liger_cases.to_np(grad / SCALE)
            else:
                bad = liger_cases.to_np(run_module(torch, losses, x0, y, g, v, bug)[3])
                if not np.array_equal(bad, liger_cases.to_np(grad)):  # else a no-op here
                    arrays["grad_bug_" + bug] = bad
        meta = dict(flash_attn_version=version, shape=list(z64.shape), triton_interpret=True,
                    kernel="flash_attn.losses.cross_entropy.CrossEntropyLoss",
                    kernel_args=fa_args(v), old=v in OLD_VARIANTS, negated=sign < 0,
                    old_bug=v in OLD_VARIANTS and case["C"] & (case["C"] - 1) != 0)
        common.write_case(outdir, case, logits=sign * liger_cases.to_np(x0), labels=y64,
                          grad=sign * liger_cases.to_np(grad), loss=liger_cases.to_np(loss), axis=-1,
                          precision=dt, seed=seed, arrays_extra=arrays,
                          ce_check=ce_check_options(v, dt), meta_extra=meta)
    return one


# ---- --tp WORLD: the vocabulary-parallel path (process_group) on gloo ----

TP_VARIANTS = ("plain", "smooth", "combo", "none_combo")


def tp_cases(small: bool, world: int) -> list[dict]:
    out = []
    for v in TP_VARIANTS:
        for dt in ("f32", "bf16"):
            for C in (1000,) if small else (1000, 32_000):
                for s in (1.0, 30.0):
                    out.append(dict(framework="flashattn", call_tag=f"tp{world}", dtype=dt,
                                    layout="nc", C=C, scale=s, reduction=VARIANTS[v], variant=v,
                                    target="vocab"))
    return out


def gather_shim(dist) -> None:
    """gloo's all_gather_into_tensor takes only the flat (world * n,) output; flash-attn passes
    NCCL's stacked (world, n) one: gathered into its flat view (the same bytes)."""
    base = dist.all_gather_into_tensor

    def gather(out, inp, group=None, async_op=False):
        return base(out.view(-1), inp.contiguous(), group=group, async_op=async_op)
    dist.all_gather_into_tensor = gather


def kernel_lse(loss):
    """The lse flash-attn's Function saved for its backward (after the ranks' all-gather:
    the global lse), found in the autograd graph."""
    todo, seen = [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if "CrossEntropyLoss" in type(fn).__name__:
            return fn.saved_tensors[1]
        todo += [f for f, _ in fn.next_functions]
    raise LookupError("flash-attn's CrossEntropyLoss node not found")


def tp_worker(rank: int, world: int, src: str, port: int, jobs: list, outdir: str,
              small: bool) -> None:
    """One rank: every job's shard [rank V/p, (rank + 1) V/p) through CrossEntropyLoss with
    process_group; writes OUTDIR/_tp/<name>_rank<r>.npz."""
    torch, _, losses, _ = interpreted(src)
    import torch.distributed as dist  # type: ignore[import-not-found]
    gather_shim(dist)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}
    for case, seed in jobs:
        v, C = case["variant"], case["C"]
        z64, y64, g64 = draw(liger_cases.ce_shape(C, small), case["scale"], seed, False)
        n = C // world
        x0 = torch.from_numpy(np.ascontiguousarray(z64[:, rank * n:(rank + 1) * n])).to(tdt[case["dtype"]])
        g = torch.from_numpy(g64).float()
        kw = fa_args(v)
        x = x0.clone().requires_grad_(True)
        with on_cuda(torch):
            out = losses.CrossEntropyLoss(**kw, process_group=dist.group.WORLD)(
                x, torch.from_numpy(y64))
        loss, zl = out if kw["return_z_loss"] else (out, None)
        lse = kernel_lse(loss)
        loss.backward(g if kw["reduction"] == "none" else None)
        arrays: dict[str, Any] = dict(logits=liger_cases.to_np(x0), grad=liger_cases.to_np(x.grad),
                      loss=liger_cases.to_np(loss), lse=liger_cases.to_np(lse))
        if zl is not None:
            arrays["z_loss"] = liger_cases.to_np(zl)
        if case["dtype"] == "f32":  # planted: this rank run without the process group
            x = x0.clone().requires_grad_(True)
            with on_cuda(torch):
                alone = losses.CrossEntropyLoss(**kw)(x, torch.from_numpy(y64))
            (alone[0] if kw["return_z_loss"] else alone).backward(
                g if kw["reduction"] == "none" else None)
            arrays["grad_bug_nogroup"] = liger_cases.to_np(x.grad)
        np.savez(os.path.join(outdir, "_tp", f"{common.case_name(case)}_rank{rank}.npz"), **arrays)
    dist.destroy_process_group()


def tp_keep(c: dict) -> bool:
    """The committed vocabulary-parallel subset: C = 1,000 std 30, the combos in float32 and
    the mean combo in bf16."""
    return c["scale"] == 30.0 and "combo" in c["variant"] and (
        c["dtype"] == "f32" or c["reduction"] == "mean")


def tp_run(cases_: list, args, src: str, world: int, keep=None) -> None:
    """Runs every case on WORLD gloo processes, then writes one .npz per case: the whole
    batch's `logits`, the ranks' `logits_<r>` / `grad_<r>`, `loss` (rank 0's: every rank holds
    the same), the kernel's global `lse`, its z-loss."""
    import torch.multiprocessing as mp  # type: ignore[import-not-found]
    os.makedirs(os.path.join(args.outdir, "_tp"), exist_ok=True)
    jobs = [(c, args.seed + i) for i, c in enumerate(cases_)
            if (not args.only or args.only in common.case_name(c)) and (keep is None or keep(c))]
    mp.spawn(tp_worker, args=(world, src, 29500 + os.getpid() % 400, jobs, args.outdir,
                              args.small), nprocs=world)
    version = sdist_version(src)
    for case, seed in jobs:
        name = common.case_name(case)
        parts = [dict(np.load(os.path.join(args.outdir, "_tp", f"{name}_rank{r}.npz")))
                 for r in range(world)]
        v = case["variant"]
        z64, y64, g64 = draw(liger_cases.ce_shape(case["C"], args.small), case["scale"], seed,
                             False)
        opts = ce_check_options(v, case["dtype"])
        opts.pop("z_loss_value", None)
        arrays = {f"{k}_{r}": p[k] for r, p in enumerate(parts)
                  for k in ("logits", "grad", "grad_bug_nogroup") if k in p}
        arrays["lse"] = parts[0]["lse"]
        if VARIANTS[v] == "none":
            arrays["sample_weight"] = g64.astype(np.float32).astype(np.float64)
            arrays["loss_rows"] = parts[0]["loss"]
            loss = (parts[0]["loss"].astype(np.float64) * arrays["sample_weight"]).sum()
            if "z_loss" in parts[0]:
                arrays["z_loss_rows"] = parts[0]["z_loss"]
        else:
            loss = parts[0]["loss"]
            if "z_loss" in parts[0]:
                arrays["z_loss_value"] = parts[0]["z_loss"]
        same = all(np.array_equal(p["loss"], parts[0]["loss"]) for p in parts)
        meta = dict(flash_attn_version=version, shape=list(z64.shape), triton_interpret=True,
                    world=world, shard_offsets=[r * (case["C"] // world) for r in range(world)],
                    ranks_agree_on_loss=bool(same), kernel_args=fa_args(v),
                    kernel="CrossEntropyLoss(process_group=gloo WORLD)")
        common.write_case(args.outdir, case, logits=np.concatenate([p["logits"] for p in parts], 1),
                          labels=y64, grad=np.concatenate([p["grad"] for p in parts], 1),
                          loss=np.asarray(loss), axis=-1, precision=case["dtype"], seed=seed,
                          arrays_extra=arrays, ce_check=opts, meta_extra=meta)
    print(f"wrote {len(jobs)} vocabulary-parallel cases (world {world}) to {args.outdir}")


# ---- --check: ce-check on every case of OUTDIR ----

def named_options(arr: dict, meta: dict) -> dict:
    """The case's ce-check keyword arguments, the array-valued ones taken from the .npz."""
    return {k: arr[o] if isinstance(o, str) and k not in ("reduction", "precision") else o
            for k, o in meta["ce_check"].items()}


def check(arr: dict, meta: dict, grad=None, loss: bool = True, **override):
    """ce-check's report on the case (its own gradient, or `grad`)."""
    import ce_cli
    opts = {**named_options(arr, meta), **override}
    if not loss:
        opts.pop("z_loss_value", None)
    return ce_cli.check_grad(arr["logits"], arr["labels"], grad=arr["grad"] if grad is None else grad,
                             loss=arr["loss"] if loss else None, **opts)


def check_rows(arr: dict, meta: dict):
    """reduction='none' cases: ce-check's report on the kernel's per-row losses and z-losses
    (reduction none, no gradient), or None."""
    if "loss_rows" not in arr:
        return None
    import ce_cli
    opts = {k: o for k, o in named_options(arr, meta).items() if k != "sample_weight"}
    opts["reduction"] = "none"
    if "z_loss_rows" in arr:
        opts["z_loss_value"] = arr["z_loss_rows"]
    return ce_cli.check_grad(arr["logits"], arr["labels"], loss=arr["loss_rows"], **opts)


def as_stored(arr: dict, meta: dict):
    """A half-precision case checked as flash-attn computes it: in float32, the gradient
    rounded once to its dtype (`precision f32` on a gradient stored in f16 / bf16)."""
    from ce_cli.io.bfloat16 import BF16
    store = {"f16": np.float16, "bf16": BF16}[meta["dtype"]]
    return check(arr, meta, grad=arr["grad"].astype(store), loss=False, precision="f32")


def margin(report, name: str = "grad_vs_reference") -> float:
    """The check's largest |error| / allowed (how near the kernel comes to its allowance)."""
    c = next((c for c in report.checks if c.name == name), None)
    return max((e.abs_err / e.allowed for e in c.worst if e.allowed > 0), default=0.0) if c else 0.0


def failures(report) -> list:
    return [(c.name, c.note[:160]) for c in report.checks if not c.ok] if report else []


def sweep(outdir: str) -> tuple[int, int, int, int]:
    """(cases, false alarms, planted bugs, missed); prints each failure."""
    n = fa = bugs = missed = old = caught = 0
    worst: dict[str, float] = {}
    for p in sorted(glob.glob(os.path.join(outdir, "*.npz"))):
        arr, meta = liger_cases.load(p)
        name = os.path.basename(p)[:-4]
        if meta.get("target") == "vocab":
            got = check_tp(p, arr, meta, name)
            n, fa, bugs, missed = n + 1, fa + got[0], bugs + got[1], missed + got[2]
            continue
        n += 1
        if meta.get("old"):
            ok = check(arr, meta).ok
            old, caught = old + 1, caught + (not ok and meta["old_bug"])
            fa += ok == meta["old_bug"] and not meta["old_bug"]
            print(f"OLD {name}: {'PASS' if ok else 'FAIL'} (bug present: {meta['old_bug']})")
            continue
        rep = check(arr, meta)
        worst[meta["dtype"]] = max(worst.get(meta["dtype"], 0.0), margin(rep))
        bad = failures(rep) + [("rows:" + k, t) for k, t in failures(check_rows(arr, meta))]
        if meta["dtype"] != "f32":
            stored = as_stored(arr, meta)
            key = meta["dtype"] + " as f32"
            worst[key] = max(worst.get(key, 0.0), margin(stored))
            bad += [("stored:" + k, t) for k, t in failures(stored)]
        if bad:
            fa += 1
            print("FALSE ALARM", name, bad, flush=True)
        for k in (k for k in arr if k.startswith("grad_bug_")):
            if np.array_equal(arr[k], arr["grad"]):
                continue  # a no-op on this input (noignore with no ignored row): not a bug
            bugs += 1
            if check(arr, meta, grad=arr[k], loss=False).ok:
                missed += 1
                print("MISSED", k[9:], name, flush=True)
    print(f"[{os.environ.get('CE_CHECK_FUSED') == '0' and 'numpy' or 'default'} kernel] cases {n}"
          f" false alarms {fa} planted bugs {bugs} missed {missed} old-version cases {old}"
          f" (bug caught {caught}); largest gradient error / allowed: "
          + ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items())), flush=True)
    return n, fa, bugs, missed


def shard_command(path: str, meta: dict, grad: str | None = "grad") -> list[str]:
    """`ce-check grad --shards vocab` on the case's rank arrays (`<grad>_<r>`), with its options
    as flags (the kernel's loss, global lse and z-loss compared). `grad` None: reduction='none'
    cases' per-row losses and z-losses (reduction none, no gradient)."""
    world = meta["world"]
    argv = [f"{path}:logits_{r}" for r in range(world)] + [f"{path}:labels"]
    for r in range(world if grad else 0):
        argv += ["--grad", f"{path}:{grad}_{r}"]
    argv += ["--shards", "vocab", "--json"]
    opts = dict(meta["ce_check"])
    if grad is None:
        opts.pop("sample_weight")
        opts["reduction"] = "none"
        argv += ["--loss", f"{path}:loss_rows", "--lse", f"{path}:lse"]
        if "z_loss" in opts:
            argv += ["--z-loss-value", f"{path}:z_loss_rows"]
    elif grad == "grad":
        argv += ["--loss", f"{path}:loss", "--lse", f"{path}:lse"]
        if "z_loss" in opts and meta["reduction"] != "none":
            argv += ["--z-loss-value", f"{path}:z_loss_value"]
    for k, o in opts.items():
        argv += ["--" + k.replace("_", "-"), f"{path}:{o}" if k == "sample_weight" else str(o)]
    return argv


def run_cli(argv: list[str], env: dict | None = None) -> dict:
    """ce-check's JSON report (a fresh process: `python -m ce_cli`)."""
    import subprocess
    r = subprocess.run([sys.executable, "-m", "ce_cli", "grad", *argv], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    if r.returncode not in (0, 1):
        raise RuntimeError(f"ce-check exit {r.returncode}: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


def check_shard_alone(arr: dict, meta: dict, r: int, grad=None):
    """Rank r's shard checked alone: `--vocab-offset K --lse GLOBAL --vocab-size V`, GLOBAL the
    float64 lse of the whole batch's scaled logits."""
    import ce_cli
    opts = {k: o for k, o in named_options(arr, meta).items() if k not in ("lse", "z_loss_value")}
    z = arr["logits"].astype(np.float64) * opts.get("logit_scale", 1.0)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    g = arr[f"grad_{r}"] if grad is None else grad
    return ce_cli.check_grad(arr[f"logits_{r}"], arr["labels"], grad=g, lse=lse,
                             vocab_offset=meta["shard_offsets"][r], vocab_size=meta["C"], **opts)


def check_tp(path: str, arr: dict, meta: dict, name: str) -> tuple[int, int, int]:
    """(false alarm 0/1, planted bugs, missed) of a vocabulary-parallel case."""
    bad = []
    for grad in ("grad", None) if meta["reduction"] == "none" else ("grad",):
        rep = run_cli(shard_command(path, meta, grad))
        bad += [(c["name"], (c.get("note") or "")[:160]) for c in rep["checks"] if not c["ok"]]
    for r in range(meta["world"]):
        bad += [(f"shard{r}:" + k, t) for k, t in failures(check_shard_alone(arr, meta, r))]
    if bad:
        print("FALSE ALARM", name, bad, flush=True)
    bugs = missed = 0
    if "grad_bug_nogroup_0" in arr:
        bugs = 1
        if run_cli(shard_command(path, meta, "grad_bug_nogroup"))["ok"]:
            missed = 1
            print("MISSED nogroup", name, flush=True)
    return int(bool(bad)), bugs, missed


def main():
    argv = sys.argv[1:]
    if "--check" in argv:
        outdir = argv[0]
        sweep(outdir)
        if "--both" in argv:
            os.environ["CE_CHECK_FUSED"] = "0"
            sweep(outdir)
        return
    src = None
    if "--src" in argv:
        i = argv.index("--src")
        src = argv[i + 1]
        del argv[i:i + 2]
    fixtures = "--fixtures" in argv
    if fixtures:
        argv.remove("--fixtures")
    if src is None:
        sys.exit("flash_attn_cases.py: --src SDIST (an unpacked flash-attn source tree) is required")
    old = "--old" in argv
    if old:
        argv.remove("--old")
    world = 0
    if "--tp" in argv:
        i = argv.index("--tp")
        world = int(argv[i + 1])
        del argv[i:i + 2]
    sys.argv = [sys.argv[0]] + argv
    args = common.parse_args("flash_attn_cases.py")
    if world:
        tp_run(tp_cases(args.small, world), args, src, world, tp_keep if fixtures else None)
        return
    common.run(old_cases() if old else cases(args.small), args, ce_compute(args.outdir, args.small, src),
               fixture_keep if fixtures else None)


if __name__ == "__main__":
    main()
