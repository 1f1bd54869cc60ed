"""PaddlePaddle's own cross_entropy and binary_cross_entropy_with_logits on CPU, differentiated
by paddle.grad, for ce-check's options (runs in a venv with paddlepaddle and numpy; --check runs
in ce-check's own environment).

    python paddle_cases.py OUTDIR [--small] [--only SUBSTR] [--fixtures] [--old]
    python paddle_cases.py OUTDIR --check

What Paddle 3.3.1 computes (python/paddle/nn/functional/loss.py, read, not guessed), and the
ce-check options that express it:

- `cross_entropy(z, y, reduction="mean")` with the default ignore_index -100: the sum over the
  non-ignored rows divided by N, every row (`mean_all`; the count of valid rows is taken only
  when ignore_index >= 0: Paddle#48663, PR #76033 open) -> reduction sum, denominator N;
- with ignore_index k >= 0 the mean is over the rows whose label is not k -> ignore_index k;
- `weight=w`: each row's loss times w_y (0 on ignored rows), `mean` divided by the sum of
  w_y over the non-ignored rows -> weight w (PyTorch's weighted mean);
- `soft_label=True` (t probability rows): -sum_c t_c log a_c; with `weight=w` the row's loss
  times (t . w) (not PyTorch's sum_c w_c t_c (-log a_c)), `mean` divided by sum_n t_n . w
  -> sample_weight t . w (Paddle's float32 value), reduction sum, denominator its sum;
- `label_smoothing=e`: the labels one-hot, smoothed by label_smooth to (1 - e) y + e/C (no prior
  distribution is passed), then the soft-label path -> label_smoothing e (PyTorch's form); with
  `weight` as soft labels: sample_weight (1 - e) w_y + e/C sum w, denominator its sum. Labels
  -100 cannot be smoothed (one_hot refuses them). With ignore_index k >= 0 the mean counts
  the smoothed label entries != k: every row is kept (the ignored ones too) and the sum is
  divided by N C (released bug, `smooth_ign0`) -> label_smoothing e, reduction sum,
  denominator N C;
  At float64 the smoothed targets are float32's, so a row sums to 1 +- 5e-8, and the
  soft-label backward is softmax - t (the derivative of its loss only when the row sums to 1):
  the gradient is off its own loss's derivative by that factor, and ce-check at f64 says so
  (`grad_p_minus_t`; probability labels = Paddle's smoothed targets);
- `axis=1` on (N, C, d) logits -> class_axis 1;
- CPU kernels: float32 and float64 only (float16 and bfloat16 are not registered for
  cross_entropy_with_softmax nor sigmoid_cross_entropy_with_logits on CPU; AMP keeps the loss
  in float32). The softmax clips z - max at -64, so a row's loss is at most 64 + log C where
  the true loss is larger (Paddle#20994): the loss check fails there, rightly; the gradient
  reads e^-64 / S where the exact entry is below it (1.6e-28 for 1e-46), which ce-check's
  per-entry comparison flags unless `atol` allows e^-64 times the row factor (set here);
- its pos_weight BCE backward has an absolute error of ~eps at very negative logits (2.8e-17
  for an entry of 2.1e-15 at z = -33.8 in float64; float32 entries below ~eps read 0): `atol`
  2 eps times the row factor (set here). Its BCE mean/sum adds the n = R C terms with a
  serial-sum error (~sqrt(n) eps: 1.3e-5 relative at n = 256,000 in float32), above the loss
  allowance at C = 32,000;
- `binary_cross_entropy_with_logits(z, y, weight, reduction, pos_weight)`: PyTorch's
  BCEWithLogitsLoss (pos_weight turned into 1 + (pw - 1) y), `mean` over every element ->
  binary, weight, pos_weight.

`use_softmax=False` (the input already probabilities) is out of scope: ce-check checks losses of
logits.

Cases: float32 and float64, std 1, 10, 30, C 10, 1,000, 32,000, at most 2^17 logits (--small:
2^14), at least 8 rows, ~15 % of the labels ignored where the variant ignores. Cases whose
check needs an array the generic test does not pass (class weights, pos_weight) or whose loss
Paddle clips go to OUTDIR/own/. float32 cases hold planted bugs `grad_bug_<name>` (Paddle's
code with one thing changed, differentiated by paddle.grad): `row1001` one row's loss x 1.001,
`allrows` the mean over every row instead of the non-ignored ones, `valid` PR #76033's fix
(against Paddle's own /N), `nosmooth` the smoothing dropped, `weight1` one class weight x 1.5,
`nopw` pos_weight dropped.

`--old` (in a venv with another release, e.g. paddlepaddle 2.6.2): `mean_ign`, `smooth_ign0`
and `none` in float32, named paddle<version>_..., all in OUTDIR/own/ (meta `legacy`). 2.6.2
divides the default mean by the non-ignored rows (PyTorch's: the 3.x /N is a regression of
the #48663 fix, PR #48974), keeps the ignored rows with smoothing and ignore_index >= 0 and
divides by N (3.3.1: N C), and clips at 64 as 3.3.1.

`--check` runs ce_cli.check_grad / check_binary on every case in OUTDIR (and own/) on both
kernels (default and CE_CHECK_FUSED=0): false alarms, planted bugs missed, Paddle's released
bugs (`meta.released`) caught against the semantics users expect.
fixtures/frameworks_semantics/paddle/ (tests/test_semantic_frameworks.py,
tests/test_paddle_real.py): `--small --fixtures`, without the .json files.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NP: dict[str, type[np.floating]] = {"f32": np.float32, "f64": np.float64}
EPS_LS = 0.1
# variant -> (family, ce-check reduction, layout, target)
VARIANTS = {
    "none": ("ce", "none", "nc", "index"), "sum": ("ce", "sum", "nc", "index"),
    "mean_ign": ("ce", "sum", "nc", "index"), "mean_ign0": ("ce", "mean", "nc", "index"),
    "axis1_ign255": ("ce", "mean", "ncd", "index"), "weight": ("ce", "mean", "nc", "index"),
    "weight_sum": ("ce", "sum", "nc", "index"), "soft": ("ce", "mean", "nc", "prob"),
    "soft_weight": ("ce", "sum", "nc", "prob"), "smooth": ("ce", "mean", "nc", "index"),
    "smooth_weight": ("ce", "sum", "nc", "index"), "smooth_ign0": ("ce", "sum", "nc", "index"),
    "neginf": ("ce", "mean", "nc", "index"),
    "bce": ("bce", "mean", "nc", "binary"), "bce_sum": ("bce", "sum", "nc", "binary"),
    "bce_weight": ("bce", "mean", "nc", "binary"), "bce_pw": ("bce", "mean", "nc", "binary"),
}
SCALES = (1.0, 10.0, 30.0)
BUGS = {"mean_ign": ("valid",), "mean_ign0": ("allrows",), "axis1_ign255": ("allrows",),
        "weight": ("weight1",), "weight_sum": ("weight1",), "soft_weight": ("weight1",),
        "smooth": ("nosmooth",), "smooth_weight": ("nosmooth", "weight1"), "bce_pw": ("nopw",),
        "bce_weight": ("weight1",)}
IGNORE = {"sum": -100, "mean_ign": -100, "mean_ign0": 0, "axis1_ign255": 255, "weight": -100,
          "weight_sum": -100, "smooth_ign0": 0}
OLD_VARIANTS = ("mean_ign", "smooth_ign0", "none")
CLIP = 64.0  # Paddle's softmax clips z - max at -64


def fixture_keep(c: dict) -> bool:
    """The committed subset of --small (<= 3 MB): C = 10 in float32 (every std) and float64
    (std 10), C = 1,000 at std 10 in float32 for label smoothing; another release's: C = 10,
    `none` at std 30 only."""
    if c["framework"] != "paddle":
        return c["C"] == 10 and (c["variant"] != "none" or c["scale"] == 30.0)
    if c["C"] == 10:
        return c["dtype"] == "f32" or c["scale"] == 10.0
    return c["C"] == 1000 and c["scale"] == 10.0 and c["dtype"] == "f32" and c["variant"] == "smooth"


def cases(small: bool, old: bool = False) -> list[dict]:
    """Every variant; `old` (another release, named paddle<version>): the released bugs'
    variants in float32."""
    if not old:
        return [c for c in common.semantic_cases("paddle", VARIANTS, NP, small)
                if c["scale"] in SCALES]
    import paddle
    tag = "paddle" + paddle.__version__.replace(".", "")
    return [c for c in common.semantic_cases(tag, VARIANTS, NP, small) if c["scale"] in SCALES
            and c["variant"] in OLD_VARIANTS and c["dtype"] == "f32"]


def draw(case: dict, small: bool, seed: int):
    """float64 logits (std = scale; (N, C, d) for axis1), labels (~15 % the variant's ignored
    label; labels 1.. when it is 0), probability rows, binary targets (10 % soft), class
    weights in [0.5, 2)."""
    rng = np.random.default_rng(seed)
    C, v = case["C"], case["variant"]
    R = max(8, min(256, (1 << (14 if small else 17)) // C))
    shape, bshape = ((R // 4, C, 4), (R // 4, 4)) if case["layout"] == "ncd" else ((R, C), (R,))
    z = rng.standard_normal(shape) * case["scale"]
    y = rng.integers(1 if IGNORE.get(v) == 0 else 0, C, size=bshape, dtype=np.int64)
    if v in IGNORE:
        off = rng.random(bshape) < 0.15
        off.flat[0], off.flat[-1] = True, False
        y[off] = IGNORE[v]
    if v == "neginf":  # a third of the rows lose ~20 % of their classes, never the label
        M = (rng.random(shape) < 0.2) & (rng.random((R, 1)) < 0.34)
        M[np.arange(R), y] = False
        z[M] = -np.inf
    a = rng.standard_normal(shape) * 2.0
    t = np.exp(a - a.max(axis=-1, keepdims=True))
    t /= t.sum(axis=-1, keepdims=True)
    b = (rng.random(shape) < 0.3).astype(np.float64)
    soft = rng.random(shape) < 0.1
    b[soft] = rng.random(int(soft.sum()))
    w = rng.uniform(0.5, 2.0, size=C)
    return z, y, t, b, w


def tensor(a, dtype, grad: bool = False):
    import paddle
    x = paddle.to_tensor(a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                         else a)
    x.stop_gradient = not grad
    return x


def bad_weight(w, y) -> np.ndarray:
    """One class weight wrong: the first non-ignored row's class x 1.5."""
    w = w.copy()
    k = int(y.flat[1]) if 0 <= int(y.flat[1]) < w.size else int(y.flat[-1])
    w[k] *= 1.5
    return w


