"""tinygrad's own cross-entropy and BCE losses, differentiated by its own autodiff (`.backward()`,
kernels compiled at run time by clang for its CPU device), for ce-check's options (runs in a venv
with tinygrad and numpy; bfloat16 needs a clang that compiles `__bf16` for x86: clang >= 19,
`CC=clang-19`, the default here when it is on PATH).

    python tinygrad_cases.py OUTDIR [--small] [--only SUBSTR] [--fixtures]
    python tinygrad_cases.py OUTDIR --check       (ce_cli importable: both kernels)
    python tinygrad_cases.py OUTDIR --old         (in a venv with tinygrad 0.9.2)
    python tinygrad_cases.py OUTDIR --big-n       (float16 means over 65,536 rows)

What tinygrad computes (tinygrad/mixin/op.py, 0.14.0): `log_softmax` is `m - log(sum(exp(m)))`,
m = z - max z, exp and log through exp2 / log2 (a 16-bit exp is computed in float32 and rounded
to the dtype). `sparse_categorical_crossentropy(Y, ignore_index, label_smoothing, reduction)`
(class axis -1) is, per row, -((1 - eps) log p_y + eps mean_c log p_c) times a mask Y != k,
and its mean divides the sum by the mask's count: PyTorch's smoothing and mean. Its default
k = -1 means "no mask": a label -1 is a zero one-hot row that still counts in the mean.
`cross_entropy(Y, reduction, label_smoothing)` (class axis 1; index or probability targets)
smooths the targets as (1 - eps) t + eps / C and its mean is over every row.
`binary_crossentropy_logits(Y, reduction, pos_weight)` is
-(pw y logsigmoid(z) + (1 - y) logsigmoid(-z)). No class weights. -inf logits pass
without smoothing (the loss with smoothing is inf, as PyTorch's).

Cases (`meta.ce_check` the options that express them):

- `sparse`        default call (no label ignored) -> reduction mean;
- `sparse_ignore` ignore_index=-100, ~15 % labels -100 -> ignore_index -100, mean;
- `sparse_smooth` the same with label_smoothing=0.1 -> label_smoothing 0.1;
- `sparse_smooth_sum` reduction 'sum'; `sparse_none` reduction 'none' (the gradient of the
  per-row losses' sum);
- `sparse_neg1`   the default ignore_index=-1 with ~15 % labels -1 (zero rows counted by the
  mean) -> ignore_index -1, reduction sum, denominator = every row;
- `ce_axis1`      cross_entropy(Y, label_smoothing=0.1) on (N, C, 4) logits -> class_axis 1;
- `ce_prob`       cross_entropy(T, label_smoothing=0.1), T probability rows -> labels T;
- `ce_prob_none`  cross_entropy(T, reduction='none');
- `bce`           binary_crossentropy_logits(Y), Y 0/1 -> check_binary, mean;
- `bce_pw`        soft Y in [0, 1], pos_weight in [0.5, 3] per column, reduction 'sum';
- `sparse_inf`    `sparse_ignore` with ~10 % of each row's classes -inf (never the label).

float32, float16 and bfloat16 (16-bit arrays saved widened exactly to float32); std 1, 10, 30;
C 10, 1000, 32000; at most 2^17 logits (--small: 2^14), at least 8 rows. float32 cases hold
planted bugs `grad_bug_<name>`, tinygrad's own code with one thing changed: `allrows` (the mean
over every row, not the unmasked ones), `nosmooth` (the smoothing term dropped), `nopw` (the
pos_weight dropped), `pw1` (one column's pos_weight x1.05); and `--check` plants `row1.001`
(the real gradient's largest row x1.001).

fixtures/frameworks_semantics/tinygrad/ (tests/test_semantic_frameworks.py,
tests/test_tinygrad_real.py): `--small --fixtures`, without the .json files; its findings/
(tests/test_tinygrad_real.py): `--small --only f32_nc_C10_s30_mean_bce`, `--small --only
f16_nc_C10_s1_mean_sparse_inf` and `--old` (tinygrad 0.9.2), without the .json files.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import library_cases  # noqa: E402

if shutil.which("clang-19"):
    os.environ.setdefault("CC", "clang-19")

EPS = 0.1
# variant -> (family, reduction, layout, target)
VARIANTS = {
    "sparse": ("sce", "mean", "nc", "index"), "sparse_ignore": ("sce", "mean", "nc", "index"),
    "sparse_smooth": ("sce", "mean", "nc", "index"),
    "sparse_smooth_sum": ("sce", "sum", "nc", "index"),
    "sparse_none": ("sce", "none", "nc", "index"), "sparse_neg1": ("sce", "mean", "nc", "index"),
    "ce_axis1": ("ce", "mean", "ncd", "index"), "ce_prob": ("ce", "mean", "nc", "prob"),
    "ce_prob_none": ("ce", "none", "nc", "prob"),
    "bce": ("bce", "mean", "nc", "binary"), "bce_pw": ("bce", "sum", "nc", "binary"),
    "sparse_inf": ("sce", "mean", "nc", "index"),
}
SCALES = (1.0, 10.0, 30.0)
DTYPES = ("f32", "f16", "bf16")
# (ignore_index, label_smoothing) of the sparse calls
SPARSE = {"sparse": (-1, 0.0), "sparse_ignore": (-100, 0.0), "sparse_smooth": (-100, EPS),
          "sparse_smooth_sum": (-100, EPS), "sparse_none": (-100, EPS), "sparse_neg1": (-1, 0.0),
          "sparse_inf": (-100, 0.0)}
BUGS = {"sparse_ignore": ("allrows",), "sparse_inf": ("allrows",), "sparse_smooth": ("allrows", "nosmooth"),
        "sparse_smooth_sum": ("nosmooth",), "sparse_none": ("nosmooth",),
        "ce_axis1": ("nosmooth",), "ce_prob": ("nosmooth",), "bce_pw": ("nopw", "pw1")}
D = 4  # trailing extent of ce_axis1's (N, C, D) logits


def cases(small: bool) -> list[dict]:
    return [c for c in common.semantic_cases("tinygrad", VARIANTS, DTYPES, small)
            if c["scale"] in SCALES]


def finding(c: dict) -> bool:
    """Cases of the committed subset ce-check fails on 0.14.0 (docs/frameworks.md): float32 BCE
    means at std >= 10 (exp through exp2 of a rounded product) and the 16-bit NaN loss with
    -inf logits. (The float32 BCE losses over >= 16,000 terms, also failing, are not in it.)"""
    return ((c["variant"] == "bce" and c["dtype"] == "f32" and c["scale"] >= 10.0) or
            (c["variant"] == "sparse_inf" and c["dtype"] != "f32"))


FIXTURE_C1000 = ("sparse_smooth", "sparse_neg1", "sparse_inf")


def fixture_keep(c: dict) -> bool:
    """The committed subset: library_cases.fixture_keep without the findings, C = 1,000 for
    FIXTURE_C1000 only."""
    if c["C"] == 1000 and c["variant"] not in FIXTURE_C1000:
        return False
    return library_cases.fixture_keep(c) and not finding(c)


def draw(case: dict, small: bool, seed: int):
    """float64 logits (std = scale), labels (~15 % ignored where the variant ignores), probability
    rows, soft binary targets and pos_weight."""
    rng = np.random.default_rng(seed)
    C, v = case["C"], case["variant"]
    R = max(8, min(256, (1 << (14 if small else 17)) // C))
    shape = (R // D, C, D) if v == "ce_axis1" else (R, C)
    z = rng.standard_normal(shape) * case["scale"]
    y = rng.integers(0, C, size=(R // D, D) if v == "ce_axis1" else R, dtype=np.int64)
    off = rng.random(R) < 0.15
    off[0], off[-1] = True, False
    if v in SPARSE and v != "sparse":
        y[off] = SPARSE[v][0]
    a = rng.standard_normal(shape) * 2.0
    t = np.exp(a - a.max(axis=-1, keepdims=True))
    t /= t.sum(axis=-1, keepdims=True)
    if v == "bce":
        t = (rng.random(shape) < 0.3).astype(np.float64)
    elif v == "bce_pw":
        t = rng.random(shape)
    pw = rng.uniform(0.5, 3.0, size=C)
    if v == "sparse_inf":  # ~10 % of each row's classes masked to -inf, never the label
        off = rng.random(shape) < 0.1
        off[np.arange(R), np.maximum(y, 0)] = False
        z[off] = -np.inf
    return z, y, t, pw


def sparse_ce(x, Y, ignore_index: int, eps: float, reduction: str, bug: str = ""):
    """tinygrad 0.14.0's Tensor.sparse_categorical_crossentropy, line for line, with `bug`."""
    from tinygrad import dtypes  # type: ignore[import-not-found]
    log_probs = x.log_softmax()
    loss_mask = Y.ne(ignore_index) if ignore_index != -1 else Y.const_like(True, dtypes.bool)
    y = Y.unsqueeze(-1)._one_hot_along_dim(x.shape[-1], dim=-1) * loss_mask.unsqueeze(-1)
    smoothing = eps * (log_probs.mean(-1) * loss_mask)
    unreduced = (1 - eps) * (log_probs * y).sum(-1) + (0 if bug == "nosmooth" else smoothing)
    if reduction == "mean":
        return -unreduced.mean() if bug == "allrows" else -unreduced.sum() / loss_mask.sum()
    return -unreduced._do_reduction(reduction)


