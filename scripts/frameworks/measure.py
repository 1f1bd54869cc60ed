"""Measure real-framework gradients (written by *_cases.py) against ce-check's float64 reference.

    python measure.py OUTJSONL DATADIR [DATADIR ...] [--plant] [--fd MODE]

Runs in the project's venv (public API only: ce_cli.check_grad, ce_cli.reference). Per case:
today's verdict per check (and max |err|/allowed), the per-row common relative factor f of the
softmax term (g_user ~ g_ref + f * A_n * p_c), the residual after removing it (in eps * |g_ref|),
the target entry's error, flush-to-zero counts, and when a check fails whether removing the row
factor and/or restoring flushed subnormals makes it pass (attribution). One JSON line per case.
`--plant` adds planted bugs on float32 PyTorch cases (rows x (1 + 2e-3), one entry x 1.01, one
row's softmax term x (1 + 20 * max measured |f|) and x (1 + twice the smallest factor ce-check
must flag: its normaliser bound or, where larger, the row's entry-wise floor)),
on rows that are not ignored. `--fd` is check_grad's finite-difference mode
(default off: the verdicts of the reference comparisons alone); each line records the mode that
ran and the kernel (`options.kernel`).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np

import ce_cli

EPS = {"f16": 2.0 ** -10, "bf16": 2.0 ** -7, "f32": 2.0 ** -23, "f64": 2.0 ** -52}
SUBMIN = {"f16": 2.0 ** -24, "bf16": 2.0 ** -133, "f32": 2.0 ** -149, "f64": 2.0 ** -1074}
NORMAL = {"f16": 2.0 ** -14, "bf16": 2.0 ** -126, "f32": 2.0 ** -126, "f64": 2.0 ** -1022}
STORE = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
ORDER = ["f16", "bf16", "f32", "f64"]
FD = "off"  # check_grad's `fd`, set by --fd


def compared_precision(grad_dtype, precision):
    """ce-check's rule: the coarser of storage and declared precision."""
    s = STORE[np.dtype(grad_dtype)]
    p = precision or s
    return min(s, p, key=ORDER.index)


def to_rows(a, axis):
    if axis in (-1, a.ndim - 1):
        return a.reshape(-1, a.shape[-1])
    b = np.moveaxis(a, axis, -1)
    return b.reshape(-1, b.shape[-1])


def labels_rows(y, axis, ndim_logits):
    if y.ndim == ndim_logits:  # probability targets
        return to_rows(y, axis)
    return y.reshape(-1)


def softmax_terms(z, y, w, opts):
    """A_n * p_c (the softmax term of the gradient) and B_nc (the target term): g = A p - B."""
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    p = e / e.sum(axis=1, keepdims=True)
    R, C = z.shape
    eps_s = float(opts["label_smoothing"])
    wv = np.ones(C) if w is None else w.astype(np.float64)
    red = opts["reduction"]
    if y.ndim == 2:  # probability targets
        t = (1 - eps_s) * y.astype(np.float64) + eps_s / C
        D = R if red == "mean" else 1.0
        A = (t * wv).sum(axis=1) / D
        B = wv * t / D
        valid = np.ones(R, bool)
    else:
        valid = y != opts["ignore_index"]
        ys = np.where(valid, y, 0)
        wy = np.where(valid, wv[ys], 0.0)
        D = wy.sum() if red == "mean" else 1.0
        A = np.where(valid, (1 - eps_s) * wy + eps_s / C * wv.sum(), 0.0) / D
        B = np.zeros((R, C))
        B += (eps_s / C) * wv[None, :] * valid[:, None] / D
        B[np.arange(R), ys] += np.where(valid, (1 - eps_s) * wy, 0.0) / D
    return A[:, None] * p, B, valid


def verdict(rep):
    out = {}
    for ch in rep.checks:
        ratio = (ch.worst[0].abs_err / ch.worst[0].allowed) if ch.worst and ch.worst[0].allowed > 0 else (
            math.inf if ch.worst and ch.worst[0].abs_err > 0 else 0.0)
        out[ch.name] = dict(ok=bool(ch.ok), ratio=float(ratio), mismatches=int(ch.mismatches),
                            total=int(ch.total),
                            worst_index=list(ch.worst[0].index) if ch.worst else None)
    return out


def run_check(logits, labels, grad, loss, weight, opts):
    kw = dict(opts)
    kw.pop("weight", None)
    return ce_cli.check_grad(logits, labels, grad=grad, loss=loss, weight=weight, fd=FD, worst=1, **kw)