def ce_forward(v: str, x, y, t, w, bug: str):
    """Paddle's loss of the case (scalar, or per row for `none`), with `bug`."""
    import paddle.nn.functional as F
    ce = F.cross_entropy
    if bug == "weight1":
        w = tensor(bad_weight(w.numpy(), y.numpy()), w.numpy().dtype)
    if v == "none":
        return ce(x, y, reduction="none")
    if v == "sum":
        return ce(x, y, reduction="sum")
    if v in ("mean_ign", "mean_ign0", "axis1_ign255"):
        k, axis = IGNORE[v], (1 if v == "axis1_ign255" else -1)
        if bug == "valid":
            return ce(x, y, reduction="sum") / float((y.numpy() != k).sum())
        if bug == "allrows":
            return ce(x, y, ignore_index=k, axis=axis, reduction="sum") / float(y.numpy().size)
        return ce(x, y, ignore_index=k, axis=axis)
    if v in ("weight", "weight_sum"):
        return ce(x, y, weight=w, reduction="sum" if v == "weight_sum" else "mean")
    if v in ("soft", "soft_weight"):
        return ce(x, t, soft_label=True, weight=w if v == "soft_weight" else None)
    if v == "neginf":
        return ce(x, y)
    eps = 0.0 if bug == "nosmooth" else EPS_LS
    if v == "smooth_ign0":
        return ce(x, y, ignore_index=0, label_smoothing=eps)
    return ce(x, y, label_smoothing=eps, weight=w if v == "smooth_weight" else None)