def cross_entropy(x, Y, reduction: str, eps: float, bug: str = ""):
    """tinygrad 0.14.0's Tensor.cross_entropy, line for line, with `bug`."""
    axis = 0 if x.ndim == 1 else 1
    if x.shape != Y.shape:
        Y = Y.unsqueeze(axis)._one_hot_along_dim(num_classes=x.shape[axis], dim=axis)
    if bug != "nosmooth":
        Y = (1 - eps) * Y + eps / int(Y.shape[axis])
    return -x.log_softmax(axis).mul(Y).sum(axis)._do_reduction(reduction)


def forward(v: str, x, Y, T, PW, red: str, bug: str = ""):
    """The case's loss: tinygrad's own method, or the copy above when a bug is planted."""
    if v in SPARSE:
        k, eps = SPARSE[v]
        if bug:
            return sparse_ce(x, Y, k, eps, red, bug)
        return x.sparse_categorical_crossentropy(Y, ignore_index=k, label_smoothing=eps,
                                                 reduction=red)
    if v.startswith("ce"):
        target, eps = (Y, EPS) if v == "ce_axis1" else (T, EPS if v == "ce_prob" else 0.0)
        if bug:
            return cross_entropy(x, target, red, eps, bug)
        return x.cross_entropy(target, reduction=red, label_smoothing=eps)
    pw = None if v == "bce" or bug == "nopw" else PW
    if bug == "pw1":
        from tinygrad import Tensor  # type: ignore[import-not-found]
        pw = PW * Tensor(np.where(np.arange(PW.shape[0]) == 0, 1.05, 1.0)).cast(PW.dtype)
    return x.binary_crossentropy_logits(T, reduction=red, pos_weight=pw)


