"""Shared by the framework generators (torch_cases.py, jax_cases.py, tf_cases.py).

Pure numpy + stdlib, so each framework's own venv can import it. The case grid, the inputs
(float64 draws, rounded by the framework into the dtype it computes in) and the .npz + .json
writing. Each case is one OUTDIR/<name>.npz with `logits`, `labels`, `grad`, `loss`, optional
`weight`, and a `meta` string array (JSON) repeated in OUTDIR/<name>.json.

bfloat16 arrays are stored exactly widened to float32 (numpy has no bfloat16 without ml_dtypes);
`meta["dtype"]` says what was computed in, and `meta["ce_check"]["precision"]` is the precision to
pass to ce-check (bf16 for those).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np

CLASSES = (2, 10, 100, 1000, 10_000, 32_000, 50_257, 128_256, 256_000)
SCALES = (1.0, 5.0, 30.0, 50.0)
ELEMENTS = 1 << 19          # logits per case (full mode); few rows (at least 8) at large C
MIN_ROWS = 8
MAX_ROWS = 1024
SMALL_CLASSES = (10, 1000, 32_000)
BASE_ONLY = False
D_AXIS1 = 8                 # trailing extent d of the (N, C, d) layout


SMALL_ROWS = {10: 64, 1000: 8, 32_000: 8}


def rows_for(C: int, small: bool, layout: str = "last") -> int:
    if small:
        return SMALL_ROWS[C] if layout == "axis1" or C != 32_000 else 4
    return int(max(MIN_ROWS, min(MAX_ROWS, ELEMENTS // C)))


def small_keep(c: dict) -> bool:
    """The --small subset (about 15 MB over the three frameworks): the normaliser cases at
    C = 32,000 (float32, std 1, and std 30 class-last), everything at C = 10 and 1,000 with
    std 1, 30, 50 (the flush-to-zero cases), variants at std 30."""
    if c["C"] == 32_000:
        return (c["dtype"] == "f32" and c["variant"] == "" and c["reduction"] == "mean" and
                (c["scale"] == 1.0 or (c["scale"] == 30.0 and c["layout"] == "last")) and
                (c["layout"] == "last" or c["framework"] == "torch"))
    if c["variant"]:
        return c["scale"] == 30.0 and c["C"] == 1000
    return c["scale"] in (1.0, 30.0, 50.0)


def case_name(c: dict) -> str:
    parts = [c["framework"], c["call_tag"], c["dtype"], c["layout"], f"C{c['C']}", f"s{c['scale']:g}",
             c["reduction"]]
    if c.get("variant"):
        parts.append(c["variant"])
    return "_".join(parts)


# the training-code sweeps (torch_semantic_cases.py, jax_semantic_cases.py)
SEM_CLASSES = (10, 1000, 32_000)
SEM_SCALES = (1.0, 10.0, 30.0, 50.0)
SEM_CAP = 30.0      # Gemma-2's final_logit_softcapping
SEM_ZETA = 1e-4     # z-loss coefficient (PaLM, OLMo, T5X)
SEM_EPS_LS = 0.1    # label smoothing


def semantic_cases(framework: str, variants: dict, dtypes, small: bool, big_vocab=None,
                   only_dtypes=None) -> list[dict]:
    """Every variant x dtype x C x std, then (full mode) the large vocabularies of `big_vocab`:
    a case keeps its seed (its place in the list) when variants are added at the end.
    `variants`: name -> (family, reduction, layout) or (family, reduction, layout, target)."""
    out = []
    for big in (False, True):
        for v, spec in variants.items():
            family, red, lay = spec[:3]
            target = spec[3] if len(spec) > 3 else "index"
            for dt in (only_dtypes or {}).get(v, tuple(dtypes)):
                for C in ((big_vocab or {}).get(v, ()) if big else SEM_CLASSES):
                    for s in SEM_SCALES:
                        out.append(dict(framework=framework, call_tag=family, dtype=dt, layout=lay,
                                        C=C, scale=s, reduction=red, variant=v, target=target))
        if small:
            break
    return out


def grid(framework: str, dtypes, layouts, calls, *, small: bool = False,
         variants=(), variant_dtypes=None, variant_classes=(10, 1000, 32_000, 128_256),
         variant_scales=(1.0, 30.0)):
    """The cases: every (call, dtype, layout, C, scale) with reduction 'mean' and index targets,
    then each variant on a subset. `calls` maps a call tag to the target kind it takes."""
    classes = SMALL_CLASSES if small else CLASSES
    scales = SCALES
    out = []
    for tag, target in calls.items():
        if target != "index":
            continue
        for dt in dtypes:
            for lay in layouts:
                for C in classes:
                    for s in scales:
                        out.append(dict(framework=framework, call_tag=tag, dtype=dt, layout=lay, C=C,
                                        scale=s, reduction="mean", variant="", target="index"))
    if BASE_ONLY:
        variants = ()
    vdt = variant_dtypes or dtypes
    vclasses = tuple(C for C in variant_classes if (not small or C in SMALL_CLASSES))
    for v in variants:
        tag, var, red, target = v["tag"], v["variant"], v.get("reduction", "mean"), v.get("target", "index")
        for dt in v.get("dtypes", vdt):
            for lay in v.get("layouts", layouts):
                for C in v.get("classes", vclasses):
                    if small and C not in SMALL_CLASSES:
                        continue
                    for s in v.get("scales", variant_scales):
                        out.append(dict(framework=framework, call_tag=tag, dtype=dt, layout=lay, C=C,
                                        scale=s, reduction=red, variant=var, target=target))
    if small:
        out = [c for c in out if small_keep(c)]
    return out


def shape_of(case: dict, small: bool):
    """(logits shape, class axis, batch shape)."""
    C = case["C"]
    R = rows_for(C, small, case["layout"])
    if case["layout"] == "axis1":
        d = D_AXIS1 if R >= D_AXIS1 else 1
        N = max(1, R // d)
        return (N, C, d), 1, (N, d)
    return (R, C), -1, (R,)


def draw(case: dict, small: bool, seed: int):
    """float64 logits (std = scale), int64 labels (class axis removed), probability targets
    (float64, same shape as logits) and class weights. The framework rounds them."""
    rng = np.random.default_rng(seed)
    shape, axis, bshape = shape_of(case, small)
    C = case["C"]
    z = rng.standard_normal(shape) * case["scale"]
    y = rng.integers(0, C, size=bshape, dtype=np.int64)
    if case["variant"] in ("ignore", "ignore_smooth"):
        mask = rng.random(bshape) < 0.15
        mask.flat[0] = True
        mask.flat[-1] = False
        y[mask] = -100
    t = None
    if case["target"] == "prob":
        a = rng.standard_normal(shape) * 2.0
        a = a - a.max(axis=axis, keepdims=True)
        t = np.exp(a)
        t = t / t.sum(axis=axis, keepdims=True)
    w = rng.uniform(0.5, 2.0, size=C) if "weight" in case["variant"] else None
    return z, y, t, w, axis


def ce_options(case: dict, axis: int, precision: str) -> dict:
    v = case["variant"]
    opts = dict(reduction=case["reduction"], ignore_index=-100,
                label_smoothing=0.1 if "smooth" in v else 0.0,
                class_axis=axis, precision=precision, weight=("weight" if "weight" in v else None))
    return opts


def write_case(outdir: str, case: dict, *, logits, labels, grad, loss, weight=None, meta_extra=None,
               axis: int, precision: str, seed: int, ce_check=None, arrays_extra=None) -> str:
    """`ce_check`: the check's kwargs when not the softmax ones (ce_options); `arrays_extra`:
    more arrays for the .npz (e.g. `pos_weight`)."""
    name = case_name(case)
    meta = dict(case)
    meta.update(meta_extra or {})
    meta["class_axis"] = axis
    meta["seed"] = seed
    meta["ce_check"] = ce_check if ce_check is not None else ce_options(case, axis, precision)
    meta["logits_dtype_saved"] = str(np.asarray(logits).dtype)
    meta["grad_dtype_saved"] = str(np.asarray(grad).dtype)
    arrays = dict(logits=np.asarray(logits), labels=np.asarray(labels), grad=np.asarray(grad),
                  loss=np.asarray(loss), meta=np.array([json.dumps(meta)]))
    if weight is not None:
        arrays["weight"] = np.asarray(weight)
    arrays.update({k: np.asarray(v) for k, v in (arrays_extra or {}).items()})
    path = os.path.join(outdir, name + ".npz")
    np.savez_compressed(path, **arrays)
    with open(os.path.join(outdir, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return path


def parse_args(prog: str):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("outdir", help="directory to write <case>.npz and <case>.json into")
    ap.add_argument("--small", action="store_true",
                    help="compact subset (C <= 32,000, few rows; the std 30-50 flush-to-zero cases)")
    ap.add_argument("--only", default="", help="substring filter on case names")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--skip-existing", action="store_true")
    ap.add_argument("--scales", default="", help="comma-separated logit stds instead of 1,5,30,50")
    ap.add_argument("--base-only", action="store_true", help="no variants (reduction mean, index targets)")
    ap.add_argument("--classes", default="", help="comma-separated class counts instead of the grid's")
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    global SCALES, CLASSES, BASE_ONLY
    BASE_ONLY = args.base_only
    if args.scales:
        SCALES = tuple(float(v) for v in args.scales.split(","))
    if args.classes:
        CLASSES = tuple(int(v) for v in args.classes.split(","))
    return args


def run(cases, args, compute, keep=None):
    """compute(case, seed) -> None (writes). Prints one line per case. `keep(case)`: a subset
    whose cases keep their seeds."""
    n = 0
    for i, case in enumerate(cases):
        name = case_name(case)
        if (args.only and args.only not in name) or (keep is not None and not keep(case)):
            continue
        if args.skip_existing and os.path.exists(os.path.join(args.outdir, name + ".npz")):
            continue
        seed = args.seed + i
        try:
            compute(case, seed)
            n += 1
        except Exception as e:  # a framework that refuses a case: say so and go on
            print(f"SKIP {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            with open(os.path.join(args.outdir, "_skipped.txt"), "a") as f:
                f.write(f"{name}\t{type(e).__name__}: {str(e).splitlines()[0][:300]}\n")
    print(f"wrote {n} cases to {args.outdir}")


def on_both_kernels(script: str, argv: list[str], check: Callable[[], int]) -> int:
    """`--check`: `check()` here when CE_CHECK_FUSED is set, else `script argv` again once per
    kernel (compiled, then numpy: CE_CHECK_FUSED=1, 0); the worse exit code."""
    if os.environ.get("CE_CHECK_FUSED") is not None:
        return check()
    return max(subprocess.call([sys.executable, script, *argv],
                               env={**os.environ, "CE_CHECK_FUSED": f}) for f in ("1", "0"))


def check_summary(counted: str, alarms: list, bugs: int, missed: list) -> int:
    """`--check`'s last lines for this process's kernel: `counted` (e.g. "324 cases"), the false
    alarms and the planted bugs missed, each listed; 1 when there is any, else 0."""
    kernel = "numpy" if os.environ.get("CE_CHECK_FUSED") == "0" else "default"
    print(f"{kernel} kernel: {counted}, {len(alarms)} false alarms; {bugs} planted bugs, "
          f"{len(missed)} missed")
    for a in alarms + missed:
        print("  ", a)
    return int(bool(alarms or missed))
