"""Run `ce_cli.check_grad` on real-framework gradients (written by *_cases.py) and report the
margins both ways: on the correct gradients the largest |err|/allowed of every check (a false
alarm is a failed check), and on planted bugs the smallest (a miss is a passing check).

    python scripts/frameworks/calibrate.py DATADIR [DATADIR ...] [--plant] [--jsonl OUT]

Runs in the project's venv; needs only numpy and ce_cli.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

import ce_cli


def load_case(path: str) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta").reshape(-1)[0]))
    return arrays, meta


def check(arrays: dict, meta: dict, grad: np.ndarray, loss) -> ce_cli.Report:
    opts = dict(meta["ce_check"])
    weight = opts.pop("weight", None)
    if weight is not None or "weight" in arrays:
        weight = arrays.get("weight")
    return ce_cli.check_grad(arrays["logits"], arrays["labels"], grad=grad, loss=loss,
                             weight=weight, fd="off", **opts)


def ratios(report: ce_cli.Report) -> dict[str, float]:
    out = {}
    for c in report.checks:
        worst = max((e.abs_err / e.allowed if e.allowed > 0 else float("inf")
                     for e in c.worst), default=0.0)
        out[c.name] = worst if c.ok or worst > 1 else float("inf")
    return out


def plants(arrays: dict, meta: dict):
    """Planted bugs on a correct gradient: every row x (1 + 2e-3); one entry x 1.01 (the
    largest positive entry of the first row that is not ignored)."""
    g = arrays["grad"].astype(np.float64)
    axis = meta["ce_check"].get("class_axis", -1)
    yield "rows_x_1.002", (g * 1.002).astype(arrays["grad"].dtype)
    moved = np.moveaxis(g, axis, -1).copy()
    rows = moved.reshape(-1, moved.shape[-1])
    row = rows[int(np.argmax((rows > 0).any(axis=1)))]
    c = int(np.argmax(np.where(row > 0, row, -np.inf)))
    row[c] *= 1.01
    yield "entry_x_1.01", np.moveaxis(moved, -1, axis).astype(arrays["grad"].dtype)


def _finite(obj):
    """JSON without bare inf/NaN: non-finite numbers become null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--plant", action="store_true")
    ap.add_argument("--jsonl")
    args = ap.parse_args()
    paths = sorted(p for d in args.dirs for p in glob.glob(os.path.join(d, "**", "*.npz"),
                                                            recursive=True))
    out = open(args.jsonl, "w") if args.jsonl else None
    worst_ok, alarms, misses, min_bug = 0.0, [], [], float("inf")
    overflows: list[str] = []
    for path in paths:
        arrays, meta = load_case(path)
        with np.errstate(all="ignore"):
            report = check(arrays, meta, arrays["grad"], arrays["loss"])
        r = ratios(report)
        if not np.isfinite(arrays["loss"]).all() and np.isfinite(report.loss):
            overflows.append(os.path.basename(path))  # the framework's own loss overflowed
        elif not report.ok:
            alarms.append((os.path.basename(path), {k: v for k, v in r.items() if v > 1}))
        else:
            worst_ok = max(worst_ok, max(r.values(), default=0.0))
        rec = {"case": path, "ok": report.ok, "ratios": r}
        if args.plant and meta.get("framework") == "torch" and meta.get("dtype") == "f32":
            for name, bad in plants(arrays, meta):
                with np.errstate(all="ignore"):
                    rb = check(arrays, meta, bad, None)
                grad_ratio = ratios(rb).get("grad_vs_reference", 0.0)
                rec[name] = grad_ratio
                if rb.ok:
                    misses.append((os.path.basename(path), name))
                else:
                    min_bug = min(min_bug, grad_ratio)
        if out:
            out.write(json.dumps(_finite(rec), allow_nan=False, default=str) + "\n")
    print(f"{len(paths)} correct framework gradients: {len(alarms)} false alarms; "
          f"largest |err|/allowed among passing cases {worst_ok:.3g}")
    for name, bad in alarms[:40]:
        print("  FALSE ALARM", name, bad)
    if overflows:
        print(f"{len(overflows)} cases where the framework's own loss is inf/NaN (rightly failed), "
              f"e.g. {overflows[0]}")
    if args.plant:
        print(f"planted bugs: {len(misses)} missed; smallest |err|/allowed of a caught bug {min_bug:.3g}")
        for name, kind in misses[:40]:
            print("  MISSED", name, kind)
    return 1 if alarms or misses else 0


if __name__ == "__main__":
    sys.exit(main())