def bce_forward(v: str, x, b, w, bug: str):
    import paddle.nn.functional as F
    if bug == "weight1":
        w = tensor(bad_weight(w.numpy(), np.array([0, 0])), w.numpy().dtype)
    kw = dict(reduction="sum" if v == "bce_sum" else "mean")
    if v == "bce_weight":
        kw["weight"] = w
    if v == "bce_pw" and bug != "nopw":
        kw["pos_weight"] = w
    return F.binary_cross_entropy_with_logits(x, b, **kw)


def value_and_grad(case: dict, arrays: tuple, bug: str = ""):
    import paddle
    z, y, t, b, w = arrays
    dt = NP[case["dtype"]]
    x = tensor(z, dt, grad=True)
    if case["family"] == "bce":
        loss = bce_forward(case["variant"], x, tensor(b, dt), tensor(w, dt), bug)
    else:
        loss = ce_forward(case["variant"], x, tensor(y, None), tensor(t, dt), tensor(w, dt), bug)
    g, = paddle.grad(loss.sum() if loss.ndim else loss, x)
    return loss.numpy(), g.numpy()


def smoothed(y, C: int) -> np.ndarray:
    """Paddle's smoothed labels: label_smooth(one_hot(y)) in float32 (one_hot's dtype), then
    cast to the logits' dtype: (1 - e) y + e/C rounded to float32."""
    import paddle.nn.functional as F
    return F.label_smooth(F.one_hot(tensor(y, None), C), epsilon=EPS_LS).numpy()


