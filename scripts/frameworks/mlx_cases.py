"""MLX's own cross-entropy and sigmoid BCE (`mlx.nn.losses`), differentiated by mx.grad on
MLX's CPU backend, for ce-check's options (runs in a venv with mlx[cpu] and numpy).

    python mlx_cases.py OUTDIR [--small] [--only SUBSTR] [--fixtures]
    python mlx_cases.py OUTDIR --check [--only SUBSTR]   (ce_cli importable: ce-check on them)

MLX 0.32.4's `cross_entropy(logits, targets, weights=None, axis=-1, label_smoothing=0.0,
reduction='none')` shifts the logits by their (stop-gradient) max, then
loss = logsumexp(z) - (1 - eps) score - eps mean_c(z), score = z_y (index targets) or
sum_c t_c z_c (probability targets): PyTorch's smoothing (eps/C on every class;
`--smoothing-form torch`), with probability targets `-sum t' log a` only while sum_c t_c = 1 (MLX
writes lse, not (sum t) lse). `weights` has the loss's shape (per sample, not per class) and
multiplies the per-sample losses; `reduction='mean'` is then the plain mean over every sample
(divided by N, not by sum w): `--sample-weight w --reduction sum --denominator N`. No
ignore_index: training code masks (mlx-lm's trainer: `(ce * mask).astype(float32).sum() /
mask.sum()`) -> labels -100 where the mask is off, `--ignore-index -100`, mean.
`binary_cross_entropy(inputs, targets, weights=None, with_logits=True, reduction='mean')` is
logaddexp(0, z) - z t, `weights` elementwise, mean over every element: PyTorch's BCE `weight`
(`binary --weight w`; `--sample-weight` is per row, and its mean divides by sum s).
`with_logits=False` takes probabilities: not a logits check. On the CPU (the GPU's
mx.fast.cross_entropy is not taken) MLX computes in the logits' dtype: logsumexp and the
softmax of its backward accumulate in float32 and round the result to float16 / bfloat16 once;
every other op (the shift, the subtraction, the mean, the products of the backward) rounds in
the 16-bit dtype. Its BCE backward is logaddexp's vjp, 1 - sigmoid(-z): sigmoid(z) to an
absolute eps only, which the binary floor's |1 - y| term allows (docs/tolerance.md).

Variants (`meta.ce_check` holds the check's options):

- `int`, `int_mean`, `int_sum` index targets, reduction none / mean / sum;
- `smooth`      label_smoothing=0.1, mean;
- `prob`        probability rows, none; `prob_smooth` with label_smoothing=0.1, mean;
- `weights`     weights=w (per sample, [0, 2), ~20 % zeros), mean (/ N);
- `masked`      mlx-lm's masked mean over (B, T, V) (~15 % of the tokens masked, the first always);
- `axis1`       (N, C, d) logits, axis=1, mean;
- `ninf`        ~10 % of the rows with ~30 % of their logits -inf (never the label), mean;
- `bce`         binary_cross_entropy(z, y), y in {0, 1}, mean; `bce_soft` soft targets, none;
  `bce_w` weights=w elementwise, mean (/ every element).

float32, float16 and bfloat16 logits (16-bit saved exactly: float16 as float16, bf16 widened to
float32; probability targets rounded to the logits' dtype as MLX needs them to stay in it);
std 1, 10, 30; C 10, 1000, 32000; at most 2^17 logits per case (--small: 2^14), at least 8 rows.
float32 cases hold planted bugs `grad_bug_<name>`, each MLX's code with one thing changed and
differentiated by mx.grad: `nosmooth` (the eps mean_c(z) term dropped), `allrows` (the masked
sum divided by every token), `wone` (one sample's weight doubled), `row1001` (one row's loss
x 1.001).

`--check` runs ce-check (`ce_cli.check_grad` / `check_binary`) on every case of OUTDIR on both
kernels (default and CE_CHECK_FUSED=0): false alarms and missed planted bugs.
fixtures/frameworks_semantics/mlx/ (tests/test_semantic_frameworks.py, tests/test_mlx_real.py):
`--small --fixtures`, without the .json files.
"""

from __future__ import annotations

import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from torch_compile_cases import load  # noqa: E402  (stdlib + numpy at import)