def value_and_grad(case: dict, x0, args, bug: str = ""):
    """(loss, gradient) as float32 numpy; the gradient of the per-row losses' sum for 'none'."""
    x = x0.detach()
    x.requires_grad = True
    Y, T, PW = args
    loss = forward(case["variant"], x, Y, T, PW, case["reduction"], bug)
    (loss.sum() if loss.ndim else loss).backward()
    return loss.float().numpy(), x.grad.float().numpy()


def options(case: dict, axis: int, y: np.ndarray, pw: np.ndarray) -> dict:
    """ce-check's options for the case."""
    v = case["variant"]
    opts: dict = dict(reduction=case["reduction"], precision=case["dtype"])
    if v in SPARSE and v != "sparse":
        opts["ignore_index"], opts["label_smoothing"] = SPARSE[v]
    if v == "sparse_neg1":
        opts.update(reduction="sum", denominator=float(y.size))
    if v in ("ce_axis1", "ce_prob"):
        opts.update(label_smoothing=EPS, class_axis=axis)
    if v == "bce_pw":
        opts["pos_weight"] = [float(w) for w in pw]
    return opts


def compute(outdir: str, small: bool):
    from importlib.metadata import version
    from tinygrad import Tensor, dtypes  # type: ignore[import-not-found]
    tdt = {"f32": dtypes.float32, "f16": dtypes.float16, "bf16": dtypes.bfloat16}

    def rounded(a: np.ndarray, dt: str):
        return Tensor(a.astype(np.float32)).cast(tdt[dt]).contiguous().realize()

    def one(case: dict, seed: int):
        v, dt = case["variant"], case["dtype"]
        z64, y64, t64, pw64 = draw(case, small, seed)
        x0, T, PW = rounded(z64, dt), rounded(t64, dt), rounded(pw64, dt)
        args = (Tensor(y64.astype(np.int32)), T, PW)
        loss, grad = value_and_grad(case, x0, args)
        axis = 1 if v == "ce_axis1" else -1
        labels = y64 if case["target"] == "index" else T.float().numpy()
        pw = PW.float().numpy()
        arrays = {}
        for bug in BUGS.get(v, ()) if dt == "f32" else ():
            arrays["grad_bug_" + bug] = value_and_grad(case, x0, args, bug)[1]
        common.write_case(
            outdir, case, logits=x0.float().numpy(), labels=labels, grad=grad, loss=loss,
            axis=axis, precision=dt, seed=seed, arrays_extra=arrays,
            ce_check=options(case, axis, y64, pw),
            meta_extra=dict(tinygrad=version("tinygrad"), cc=os.environ.get("CC", "clang"),
                            shape=list(z64.shape), computed_in=dt))
    return one