def analyse(logits, labels, grad, loss, weight, opts, *, attribute=True):
    axis = opts["class_axis"]
    prec = compared_precision(grad.dtype, opts.get("precision"))
    eps, tinyn = EPS[prec], NORMAL[prec]
    t0 = time.time()
    rep = run_check(logits, labels, grad, loss, weight, opts)
    res = dict(ok=bool(rep.ok), checks=verdict(rep), eps=eps, compared=prec,
               kernel=rep.options.get("kernel"), fd_mode=rep.fd_mode)
    ref = ce_cli.reference(logits, labels, weight=weight, reduction=opts["reduction"],
                           ignore_index=opts["ignore_index"], label_smoothing=opts["label_smoothing"],
                           class_axis=axis)
    g_ref = to_rows(np.asarray(ref.grad, np.float64), axis)
    g = to_rows(grad.astype(np.float64), axis)
    z = to_rows(logits.astype(np.float64), axis)
    y = labels_rows(labels, axis, logits.ndim)
    P, B, valid = softmax_terms(z, y, weight, opts)
    R, C = g.shape
    # sanity: g_ref == P - B
    scale = np.abs(g_ref).max() or 1.0
    res["model_resid"] = float(np.abs(g_ref - (P - B)).max() / scale)
    index_targets = y.ndim == 1
    tgt_mask = np.zeros((R, C), bool)
    if index_targets:
        tgt_mask[np.arange(R)[valid], y[valid]] = True
    meaningful = (~tgt_mask) & (P >= 2 * np.abs(B)) & (P >= 4 * tinyn) & valid[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (g - g_ref) / P
    f = np.full(R, np.nan)
    nmean = meaningful.sum(axis=1)
    for i in np.nonzero(nmean >= 3)[0]:
        f[i] = np.median(r[i, meaningful[i]])
    res["rows"] = int(R)
    res["rows_with_f"] = int(np.isfinite(f).sum())
    fin = f[np.isfinite(f)]
    res["max_abs_f"] = float(np.abs(fin).max()) if fin.size else None
    res["f_min"] = float(fin.min()) if fin.size else None
    res["f_max"] = float(fin.max()) if fin.size else None
    res["max_abs_f_eps"] = res["max_abs_f"] / eps if fin.size else None
    f0 = np.where(np.isfinite(f), f, 0.0)
    # residual after removing f, on entries with |g_ref| normal (non-target, meaningful)
    big = meaningful & (np.abs(g_ref) >= 4 * tinyn)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.abs(g - g_ref) / (eps * np.abs(g_ref))
        resid = np.abs(g - g_ref - f0[:, None] * P) / (eps * np.abs(g_ref))
    res["raw_rel_eps_max"] = float(raw[big].max()) if big.any() else None
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(np.maximum(P / np.maximum(P.sum(axis=1, keepdims=True), 1e-300), 1e-320))
        resid_fl = resid / (1.0 + np.abs(logp))
    res["resid_over_1plogp_max"] = float(resid_fl[big].max()) if big.any() else None
    res["resid_eps_max"] = float(resid[big].max()) if big.any() else None
    res["resid_eps_p999"] = float(np.quantile(resid[big], 0.999)) if big.any() else None
    res["n_resid_entries"] = int(big.sum())
    # target entries: |err| / (eps * A_n) (no cancellation issue), before and after removing f * A p_y;
    # relative error only where p_y <= 0.5 (a_y - 1 does not cancel)
    if index_targets and valid.any():
        rows_v = np.arange(R)[valid]
        gy, gry = g[rows_v, y[valid]], g_ref[rows_v, y[valid]]
        Av = P[rows_v].sum(axis=1)  # A_n
        py = P[rows_v, y[valid]] / Av
        e_t = np.abs(gy - gry) / (eps * Av)
        e_tf = np.abs(gy - gry - f0[rows_v] * P[rows_v, y[valid]]) / (eps * Av)
        res["target_err_over_epsA_max"] = float(e_t.max())
        res["target_err_over_epsA_after_f_max"] = float(e_tf.max())
        lo = py <= 0.5
        res["target_rel_eps_max_py_le_half"] = float((np.abs(gy - gry)[lo] / (eps * np.abs(gry[lo]))).max()) if lo.any() else None
        res["target_zero_where_ref_nonzero"] = int(((gy == 0) & (gry != 0)).sum())
    # flush to zero
    # subnormal range where a correctly rounded result is nonzero (|ref| >= smallest subnormal)
    sub = (np.abs(g_ref) < tinyn) & (np.abs(g_ref) >= SUBMIN[prec])
    res["ftz_sub_ref"] = int(sub.sum())
    res["ftz_zero_where_sub"] = int((sub & (g == 0)).sum())
    res["zero_where_normal"] = int(((np.abs(g_ref) >= tinyn) & (g == 0) & ~tgt_mask).sum())
    res["nonzero_where_sub"] = int((sub & (g != 0)).sum())
    # attribution of failures
    if attribute and not _grad_ok(res):
        fixes = {}
        g_f = g - f0[:, None] * P
        flushed = (np.abs(g_ref) < tinyn) & (g == 0)
        g_z = np.where(flushed, g_ref, g)
        g_fz = np.where(flushed, g_ref, g_f)
        for name, arr in (("minus_f", g_f), ("ftz_restored", g_z), ("minus_f_and_ftz", g_fz)):
            back = from_rows(arr, grad.shape, axis).astype(grad.dtype)
            rr = run_check(logits, labels, back, loss, weight, opts)
            v = verdict(rr)
            fixes[name] = dict(ok=v["grad_vs_reference"]["ok"], ratio=v["grad_vs_reference"]["ratio"],
                               mismatches=v["grad_vs_reference"]["mismatches"])
        res["attribution"] = fixes
        # where is the worst failing entry: target or not
        wi = res["checks"]["grad_vs_reference"]["worst_index"]
        if wi is not None and index_targets:
            row, col = flat_row_col(wi, grad.shape, axis)
            res["worst_is_target"] = bool(valid[row] and y[row] == col)
            res["worst_ref"] = float(g_ref[row, col])
            res["worst_got"] = float(g[row, col])
    res["seconds"] = round(time.time() - t0, 2)
    res["_f"] = f
    res["_P"] = P
    res["_B"] = B
    return res


def _grad_ok(res):
    c = res["checks"].get("grad_vs_reference")
    return c is None or c["ok"]


def from_rows(a, shape, axis):
    if axis in (-1, len(shape) - 1):
        return a.reshape(shape)
    moved = list(shape)
    C = moved.pop(axis)
    b = a.reshape(tuple(moved) + (C,))
    return np.moveaxis(b, -1, axis)


def flat_row_col(index, shape, axis):
    index = list(index)
    if axis in (-1, len(shape) - 1):
        col = index[-1]
        rest, rshape = index[:-1], shape[:-1]
    else:
        col = index.pop(axis)
        rest = index
        rshape = tuple(s for i, s in enumerate(shape) if i != axis)
    row = int(np.ravel_multi_index(tuple(rest), rshape)) if rest else 0
    return row, col


def load(path):
    d = np.load(path)
    meta = json.loads(str(d["meta"][0]))
    opts = dict(meta["ce_check"])
    weight = d["weight"].astype(np.float64) if "weight" in d.files else None
    loss = d["loss"]
    return meta, d["logits"], d["labels"], d["grad"], loss, weight, opts


def plant(paths, max_f_by_key, out):
    """Planted bugs on float32 PyTorch gradients."""
    for path in paths:
        meta, z, y, g, loss, w, opts = load(path)
        base = analyse(z, y, g, loss, w, opts, attribute=False)
        axis = opts["class_axis"]
        key = (meta["framework"], meta["dtype"], meta["layout"])
        fmax = max(max_f_by_key.get(key, 0.0), base["max_abs_f"] or 0.0)
        gr = to_rows(g.astype(np.float64), axis)
        P = base["_P"]
        R, C = gr.shape
        rng = np.random.default_rng(0)
        bugs = {}
        a = gr * (1 + 2e-3)
        bugs["rows_x(1+2e-3)"] = (a, 2e-3)
        b = gr.copy()
        live = np.abs(gr).max(axis=1) > 0  # an ignored row's zeros stay zero under any factor
        rr = next_live(live, int(rng.integers(R)))
        cc = int(np.argmax(np.abs(b[rr]) * (np.arange(C) != (y.reshape(-1)[rr] if y.ndim < z.ndim else -1))))
        b[rr, cc] *= 1.01
        bugs["one_entry_x1.01"] = (b, 0.01)
        c = gr.copy()
        rr2 = int(np.nanargmax(np.abs(base["_f"])) if np.isfinite(base["_f"]).any() else 0)
        rr2 = next_live(live, (rr2 + 1) % R)
        c[rr2] += 20 * fmax * P[rr2]
        bugs[f"row{rr2}_softmax_term_x(1+20*{fmax:.3g})"] = (c, 20 * fmax)
        z_row = to_rows(z.astype(np.float64), axis)[rr2]
        over = 2 * caught_factor(z_row, P[rr2], base["_B"][rr2], base["eps"])
        e = gr.copy()
        e[rr2] += over * P[rr2]
        bugs[f"row{rr2}_softmax_term_x(1+2*flagged={over:.3g})"] = (e, over)
        for name, (arr, planted) in bugs.items():
            back = from_rows(arr, g.shape, axis).astype(np.float32)
            res = analyse(z, y, back, loss, w, opts, attribute=False)
            row = dict(case=os.path.basename(path), bug=name, planted=planted, measured_max_f_correct=fmax,
                       ok=res["ok"], checks=res["checks"], kernel=res["kernel"], fd_mode=res["fd_mode"],
                       fitted_max_abs_f=res["max_abs_f"],
                       resid_eps_max=res["resid_eps_max"])
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"PLANT {os.path.basename(path)} {name}: ok={res['ok']} "
                  f"ratio={res['checks']['grad_vs_reference']['ratio']:.3g} fitted|f|={res['max_abs_f']}")