DTYPES = ("f32", "f16", "bf16")
# variant -> (family, MLX reduction, layout, target kind)
VARIANTS = {
    "int": ("ce", "none", "nc", "index"), "int_mean": ("ce", "mean", "nc", "index"),
    "int_sum": ("ce", "sum", "nc", "index"), "smooth": ("ce", "mean", "nc", "index"),
    "prob": ("ce", "none", "nc", "prob"), "prob_smooth": ("ce", "mean", "nc", "prob"),
    "weights": ("ce", "mean", "nc", "index"), "masked": ("ce", "mean", "btv", "index"),
    "axis1": ("ce", "mean", "axis1", "index"), "ninf": ("ce", "mean", "nc", "index"),
    "bce": ("bce", "mean", "nc", "binary"), "bce_soft": ("bce", "none", "nc", "binary"),
    "bce_w": ("bce", "mean", "nc", "binary"),
}
SCALES = (1.0, 10.0, 30.0)
EPS_LS = 0.1
BUGS = {"smooth": ("nosmooth",), "prob_smooth": ("nosmooth",), "masked": ("allrows",),
        "weights": ("wone",), "bce_w": ("wone",), "int_mean": ("row1001",),
        "int": ("row1001",), "bce": ("row1001",)}


def cases(small: bool) -> list[dict]:
    return [c for c in common.semantic_cases("mlx", VARIANTS, DTYPES, small)
            if c["scale"] in SCALES]