# ---- --old: the same default call on tinygrad 0.9.2 (before -1 stopped masking) ----

def old_cases(outdir: str) -> int:
    """`sparse_neg1` on the release that runs this script (0.9.2: `Tensor(z, requires_grad=True)`,
    no `reduction`), float32, C 10 and 1000, std 1 and 10: its mask is Y != -1, the mean over
    the labelled rows (ignore_index -1, reduction mean)."""
    from importlib.metadata import version
    from tinygrad import Tensor  # type: ignore[import-not-found]
    os.makedirs(outdir, exist_ok=True)
    n = 0
    for C in (10, 1000):
        for s in (1.0, 10.0):
            case = dict(framework="tinygrad", call_tag="v" + version("tinygrad").replace(".", ""), dtype="f32",
                        layout="nc", C=C, scale=s, reduction="mean", variant="sparse_neg1",
                        target="index")
            z64, y64, _, _ = draw(case, True, 4321 + n)
            x = Tensor(z64.astype(np.float32), requires_grad=True)
            loss = x.sparse_categorical_crossentropy(Tensor(y64.astype(np.int32)))
            loss.backward()
            common.write_case(
                outdir, case, logits=x.numpy(), labels=y64, grad=x.grad.numpy(),
                loss=loss.numpy(), axis=-1, precision="f32", seed=4321 + n,
                ce_check=dict(reduction="mean", ignore_index=-1, precision="f32"),
                meta_extra=dict(tinygrad=version("tinygrad"), shape=list(z64.shape)))
            n += 1
    print(f"wrote {n} cases to {outdir}")
    return 0


# ---- --big-n: a float16 mean over 65,536 rows ----