def caught_factor(z_row, P_row, B_row, eps, k=4.0):
    """The smallest row factor f on the softmax term that ce-check must flag: beyond its
    normaliser bound eps (0.5 (C - 1) + k) (verify/allowance.py) and beyond the entry-wise floor
    k eps (P (1 + |log a| + |lse|) + |B|) of the row's easiest entry."""
    m = z_row.max()
    lse = m + np.log(np.exp(z_row - m).sum())
    usable = P_row > 4 * NORMAL["f32"]
    with np.errstate(divide="ignore"):
        f_entry = k * eps * (P_row * (1 + np.abs(z_row - lse) + abs(lse)) + np.abs(B_row)) / P_row
    easiest = f_entry[usable].min() if usable.any() else np.inf
    return max(eps * (0.5 * (z_row.size - 1) + k), easiest)


def next_live(live, start):
    """The first row at or after `start` (cyclically) whose gradient is not all zero."""
    rows = np.nonzero(np.roll(live, -start))[0]
    return (start + int(rows[0])) % live.size if rows.size else start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", help="JSON lines file to write")
    ap.add_argument("datadirs", nargs="+")
    ap.add_argument("--only", default="")
    ap.add_argument("--plant", nargs="*", default=None,
                    help="npz files to plant bugs on (float32 torch); measured max |f| from OUT's cases")
    ap.add_argument("--fd", default="off", help="check_grad's finite-difference mode (default off)")
    args = ap.parse_args()
    global FD
    FD = args.fd
    if args.plant is not None:
        fmax = {}
        if os.path.exists(args.out):
            for line in open(args.out):
                r = json.loads(line)
                if r.get("max_abs_f") is not None and "framework" in r:
                    k = (r["framework"], r["dtype"], r["layout"])
                    fmax[k] = max(fmax.get(k, 0.0), r["max_abs_f"])
        with open(args.out.replace(".jsonl", "") + "_plant.jsonl", "w") as out:
            plant(args.plant, fmax, out)
        return
    paths = sorted(p for d in args.datadirs for p in glob.glob(os.path.join(d, "*.npz")) if args.only in p)
    print(f"ce_cli from {os.path.dirname(ce_cli.__file__)}; {len(paths)} cases", file=sys.stderr)
    with open(args.out, "w") as out:
        for i, path in enumerate(paths):
            meta, z, y, g, loss, w, opts = load(path)
            try:
                res = analyse(z, y, g, loss, w, opts)
            except Exception as e:
                res = dict(error=f"{type(e).__name__}: {e}")
            for k in ("_f", "_P", "_B"):
                res.pop(k, None)
            row = dict(case=os.path.basename(path)[:-4], **{k: meta.get(k) for k in (
                "framework", "version", "call", "call_tag", "dtype", "layout", "C", "scale", "reduction",
                "variant", "target")}, shape=list(g.shape), opts=opts, **res)
            out.write(json.dumps(row) + "\n")
            out.flush()
            gv = res.get("checks", {}).get("grad_vs_reference", {})
            print(f"[{i + 1}/{len(paths)}] {row['case']}: ok={res.get('ok')} grad_ratio={gv.get('ratio', float('nan')):.3g} "
                  f"max|f|/eps={res.get('max_abs_f_eps')} ftz={res.get('ftz_zero_where_sub')} {res.get('error', '')}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