def draw(case: dict, small: bool, seed: int) -> dict:
    """float64 logits (std = scale) in the case's layout, int labels, probability rows or soft
    binary targets, sample weights, a token mask and a -inf pattern."""
    rng = np.random.default_rng(seed)
    C, v = case["C"], case["variant"]
    R = max(8, min(256, (1 << (14 if small else 17)) // C))
    if case["layout"] == "axis1":
        d = 4
        shape, bshape = (R // d, C, d), (R // d, d)
    elif case["layout"] == "btv":
        shape, bshape = (2, R // 2, C), (2, R // 2)
    else:
        shape, bshape = (R, C), (R,)
    z = rng.standard_normal(shape) * case["scale"]
    y = rng.integers(0, C, size=bshape, dtype=np.int64)
    a = rng.standard_normal(shape) * 2.0
    t = np.exp(a - a.max(axis=-1, keepdims=True))
    t /= t.sum(axis=-1, keepdims=True)
    if v.startswith("bce"):
        y = (rng.random(shape) < 0.5).astype(np.float64)
        t = rng.random(shape)
    m = rng.random(bshape) >= 0.15
    m.flat[0], m.flat[-1] = False, True
    w = rng.uniform(0.0, 2.0, size=z.shape if v == "bce_w" else bshape)
    w[rng.random(w.shape) < 0.2] = 0.0
    off = np.zeros(shape, dtype=bool)
    if v == "ninf":
        rows = rng.random(R) < 0.1
        rows[0] = True
        off[rows] = rng.random((int(rows.sum()), C)) < 0.3
        off[np.arange(R), y] = False
        off[np.arange(R), (y + 1) % C] = False  # never a row of one finite logit
    return dict(z=z, y=y, t=t, m=m, w=w, off=off)


def mlx_cross_entropy(logits, targets, *, axis=-1, label_smoothing=0.0, weights=None,
                      bug: str = ""):
    """mlx.nn.losses.cross_entropy's CPU path (MLX 0.32.4) with `bug` `nosmooth`: the smoothing
    term -eps mean(z) dropped. reduction 'none'."""
    import mlx.core as mx
    logits = logits - mx.stop_gradient(mx.max(logits, axis=axis, keepdims=True))
    if targets.ndim == logits.ndim:
        score = mx.sum(logits * targets, axis=axis)
    else:
        score = mx.take_along_axis(logits, mx.expand_dims(targets, axis), axis).squeeze(axis)
    lse = mx.logsumexp(logits, axis=axis)
    loss = lse - (1 - label_smoothing) * score
    if bug != "nosmooth":
        loss = loss - logits.mean(axis=axis) * label_smoothing
    return loss if weights is None else loss * weights


def forward(v: str, x, d: dict, bug: str = ""):
    """The case's loss (scalar, or per sample for reduction 'none') of logits x: MLX's own
    functions, or (a planted bug) its code with one change."""
    import mlx.core as mx
    import mlx.nn as nn
    L = nn.losses
    w = d["w_mx"]
    if bug == "wone":
        w = mx.array(np.where(np.arange(w.size).reshape(w.shape) == d["wone_at"], 2.0, 1.0),
                     dtype=w.dtype) * w
    if v.startswith("bce"):
        targets = d["t_mx"] if v == "bce_soft" else d["y_mx"]
        red = VARIANTS[v][1]
        out = L.binary_cross_entropy(x, targets, weights=w if v == "bce_w" else None,
                                     reduction="none" if bug == "row1001" else red)
        return _row1001(out, d).mean() if bug == "row1001" else out
    targets = d["t_mx"] if v.startswith("prob") else d["y_mx"]
    eps = EPS_LS if "smooth" in v else 0.0
    axis = 1 if v == "axis1" else -1
    if bug == "nosmooth":
        per = mlx_cross_entropy(x, targets, label_smoothing=eps, bug=bug)
        return per.mean()
    per = L.cross_entropy(x, targets, axis=axis, label_smoothing=eps,
                          weights=w if v == "weights" else None)
    if bug == "row1001":
        per = _row1001(per, d)
    if v == "masked":
        m = d["m_mx"]
        ce = (per * m).astype(mx.float32)
        return ce.mean() if bug == "allrows" else ce.sum() / m.sum()
    red = VARIANTS[v][1]
    return per if red == "none" else (per.mean() if red == "mean" else per.sum())


def _row1001(per, d: dict):
    """The per-sample losses with row `row_at` (the first axis of a binary case) x 1.001."""
    import mlx.core as mx
    s = np.ones(per.shape, dtype=np.float32)
    s[d["row_at"]] = 1.001
    return per * mx.array(s, dtype=per.dtype)


def value_and_grad(v: str, x, d: dict, bug: str = ""):
    """(loss, gradient of the loss or of the per-sample losses' sum) by mx.grad."""
    import mlx.core as mx

    def f(xx):
        out = forward(v, xx, d, bug)
        return out.sum() if out.ndim else out
    loss = forward(v, x, d, bug)
    g = mx.grad(f)(x)
    mx.eval(loss, g)
    return loss, g


def to_np(a, dt: str) -> np.ndarray:
    """An MLX array as numpy: float16 kept, bfloat16 widened exactly to float32."""
    import mlx.core as mx
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    out = np.array(a)
    return out if dt == "f16" else out.astype(np.float32)


def ce_check_options(case: dict, d: dict, axis: int) -> tuple[dict, dict]:
    """(check options, extra arrays) that state the case to ce-check."""
    v, dt = case["variant"], case["dtype"]
    red = VARIANTS[v][1]
    opts: dict = dict(reduction=red, precision=dt)
    arrays: dict = {}
    if "smooth" in v:
        opts["label_smoothing"] = EPS_LS
    if v == "axis1":
        opts["class_axis"] = axis
    if v == "weights":
        arrays["sample_weight"] = d["w_used"]
        opts.update(sample_weight="sample_weight", reduction="sum",
                    denominator=float(d["w_used"].size))
    if v == "bce_w":  # PyTorch's BCE `weight`: elementwise, mean over every element
        arrays["weight"] = d["w_used"]
        opts["weight"] = "weight"
    if v == "masked":
        opts["ignore_index"] = -100
    return opts, arrays


def wone_at(r: dict) -> int:
    """The flat index of the weight `wone` doubles: the first non-zero one whose loss has a
    gradient to double (elementwise weights: |z| < 4, not a saturated sigmoid)."""
    live = r["w"] != 0
    if r["w"].shape == r["z"].shape:
        live &= np.abs(r["z"]) < 4.0
    return int(np.flatnonzero(live)[0])


def fixture_keep(c: dict) -> bool:
    """The committed subset of --small (<= 3 MB): C = 10 (float32 at every std, 16-bit at std 1
    and 30), C = 1,000 at std 10 in float32 for the variants with planted bugs of their own,
    and the float16 smoothing cases at C = 1,000, std 30, whose loss overflows."""
    C, dt, s, v = c["C"], c["dtype"], c["scale"], c["variant"]
    if C == 10:
        return dt == "f32" or s != 10.0
    if dt == "f32" and s == 10.0:
        return C == 1000 and v in ("smooth", "prob_smooth", "masked", "weights")
    return dt == "f16" and C == 1000 and s == 30.0 and "smooth" in v


def compute(outdir: str, small: bool, fixtures: bool = False):
    """`fixtures`: the cases test_semantic_frameworks.py cannot state (`bce_w`'s elementwise
    `weight`) go to OUTDIR/own/ (tests/test_mlx_real.py)."""
    import mlx.core as mx
    MDT = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}

    def one(case: dict, seed: int):
        v, dt = case["variant"], case["dtype"]
        r = draw(case, small, seed)
        z = np.where(r["off"], -np.inf, r["z"])
        x = mx.array(z.astype(np.float32)).astype(MDT[dt])
        w = mx.array(r["w"].astype(np.float32)).astype(MDT[dt])
        rng = np.random.default_rng(seed + 1)
        d = dict(y_mx=mx.array(r["y"]) if not v.startswith("bce")
                 else mx.array(r["y"].astype(np.float32)).astype(MDT[dt]),
                 t_mx=mx.array(r["t"].astype(np.float32)).astype(MDT[dt]),
                 m_mx=mx.array(r["m"]), w_mx=w, wone_at=wone_at(r),
                 row_at=int(rng.integers(r["z"].shape[0])))
        loss, grad = value_and_grad(v, x, d)
        d["w_used"], d["n"] = to_np(w, "f32").astype(np.float64), r["z"].size
        axis = 1 if v == "axis1" else -1
        opts, arrays = ce_check_options(case, d, axis)
        labels = r["y"].copy()
        if v.startswith("prob"):
            labels = to_np(d["t_mx"], dt)
        elif v == "bce_soft":
            labels = to_np(d["t_mx"], dt)
        elif v.startswith("bce"):
            labels = to_np(d["y_mx"], dt)
        if v == "masked":
            labels[~r["m"]] = -100
        for bug in BUGS.get(v, ()) if dt == "f32" else ():
            arrays["grad_bug_" + bug] = to_np(value_and_grad(v, x, d, bug)[1], dt)
        own = fixtures and v == "bce_w"
        if own:
            os.makedirs(os.path.join(outdir, "own"), exist_ok=True)
        common.write_case(
            os.path.join(outdir, "own") if own else outdir, case, logits=to_np(x, dt),
            labels=labels, grad=to_np(grad, dt), loss=to_np(loss, dt), axis=axis, precision=dt,
            seed=seed, arrays_extra=arrays, ce_check=opts,
            meta_extra=dict(mlx=mx.__version__, device=str(mx.default_device()),
                            shape=list(r["z"].shape), loss_dtype=str(loss.dtype),
                            grad_dtype=str(grad.dtype)))
    return one


# ---- --check: ce-check on every case of OUTDIR ----

def check_case(arrays: dict, meta: dict, grad_key: str = "grad", loss: bool = True):
    """ce-check's report on one case."""
    import ce_cli
    opts = dict(meta["ce_check"])
    named = {k: arrays[v] for k, v in opts.items() if isinstance(v, str) and v in arrays}
    opts = {k: v for k, v in opts.items() if k not in named}
    fn = ce_cli.check_binary if meta["target"] == "binary" else ce_cli.check_grad
    return fn(arrays["logits"], arrays["labels"], grad=arrays[grad_key],
              loss=arrays["loss"] if loss else None, **named, **opts)


def overflowed(arrays: dict, bad: list) -> bool:
    """MLX's loss is inf (a float16 sum overflowed) and ce-check says so, on the loss alone."""
    return (bool(np.isinf(arrays["loss"]).any()) and [c.name for c in bad] == ["loss_vs_reference"]
            and "overflowed" in bad[0].note)


def check(outdir: str, only: str = "") -> int:
    """False alarms and missed planted bugs over the cases in `outdir`, on this process's kernel."""
    alarms: list = []
    missed: list = []
    flagged: list = []
    runs = bugs = 0
    for path in sorted(glob.glob(os.path.join(outdir, f"*{only}*.npz"))):
        name = os.path.basename(path)[:-4]
        arrays, meta = load(path)
        runs += 1
        rep = check_case(arrays, meta)
        bad = [c for c in rep.checks if not c.ok]
        if overflowed(arrays, bad):
            flagged.append(name)
        elif bad:
            alarms.append((name, [(c.name, c.mismatches, c.note[:160]) for c in bad]))
        for key in (k for k in arrays if k.startswith("grad_bug_")):
            if np.array_equal(arrays[key], arrays["grad"]):
                continue  # the change left this gradient as it was: nothing to catch
            bugs += 1
            if check_case(arrays, meta, key, loss=False).ok:
                missed.append((name, key))
    kernel = "numpy" if os.environ.get("CE_CHECK_FUSED") == "0" else "default"
    on_grad = sum(any(c[0] != "loss_vs_reference" for c in a[1]) for a in alarms)
    print(f"{kernel} kernel: {runs} cases, {len(alarms)} false alarms ({on_grad} on the "
          f"gradient); {len(flagged)} losses MLX returned as inf, flagged as overflowed; "
          f"{bugs} planted bugs, {len(missed)} missed", flush=True)
    for a in alarms + missed:
        print("  ", a, flush=True)
    return int(bool(alarms or missed))


def check_main(argv: list[str]) -> int:
    """`OUTDIR --check [--only S]`: each kernel in its own process (CE_CHECK_FUSED 1, then 0)."""
    rest = [a for a in argv if a != "--check"]
    only = rest[rest.index("--only") + 1] if "--only" in rest else ""
    return common.on_both_kernels(__file__, argv, lambda: check(rest[0], only))


def main():
    if "--check" in sys.argv:
        sys.exit(check_main(sys.argv[1:]))
    fixtures = "--fixtures" in sys.argv
    if fixtures:
        sys.argv.remove("--fixtures")
    args = common.parse_args("mlx_cases.py")
    common.run(cases(args.small), args, compute(args.outdir, args.small, fixtures),
               fixture_keep if fixtures else None)


if __name__ == "__main__":
    main()