def big_n_cases(outdir: str) -> int:
    """The default call on (65536, 2) float16 logits (a batch of 64 x 1024 tokens; two classes
    keep the file small), std 1: the mask's count, an int, divides a float16 sum, so it becomes
    float16 65,536 = inf; the loss is -0 and the gradient all zeros (0.14.0; tinygrad PR
    #17445, open, fixes loss functions for large N in half)."""
    from importlib.metadata import version
    from tinygrad import Tensor, dtypes  # type: ignore[import-not-found]
    os.makedirs(outdir, exist_ok=True)
    case = dict(framework="tinygrad", call_tag="bign", dtype="f16", layout="nc", C=2, scale=1.0,
                reduction="mean", variant="sparse", target="index")
    rng = np.random.default_rng(777)
    z = rng.standard_normal((65536, 2)).astype(np.float32)
    y = rng.integers(0, 2, size=65536, dtype=np.int64)
    x0 = Tensor(z).cast(dtypes.float16).contiguous().realize()
    loss, grad = value_and_grad(case, x0, (Tensor(y.astype(np.int32)), None, None))
    common.write_case(
        outdir, case, logits=x0.float().numpy(), labels=y, grad=grad, loss=loss, axis=-1,
        precision="f16", seed=777, ce_check=options(case, -1, y, np.zeros(2)),
        meta_extra=dict(tinygrad=version("tinygrad"), shape=[65536, 2], computed_in="f16"))
    print(f"wrote 1 case to {outdir}")
    return 0


# ---- --check: ce-check on every case of OUTDIR ----

def row_plant(grad: np.ndarray) -> np.ndarray:
    """The gradient with its largest row (by max |entry|) x1.001: `row1.001`."""
    g = grad.reshape(-1, grad.shape[-1]).copy()
    g[int(np.argmax(np.abs(g).max(axis=1)))] *= np.float32(1.001)
    return g.reshape(grad.shape)


def check_case(arrays: dict, meta: dict, grad_key: str = "grad", **settings):
    """ce-check's report on one case (check_binary for the BCE cases)."""
    import ce_cli
    opts = {**meta["ce_check"], **settings}
    fn = ce_cli.check_binary if meta["target"] == "binary" else ce_cli.check_grad
    return fn(arrays["logits"], arrays["labels"], grad=arrays[grad_key], loss=arrays["loss"],
              **opts)


def check(outdir: str) -> int:
    """False alarms and missed planted bugs over OUTDIR's cases, on this process's kernel."""
    import glob
    from torch_compile_cases import load  # (arrays, meta) of one .npz
    alarms, missed, bugs = [], [], 0
    paths = sorted(glob.glob(os.path.join(outdir, "*.npz")))
    for path in paths:
        arrays, meta = load(path)
        rep = check_case(arrays, meta)
        if not rep.ok:
            alarms.append((os.path.basename(path),
                           [(c.name, c.mismatches, c.note) for c in rep.checks if not c.ok]))
        if meta["dtype"] == "f32":
            arrays["grad_bug_row1.001"] = row_plant(arrays["grad"])
        for key in (k for k in arrays if k.startswith("grad_bug_")):
            bugs += 1
            if check_case(arrays, meta, key).ok:
                missed.append((os.path.basename(path), key))
    return common.check_summary(f"{len(paths)} cases", alarms, bugs, missed)


def main():
    if "--check" in sys.argv:
        sys.exit(common.on_both_kernels(__file__, sys.argv[1:], lambda: check(sys.argv[1])))
    if "--old" in sys.argv:
        sys.exit(old_cases(sys.argv[1]))
    if "--big-n" in sys.argv:
        sys.exit(big_n_cases(sys.argv[1]))
    fixtures = "--fixtures" in sys.argv
    if fixtures:
        sys.argv.remove("--fixtures")
    args = common.parse_args("tinygrad_cases.py")
    common.run(cases(args.small), args, compute(args.outdir, args.small),
               fixture_keep if fixtures else None)


if __name__ == "__main__":
    main()
