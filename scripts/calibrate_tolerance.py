"""Calibrate the tolerance model on both sides (no torch needed).

For correct implementations (the generators of tests/test_zoo.py: naive / shifted / exp(log_softmax)
/ exp(z - lse) softmax, computed in f16/f32/f64, stored as such or narrower) it measures, per
precision, the worst ratio |got - ref| / allowed that `check_grad` reports: the margin of the floor
factor k (we want it well below 1). For the bug zoo it measures the smallest ratio over seeds (how
far over the line each bug lands), for a single entry off by 1% the detection margin in f32/f64,
and in f16 which relative error sizes are detected at all.

    python scripts/calibrate_tolerance.py            # ~1-2 minutes
    python scripts/calibrate_tolerance.py --n 3000   # more random configurations

Every failure (a correct gradient rejected, a bug missed) is printed with a one-line reproducer.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_zoo as zoo  # noqa: E402
from ce_cli.verify.checks import check_grad  # noqa: E402
from ce_cli.models.softmax import build_softmax_ce  # noqa: E402
from ce_cli.verify.tolerance import resolve_tolerance  # noqa: E402

PRECISION_OF = {"f64": "f64", "f32": "f32", "f32->f16": "f16", "f16": "f16"}


def ratio_of(report, name="grad_vs_reference"):
    for c in report.checks:
        if c.name == name:
            return zoo.worst_ratio(c), c
    return None, None


# ------------------------------------------------------------------------------------------
# correct implementations
# ------------------------------------------------------------------------------------------

def random_config(rng):
    config = str(rng.choice(list(zoo.CONFIGS)))
    style = str(rng.choice(zoo.STYLES))
    shape = [(1, 2), (7, 3), (64, 10), (33, 300), (256, 1000), (1024, 100), (16, 8000),
             (4, 16, 500), (8, 32000)][rng.integers(9)]
    scale = float(np.exp(rng.uniform(np.log(0.1), np.log(80.0))))
    reduction = str(rng.choice(["mean", "mean", "sum", "none"]))
    smoothing = float(rng.choice([0.0, 0.0, 0.05, 0.3]))
    weighted = bool(rng.random() < 0.35)
    wmax = float(rng.choice([1.0, 3.0]))
    ignore = float(rng.choice([0.0, 0.0, 0.2]))
    margin = float(rng.choice([0.0, 0.0, 10.0, 40.0]))
    seed = int(rng.integers(2**32))
    return dict(config=config, style=style, shape=shape, scale=scale, reduction=reduction,
                smoothing=smoothing, weighted=weighted, wmax=wmax, ignore=ignore, margin=margin,
                seed=seed)


def build_correct(cfg):
    compute, store = zoo.CONFIGS[cfg["config"]]
    rng = np.random.default_rng(cfg["seed"])
    shape = tuple(cfg["shape"])
    C = shape[-1]
    style = cfg["style"]
    y = rng.integers(0, C, size=shape[:-1])
    if cfg["ignore"]:
        y.reshape(-1)[rng.random(y.size) < cfg["ignore"]] = -100
    if cfg["reduction"] == "mean" and np.all(y == -100):
        y.reshape(-1)[0] = 0
    z = zoo.make_logits(rng, shape, cfg["scale"], compute, labels=np.where(y < 0, -1, y),
                        margin=cfg["margin"])
    if style == "naive" and not zoo.naive_fits(z):
        style = "shifted"
    weight = rng.uniform(0.5, 3.0, size=C) * (cfg["wmax"] / 3.0) if cfg["weighted"] else None
    gkw = dict(reduction=cfg["reduction"], weight=weight, smoothing=cfg["smoothing"])
    with np.errstate(all="ignore"):
        g = zoo.correct_grad(z, y, style, store=store, **gkw)
        loss = zoo.correct_loss(z, y, style, **gkw)
    kw = dict(reduction=cfg["reduction"], weight=weight, label_smoothing=cfg["smoothing"])
    return z, y, g, loss, kw, style


def repro(cfg):
    return ("python -c \"import sys; sys.path[:0]=['tests','scripts']; import calibrate_tolerance as c; "
            f"c.show({cfg!r})\"")


def show(cfg):
    z, y, g, loss, kw, style = build_correct(cfg)
    report = check_grad(z, y, grad=g, loss=loss, fd="sample", samples=64, **kw)
    print(zoo.describe(report))


ENTRY_CLASSES = ("regular", "argmax", "subnormal")


def entry_ratios(z, y, got, **kw):
    """Per-entry |got - ref| / allowed over the whole (N, C) matrix, by the rule of compare.py,
    with each entry's class: 'argmax' (the row's largest logit, where the reference forms
    Q*(a - 1) + (Q - q)), 'subnormal' (|ref| below 8x the storage dtype's smallest normal: the
    absolute `tiny` term governs), else 'regular' (the floor factor k governs)."""
    problem, _ = build_softmax_ce(z, y, **kw)
    tol = resolve_tolerance(got.dtype)
    N, C = problem.n_rows, problem.n_classes
    ev = problem.evaluate(0, N, floor_coef=tol.floor_coef)
    ref = ev.grad
    allowed = tol.atol + tol.rtol * np.abs(ref) + tol.tiny + ev.floor
    gr = problem.layout.to_rows(got).astype(np.float64)
    with np.errstate(invalid="ignore"):
        ratio = np.abs(gr - ref) / allowed
    cls = np.zeros((N, C), dtype=np.int8)
    cls[np.abs(ref) < 8 * np.finfo(got.dtype).smallest_normal] = 2
    cls[np.arange(N), np.asarray(problem.z).argmax(axis=1)] = 1
    return ratio, cls


def sweep_correct(n, seed, fixed=True):
    rng = np.random.default_rng(seed)
    cfgs = [random_config(rng) for _ in range(n)]
    if fixed:  # the brief's grid, every style at scales 1, 10, 60, several seeds
        for config in zoo.CONFIGS:
            for style in zoo.STYLES:
                for scale in (1.0, 10.0, 60.0):
                    for shape in ((4096, 100), (256, 1000), (64, 32000)):
                        for s in range(2):
                            cfgs.append(dict(config=config, style=style, shape=shape, scale=scale,
                                             reduction="mean", smoothing=0.0, weighted=False,
                                             wmax=3.0, ignore=0.0, margin=0.0, seed=100 + s))
    worst = defaultdict(lambda: (0.0, None))     # (precision, check) -> (ratio, cfg)
    by_class = defaultdict(lambda: (0.0, None))  # (precision, entry class, Q*scale > 1) -> ...
    failures = []
    t0 = time.time()
    for cfg in cfgs:
        z, y, g, loss, kw, style = build_correct(cfg)
        if style != cfg["style"]:
            cfg = dict(cfg, used=style)  # naive softmax overflows/underflows here: max-shifted used
        report = check_grad(z, y, grad=g, loss=loss, fd="sample", samples=64, **kw)
        prec = PRECISION_OF[cfg["config"]]
        for c in report.checks:
            r = zoo.worst_ratio(c)
            key = (prec, c.name)
            if r > worst[key][0]:
                worst[key] = (r, cfg)
        ratio, cls = entry_ratios(z, y, g, **kw)
        big_q = bool(cfg["weighted"] and cfg["wmax"] > 1 and cfg["reduction"] != "mean")
        causes = []
        for k, name in enumerate(ENTRY_CLASSES):
            sel = ratio[cls == k]
            r = float(np.nanmax(sel)) if sel.size else 0.0
            key = (prec, name, big_q)
            if r > by_class[key][0]:
                by_class[key] = (r, cfg)
            if r > 1:
                causes.append(name + (" (Q*scale > 1)" if big_q and name == "subnormal" else ""))
        if not report.ok:
            failures.append((cfg, causes, zoo.describe(report)))
    return worst, by_class, failures, len(cfgs), time.time() - t0


# ------------------------------------------------------------------------------------------
# bugs
# ------------------------------------------------------------------------------------------

def sweep_bugs(seeds):
    out = {}
    for name in zoo.BUGS:
        for config in ("f32", "f64", "f32->f16", "f16"):
            compute, store = zoo.CONFIGS[config]
            lo, lo_seed, missed = math.inf, None, []
            for s in seeds:
                with np.errstate(all="ignore"):
                    try:
                        z, y, g, kw = zoo.make_bug(name, seed=s, dtype=compute)
                    except AssertionError:   # the overflow bug needs float32 to overflow
                        continue
                report = check_grad(z, y, grad=g.astype(store), fd="off", **kw)
                r, c = ratio_of(report)
                if c.ok:
                    missed.append(s)
                if lo_seed is None or r < lo:
                    lo, lo_seed = r, s
            if lo_seed is not None:
                out[(name, config)] = (lo, lo_seed, missed)
    return out


def entry_ratio(z, y, got, r, c, **kw):
    """|got - ref| / allowed at entry (r, c) of an (N, C) problem, by the rule of compare.py."""
    problem, _ = build_softmax_ce(z, y, **kw)
    tol = resolve_tolerance(got.dtype)
    ev = problem.evaluate(r, r + 1, floor_coef=tol.floor_coef)
    ref = ev.grad[0, c]
    allowed = tol.atol + tol.rtol * abs(ref) + tol.tiny + ev.floor[0, c]
    return abs(float(got[r, c]) - ref) / allowed


def one_percent(n, seed, dtype, rel=0.01, kinds=("target", "typical", "largest"), store=None,
                shape_choices=((256, 1000), (64, 300), (1024, 100), (16, 8000))):
    """Perturb one entry by `rel` (relative, in the compute dtype). Per kind of entry, a list of
    (ratio at the entry, detected and located, cancellation factor (a + q)/|a - q|, config)."""
    rng = np.random.default_rng(seed)
    res = defaultdict(list)
    for _ in range(n):
        shape = shape_choices[rng.integers(len(shape_choices))]
        scale = float(np.exp(rng.uniform(np.log(0.3), np.log(60.0))))
        style = str(rng.choice(["shifted", "logsoftmax", "lse"]))
        s = int(rng.integers(2**32))
        r2 = np.random.default_rng(s)
        N, C = shape
        y = r2.integers(0, C, size=N)
        z = zoo.make_logits(r2, shape, scale, dtype)
        g = zoo.correct_grad(z, y, style)
        mag = np.abs(g.astype(np.float64))
        for kind in kinds:
            if kind == "target":
                r = int(r2.integers(N))
                c = int(y[r])
            elif kind == "typical":
                mask = mag >= 1e-3 * mag.max()
                mask[np.arange(N), y] = False
                cand = np.argwhere(mask)
                if cand.size == 0:
                    continue
                order = np.argsort(mag[mask], kind="stable")
                r, c = (int(v) for v in cand[order[order.size // 2]])
            else:  # the largest non-target entry
                m2 = mag.copy()
                m2[np.arange(N), y] = -1
                r, c = (int(v) for v in np.unravel_index(np.argmax(m2), m2.shape))
            bad = g.copy()
            bad[r, c] = bad[r, c] * bad.dtype.type(1 + rel)
            if store is not None:
                bad = bad.astype(store)
            report = check_grad(z, y, grad=bad, fd="off", worst=1)
            chk = ratio_of(report)[1]
            detected = (not chk.ok) and chk.worst[0].index == (r, c)
            zz = z[r].astype(np.float64)
            a = np.exp(zz - zz.max())
            a = a[c] / a.sum()
            q = 1.0 if c == y[r] else 0.0
            cancel = (a + q) / abs(a - q) if a != q else math.inf
            res[kind].append((entry_ratio(z, y, bad, r, c), detected, cancel,
                              dict(dtype=np.dtype(dtype).name, shape=shape, scale=scale,
                                   style=style, seed=s, entry=(r, c), g=float(g[r, c]))))
    return res


def f16_detection(n, seed):
    """Detection rate of a relative error `rel` on one entry in float16 (two ways of making f16)."""
    table = {}
    for label, compute, store in (("f32->f16", np.float32, np.float16), ("f16", np.float16, np.float16)):
        for rel in (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
            res = one_percent(n, seed, compute, rel=rel, store=store,
                              shape_choices=((256, 1000), (64, 300), (1024, 100)))
            for kind, rows in res.items():
                det = [d for _r, d, cancel, _c in rows if cancel <= 2.0]
                table[(label, kind, rel)] = (sum(det), len(det))
    return table


def detection_thresholds(seed, scales=(0.3, 1.0, 3.0, 10.0, 30.0, 60.0), N=256, C=1000):
    """The smallest relative error allowed/|ref| the check flags, per precision, logit scale and
    kind of entry: 'target' (a_y <= 1/3, no cancellation) and 'non-target' (|g| >= 1e-3 max|g|)."""
    out = {}
    for prec, store in (("f16", np.float16), ("f32", np.float32), ("f64", np.float64)):
        tol = resolve_tolerance(store)
        for scale in scales:
            rng = np.random.default_rng(seed)
            y = rng.integers(0, C, size=N)
            z = zoo.make_logits(rng, (N, C), scale, np.float32 if prec == "f16" else store)
            problem, _ = build_softmax_ce(z, y)
            ev = problem.evaluate(0, N, floor_coef=tol.floor_coef)
            ref = ev.grad
            allowed = tol.atol + tol.rtol * np.abs(ref) + tol.tiny + ev.floor
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = allowed / np.abs(ref)
            mag = np.abs(ref)
            tgt = np.zeros_like(ref, dtype=bool)
            tgt[np.arange(N), y] = True
            a_y = ref[np.arange(N), y] * N + 1.0
            tmask = tgt & (a_y <= 1 / 3)[:, None]
            nmask = ~tgt & (mag >= 1e-3 * mag.max())
            for kind, m in (("target", tmask), ("non-target", nmask)):
                v = rel[m]
                if v.size:
                    out[(prec, scale, kind)] = (float(np.median(v)), float(np.quantile(v, 0.9)),
                                                float(v.max()), int(v.size))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1500, help="random correct configurations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bug-seeds", type=int, default=5)
    ap.add_argument("--one-percent", type=int, default=150, help="problems per dtype for the 1%% bug")
    ap.add_argument("--f16", type=int, default=40, help="problems per size for the f16 detection table")
    args = ap.parse_args(argv)

    print("== correct implementations: worst |got - ref| / allowed (must be < 1) ==")
    worst, by_class, failures, ncfg, dt = sweep_correct(args.n, args.seed)
    print(f"{ncfg} configurations in {dt:.0f} s")
    print("  per check (worst entry of each report):")
    for (prec, name), (r, cfg) in sorted(worst.items()):
        print(f"    {prec:4s} {name:20s} worst {r:9.3g}   at {cfg}")
    print("  per entry class (regular: the floor factor k governs; argmax: the row's largest logit;")
    print("  subnormal: |ref| < 8 x smallest normal, the `tiny` term governs):")
    for (prec, name, big_q), (r, cfg) in sorted(by_class.items()):
        q = "Q*scale>1 " if big_q else "Q*scale<=1"
        print(f"    {prec:4s} {name:9s} {q} worst {r:9.3g}   at {cfg}")
    print(f"  false alarms: {len(failures)} of {ncfg}")
    counts = defaultdict(int)
    for cfg, causes, _text in failures:
        counts[(PRECISION_OF[cfg["config"]], tuple(causes))] += 1
    for (prec, causes), k in sorted(counts.items()):
        print(f"    {prec}: {k} configurations, entries over the line: {', '.join(causes) or '?'}")
    shown = set()
    for cfg, causes, text in failures:
        key = (PRECISION_OF[cfg["config"]], tuple(causes))
        if key in shown:
            continue
        shown.add(key)
        print("   ", cfg, causes)
        print("      " + text.replace("\n", "\n      "))
        print("      repro:", repro(cfg))

    print("\n== bug zoo: smallest worst-ratio over seeds (must be > 1) ==")
    bugs = sweep_bugs(range(1, 1 + args.bug_seeds))
    for (name, config), (lo, s, missed) in sorted(bugs.items()):
        flag = f"  MISSED seeds {missed}" if missed else ""
        print(f"  {name:42s} {config:9s} min ratio {lo:10.4g} (seed {s}){flag}")

    print("\n== one entry x 1.01 (f32, f64): ratio at the entry (must be > 1) ==")
    print("   (cancellation = (a + q)/|a - q|: a target entry with p_y near 1 is a - 1 ~ 0, where a")
    print("    correct implementation's own error exceeds 1% once cancellation >~ 1e-2/(eps*|lse|))")
    for dtype in (np.float32, np.float64):
        res = one_percent(args.one_percent, args.seed + 1, dtype)
        for kind, rows in res.items():
            for lab, sel in (("cancel<=2", [t for t in rows if t[2] <= 2.0]),
                             ("cancel>2", [t for t in rows if t[2] > 2.0])):
                if not sel:
                    continue
                ratios = [t[0] for t in sel]
                missed = [t for t in sel if not t[1]]
                print(f"  {np.dtype(dtype).name:8s} {kind:8s} {lab:10s} n={len(sel):4d} "
                      f"min ratio {min(ratios):10.4g} median {float(np.median(ratios)):10.4g} "
                      f"missed {len(missed)}")
                for t in missed[:3]:
                    print(f"     missed: ratio {t[0]:.3g} cancellation {t[2]:.3g} {t[3]}")

    print("\n== detection threshold: relative error allowed/|ref| an entry needs to be flagged ==")
    print("   (256 x 1000, mean, N(0, scale^2) logits; median / 90th percentile / max over entries)")
    th = detection_thresholds(args.seed + 3)
    for (prec, scale, kind), (med, p90, mx, n) in sorted(th.items()):
        print(f"  {prec:4s} scale {scale:5g} {kind:10s} median {med:9.3g}  p90 {p90:9.3g}  "
              f"max {mx:9.3g}  (n={n})")

    print("\n== float16: detection rate of one entry off by a relative error ==")
    table = f16_detection(args.f16, args.seed + 2)
    rels = sorted({k[2] for k in table})
    for label in ("f32->f16", "f16"):
        for kind in ("target", "typical", "largest"):
            cells = []
            for rel in rels:
                d, t = table.get((label, kind, rel), (0, 0))
                cells.append(f"{rel:>6.1%}:{d:3d}/{t:<3d}")
            print(f"  {label:9s} {kind:8s} " + "  ".join(cells))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