def paddle_sample_weight(v: str, t, y, w, dt) -> np.ndarray:
    """Paddle's per-row weight of the soft-label path, as it computes it: (t or the smoothed
    one-hot) @ w in the logits' dtype."""
    import paddle
    lab = t if v == "soft_weight" else smoothed(y, w.size)
    return paddle.matmul(tensor(lab, dt), tensor(w, dt), transpose_y=True).numpy().astype(np.float64)


def grad_scale(case: dict, opts: dict, arrays: tuple, extra: dict) -> float:
    """The largest row factor of the gradient: the row's weight over the loss's denominator."""
    z, y, t, b, w = arrays
    v, red = case["variant"], opts["reduction"]
    top = float(extra["sample_weight"].max()) if "sample_weight" in extra else (
        float(w.max()) if v.startswith("weight") or v == "bce_pw" else 1.0)
    if "denominator" in opts:
        return top / opts["denominator"]
    if red != "mean":
        return top
    if case["family"] == "bce" or case["target"] == "prob" or "ignore_index" not in opts:
        return top / (b.size if case["family"] == "bce" else y.size)
    valid = y != opts["ignore_index"]
    return top / float(w[y[valid]].sum() if v == "weight" else valid.sum())


def paddle_atol(case: dict, opts: dict, arrays: tuple, extra: dict) -> float:
    """Paddle's absolute errors, as an `atol`: its softmax floors exp(z - max) at e^-64 (an
    entry's error <= e^-64 times the row factor) wherever a logit lies more than 64 below
    its row's largest; its pos_weight BCE backward forms sigma(z) with an absolute error of
    ~eps (measured: 2.8e-17 at z = -33.8 in float64, entries below eps read 0 in float32)."""
    z = arrays[0]
    if case["variant"] == "bce_pw":
        return 2.0 * float(np.finfo(NP[case["dtype"]]).eps) * grad_scale(case, opts, arrays, extra)
    zl = np.moveaxis(z, 1, -1) if case["layout"] == "ncd" else z
    if case["family"] == "bce" or not ((zl.max(axis=-1, keepdims=True) - zl) > CLIP).any():
        return 0.0
    return 1.01 * float(np.exp(-CLIP)) * grad_scale(case, opts, arrays, extra)  # e^-64 in f32: +eps


def ce_options(case: dict, arrays: tuple, extra: dict) -> dict:
    """The ce-check options that express Paddle's call (`extra` gets the arrays they name)."""
    v, dt = case["variant"], case["dtype"]
    z, y, t, b, w = arrays
    opts: dict = dict(reduction=case["reduction"], precision=dt)
    if case["family"] == "bce":
        if v in ("bce_weight", "bce_pw"):
            key = "weight" if v == "bce_weight" else "pos_weight"
            opts[key], extra[key] = key, w.astype(NP[dt])
    if v in IGNORE:
        opts["ignore_index"] = IGNORE[v]
    if v == "axis1_ign255":
        opts["class_axis"] = 1
    if v == "mean_ign" and case["legacy"]:  # 2.x: the count of the non-ignored rows
        opts["reduction"] = "mean"
    elif v in ("mean_ign", "smooth_ign0"):  # 3.x: N C with smoothing; 2.x and 3.x: N
        opts["denominator"] = float(y.size * (z.shape[-1] if v == "smooth_ign0"
                                              and not case["legacy"] else 1))
        opts.pop("ignore_index") if v == "smooth_ign0" else None
    if v in ("weight", "weight_sum"):
        opts["weight"], extra["weight"] = "weight", w.astype(NP[dt])
    if "smooth" in v and dt == "f32":
        opts["label_smoothing"] = EPS_LS
    if v in ("soft_weight", "smooth_weight"):
        s = paddle_sample_weight(v, t, y, w, NP[dt])
        opts.update(sample_weight="sample_weight", denominator=float(s.sum()))
        extra["sample_weight"] = s
    atol = paddle_atol(case, opts, arrays, extra)
    if atol:
        opts["atol"] = atol
    return opts


