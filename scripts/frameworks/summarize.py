"""Tables (markdown) from measure.py's JSON lines.

    python summarize.py MEASURE.jsonl [MORE.jsonl ...] > tables.md
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict


def load(paths):
    rows = []
    for p in paths:
        for line in open(p):
            r = json.loads(line)
            if "error" in r:
                print(f"<!-- error: {r['case']}: {r['error']} -->")
                continue
            rows.append(r)
    return rows


def fmt(x, d=3):
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, (int,)) or (isinstance(x, float) and x == int(x) and abs(x) < 1e6):
        return str(int(x))
    return f"{x:.{d}g}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(out)


def main():
    rows = load(sys.argv[1:])
    print(f"{len(rows)} cases measured\n")

    # 1. row factor vs C (every case: base and variants), per framework/call/dtype/layout
    print("## Row factor f: max |f| over rows and scales, by C\n")
    groups = defaultdict(list)
    for r in rows:
        if r.get("max_abs_f") is None:
            continue
        adv = " adversarial" if (r.get("variant") or "").startswith("adv") else ""
        groups[(r["framework"], r["call_tag"], r["dtype"], r["layout"] + adv)].append(r)
    for key in sorted(groups):
        byC = defaultdict(list)
        for r in groups[key]:
            byC[r["C"]].append(r)
        out = []
        for C in sorted(byC):
            best = max(byC[C], key=lambda r: r["max_abs_f"])
            eps = best["eps"]
            f = best["max_abs_f"]
            signs = {(1 if (x["f_min"] or 0) >= 0 else -1) if (x["f_max"] or 0) >= 0 else -1 for x in byC[C]
                     if x["f_min"] is not None}
            out.append([C, f, f / eps, f / (eps * C), f / (eps * math.sqrt(C)), f / (eps * math.log2(C)),
                        f"s{best['scale']:g} {best['reduction']} {best['variant'] or ''}".strip(),
                        f"{min(x['f_min'] for x in byC[C]):.2g}..{max(x['f_max'] for x in byC[C]):.2g}",
                        len(byC[C])])
        print(f"### {' / '.join(key)}\n")
        print(table(["C", "max|f|", "/eps", "/(eps C)", "/(eps sqrt C)", "/(eps log2 C)", "worst case",
                     "f range", "cases"], out))
        print()

    # 2. residual after f, target entries
    print("## Residual after removing f (units of eps*|g_ref|, non-target entries with normal |g_ref|) "
          "and target entries\n")
    out = []
    g2 = defaultdict(list)
    for r in rows:
        g2[(r["framework"], r["dtype"], r["layout"], r["target"])].append(r)

    def mx(rs, k):
        v = [x[k] for x in rs if x.get(k) is not None]
        return max(v) if v else None
    for key in sorted(g2):
        rs = g2[key]
        out.append(list(key) + [len(rs), mx(rs, "raw_rel_eps_max"), mx(rs, "resid_eps_max"),
                                mx(rs, "resid_eps_p999"), mx(rs, "resid_over_1plogp_max"),
                                mx(rs, "target_err_over_epsA_max"), mx(rs, "target_err_over_epsA_after_f_max"),
                                mx(rs, "target_rel_eps_max_py_le_half"),
                                sum(x.get("target_zero_where_ref_nonzero", 0) for x in rs)])
    print(table(["framework", "dtype", "layout", "targets", "cases", "raw rel/eps max", "resid/eps max",
                 "resid/eps p99.9", "resid/(eps(1+|log p|)) max", "target |err|/(eps A)", "same after f",
                 "target rel/eps (p_y<=.5)", "target 0 where ref != 0"],
                out))
    print()

    # 3. flush to zero
    print("## Flush to zero (reference |g| in [smallest subnormal, smallest normal))\n")
    g3 = defaultdict(lambda: [0, 0, 0, 0, 0])
    for r in rows:
        k = (r["framework"], r["dtype"], r["scale"])
        a = g3[k]
        a[0] += 1
        a[1] += r["ftz_sub_ref"]
        a[2] += r["ftz_zero_where_sub"]
        a[3] += r["nonzero_where_sub"]
        a[4] += r["zero_where_normal"]
    print(table(["framework", "dtype", "std", "cases", "ref subnormal", "returned 0", "returned nonzero",
                 "0 where ref >= normal"], [list(k) + v for k, v in sorted(g3.items())]))
    print()

    # 4. verdicts
    print("## Today's verdicts (fd off)\n")
    g4 = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        k = (r["framework"], r["dtype"])
        g4[k][0] += 1
        g4[k][1] += (not r["checks"]["grad_vs_reference"]["ok"])
        g4[k][2] += ("loss" in str(r["checks"].keys()) and not all(
            v["ok"] for n, v in r["checks"].items() if n != "grad_vs_reference"))
    print(table(["framework", "dtype", "cases", "grad check fails", "loss check fails"],
                [list(k) + v for k, v in sorted(g4.items())]))
    print()
    print("### Every failing case, with what makes it pass\n")
    out = []
    for r in sorted(rows, key=lambda r: r["case"]):
        bad = [n for n, v in r["checks"].items() if not v["ok"]]
        if not bad:
            continue
        gv = r["checks"]["grad_vs_reference"]
        at = r.get("attribution", {})
        cause = "-"
        if not gv["ok"]:
            if at.get("minus_f", {}).get("ok"):
                cause = "row factor"
            elif at.get("ftz_restored", {}).get("ok"):
                cause = "FTZ"
            elif at.get("minus_f_and_ftz", {}).get("ok"):
                cause = "row factor + FTZ"
            else:
                cause = "OTHER (ratio after both fixes %.3g)" % at.get("minus_f_and_ftz", {}).get("ratio", float("nan"))
        lossinfo = ", ".join(f"{n} {r['checks'][n]['ratio']:.3g}" for n in bad if n != "grad_vs_reference")
        out.append([r["case"], ", ".join(bad), gv["ratio"], gv["mismatches"], cause,
                    "target" if r.get("worst_is_target") else "", lossinfo or ""])
    print(table(["case", "failed", "grad ratio", "grad mismatches", "grad cause", "worst entry", "other checks (ratio)"],
                out))


if __name__ == "__main__":
    main()