# what users expect (PyTorch's semantics) where Paddle's differ: its released bugs
RELEASED = {
    "mean_ign": dict(issue="PaddlePaddle/Paddle#48663 (PR #76033)", expect=dict(
        reduction="mean", ignore_index=-100)),
    "smooth_ign0": dict(issue="label_smoothing with ignore_index >= 0", expect=dict(
        reduction="mean", ignore_index=0, label_smoothing=EPS_LS)),
}


def clipped(case: dict, z, y, t) -> bool:
    """Paddle's loss differs from the cross-entropy: a target class (the label, or any class
    the soft or smoothed target weighs) lies more than 64 below the row's largest logit."""
    if case["family"] == "bce":
        return False
    v = case["variant"]
    zl = np.moveaxis(z, 1, -1) if v == "axis1_ign255" else z
    gap = zl.max(axis=-1, keepdims=True) - zl
    if v == "soft" or v == "soft_weight" or ("smooth" in v):
        return bool((gap > CLIP).any())
    valid = (y != IGNORE.get(v, -100)) & (y >= 0) & (y < z.shape[-1 if v != "axis1_ign255" else 1])
    yy = np.where(valid, y, 0)
    g = np.take_along_axis(gap, yy[..., None], axis=-1)[..., 0]
    return bool((g[valid] > CLIP).any())


def compute(outdir: str, small: bool):
    import paddle
    os.makedirs(os.path.join(outdir, "own"), exist_ok=True)

    def one(case: dict, seed: int):
        case = dict(case, family=case["call_tag"], legacy=paddle.__version__.startswith("2."))
        v, dt = case["variant"], case["dtype"]
        arrays = draw(case, small, seed)
        z, y, t, b, w = arrays
        loss, grad = value_and_grad(case, arrays)
        extra: dict = {}
        opts = ce_options(case, arrays, extra)
        bugs = ("allrows",) if v == "mean_ign" and case["legacy"] else BUGS.get(v, ())
        for bug in bugs if dt == "f32" else ():
            extra["grad_bug_" + bug] = value_and_grad(case, arrays, bug)[1]
        if dt == "f32":
            g = grad.astype(np.float64).reshape(-1, grad.shape[-1]).copy()
            r = int(np.argmax(np.abs(g).max(axis=1)))
            g[r] *= 1.001
            extra["grad_bug_row1001"] = g.reshape(grad.shape).astype(grad.dtype)
        labels = b if case["family"] == "bce" else (t if v.startswith("soft") else y)
        if "smooth" in v and dt == "f64":  # float32's smoothed targets, as probability rows
            labels = smoothed(y, z.shape[-1]).astype(np.float64)
        clip = clipped(case, z, y, t)
        p_minus_t = "smooth" in v and dt == "f64"
        own = clip or p_minus_t or case["legacy"] or any(k in opts for k in ("weight", "pos_weight"))
        meta = dict(paddle=paddle.__version__, shape=list(z.shape), loss_clipped=clip,
                    grad_p_minus_t=p_minus_t,
                    loss_dtype=str(loss.dtype), grad_dtype=str(grad.dtype))
        if v in RELEASED and dt == "f32" and not (v == "mean_ign" and case["legacy"]):
            meta["released"] = RELEASED[v]
        if case["family"] == "bce":
            meta["target"] = "binary"
        common.write_case(os.path.join(outdir, "own") if own else outdir, case,
                          logits=z.astype(NP[dt]), labels=labels.astype(NP[dt]) if
                          labels.dtype.kind == "f" else labels, grad=grad, loss=loss,
                          axis=1 if v == "axis1_ign255" else -1, precision=dt, seed=seed,
                          arrays_extra=extra, ce_check=opts, meta_extra=meta)
    return one


# ---- --check (ce-check's environment) ----

ARRAY_OPTS = ("weight", "pos_weight", "sample_weight")


def load(path: str) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as d:
        arr = {k: d[k] for k in d.files}
    return arr, json.loads(str(arr.pop("meta").reshape(-1)[0]))


def check(arr: dict, meta: dict, grad=None, loss: bool = True, opts: dict | None = None, **kw):
    """ce-check's report on the case (its own gradient, or `grad`; `opts` instead of the
    case's options)."""
    import ce_cli
    opts = dict(meta["ce_check"] if opts is None else opts, **kw)
    named = {k: arr[opts.pop(k)] for k in ARRAY_OPTS if isinstance(opts.get(k), str)}
    fn = ce_cli.check_binary if meta.get("target") == "binary" else ce_cli.check_grad
    return fn(arr["logits"], arr["labels"], grad=arr["grad"] if grad is None else grad,
              loss=arr["loss"] if loss else None, **named, **opts)


def failed(report) -> list:
    return [(c.name, c.note[:200]) for c in report.checks if not c.ok]


def expected_options(meta: dict) -> dict:
    """The options of the semantics users expect (PyTorch's) for a released bug."""
    keep = {k: v for k, v in meta["ce_check"].items()
            if k not in ("denominator", "reduction", "label_smoothing", "ignore_index")}
    return dict(keep, **meta["released"]["expect"])


def sweep_one(outdir: str) -> dict:
    r = dict(cases=0, false_alarms=0, clipped=0, clipped_grad_alarms=0, p_minus_t=0,
             p_minus_t_flagged=0, planted=0, missed=0, released=0, released_caught=0)
    paths = sorted(glob.glob(os.path.join(outdir, "*.npz")) +
                   glob.glob(os.path.join(outdir, "own", "*.npz")))
    for p in paths:
        arr, meta = load(p)
        name = os.path.basename(p)[:-4]
        r["cases"] += 1
        bad = failed(check(arr, meta))
        if meta["grad_p_minus_t"]:
            r["p_minus_t"] += 1
            r["p_minus_t_flagged"] += bool(failed(check(arr, meta, loss=False)))
        elif meta["loss_clipped"]:
            r["clipped"] += 1
            bad_grad = failed(check(arr, meta, loss=False))
            if bad_grad or [n for n, _ in bad] != ["loss_vs_reference"]:
                r["clipped_grad_alarms"] += 1
                print("FALSE ALARM (clipped loss)", name, bad, flush=True)
        elif bad:
            r["false_alarms"] += 1
            print("FALSE ALARM", name, bad, flush=True)
        if "released" in meta:
            r["released"] += 1
            got = failed(check(arr, meta, opts=expected_options(meta), loss=False))
            r["released_caught"] += bool(got)
            print("RELEASED BUG " + ("CAUGHT" if got else "MISSED"), name, got[:1], flush=True)
        for k in [k for k in arr if k.startswith("grad_bug_")]:
            r["planted"] += 1
            if check(arr, meta, grad=arr[k], loss=False).ok:
                r["missed"] += 1
                print(f"MISSED {k[9:]} {name}", flush=True)
    return r


def sweep(outdir: str) -> None:
    for fused in ("1", "0"):
        os.environ["CE_CHECK_FUSED"] = fused
        print(f"CE_CHECK_FUSED={fused}:", json.dumps(sweep_one(outdir)), flush=True)


def main():
    if "--check" in sys.argv:
        sys.argv.remove("--check")
        sweep(sys.argv[1])
        return
    flags = {f: f in sys.argv for f in ("--fixtures", "--old")}
    sys.argv = [a for a in sys.argv if a not in flags]
    fixtures = flags["--fixtures"]
    args = common.parse_args("paddle_cases.py")
    common.run(cases(args.small, flags["--old"]), args, compute(args.outdir, args.small),
               fixture_keep if fixtures else None)


if __name__ == "__main__":
    main()
