"""MindSpore's own ops.cross_entropy and ops.binary_cross_entropy_with_logits on CPU (PyNative),
differentiated by mindspore.grad, for ce-check's options (runs in a venv with mindspore and
numpy < 2: its PyNative parser is built against numpy 1.x and says "Numpy init failed" with
numpy 2, though exp's error and the NaN loss below are the same with either; --check runs in
ce-check's own environment, with paddle_cases.py's checker).

    python mindspore_cases.py OUTDIR [--small] [--only SUBSTR] [--fixtures]
    python mindspore_cases.py OUTDIR --check

What MindSpore 2.10.0 computes (mindspore/ops/function/nn_func.py) and the ce-check options:

- class indices: `nll_loss(x - logsumexp(x, 1), y, weight, ignore_index, reduction,
  label_smoothing)`, composed of ordinary ops (autodiff differentiates each): the class axis is
  1, `mean` divides by the sum of w_y over the non-ignored rows, label smoothing adds
  (e/C) sum_c w_c (-log a_c) over the same rows -> PyTorch's semantics, the same flags;
- probability targets (a float32 / float16 target): -sum w_c t_c log a_c, smoothed to
  (1 - e) t + e/C, `mean` divided by the rows N -> PyTorch's too;
- `binary_cross_entropy_with_logits(z, y, weight, pos_weight, reduction)`: the BCEWithLogitsLoss
  kernel -> binary, weight, pos_weight;
- float32, float64 and float16 on CPU (the whole composite in float16: logsumexp, the gather,
  the sums); bfloat16 is refused by cross_entropy ("input dtype should be float64, float32 or
  float16").

Cases: float32 and float16, std 1, 10, 30, C 10, 1,000, 32,000, at most 2^17 logits (--small:
2^14), ~15 % of the labels ignored where the variant ignores. OUTDIR/own/ holds the cases the
generic test cannot pass as they are: class weights or pos_weight (arrays), float16, the BCE,
and rows with -inf logits. float32 cases hold planted bugs `grad_bug_<name>`:
`row1001` one row's gradient x 1.001, `allrows` the mean over every row, `weight1` one class
weight x 1.5, `nosmooth` the smoothing dropped, `nopw` pos_weight dropped.

What ce-check finds (the --small sweep, both kernels):

- MindSpore's CPU exp and sigmoid are approximations: against float64, ops.exp errs up to 69
  eps and ops.sigmoid 44 eps in float32 (measured on 100,001 points in [-20, 20]), so its
  float32 gradients carry entry errors of 32 to 512 eps (BCE everywhere; the softmax at std 1
  and C >= 1,000, where no entry dominates): flagged at the default tolerance (`rtol` 2 eps
  plus a 4-eps floor); `rtol` = 256 eps passes the C = 10 cases;
- a row with a -inf logit makes the loss NaN whatever the smoothing: nll_loss always forms
  smooth_loss = -sum_c log a_c (inf) and adds (e/C) * smooth_loss, 0 * inf with e = 0 (the
  same bug MindNLP fixed in its own cross_entropy, candle-org/MindAct PR #1633); the gradient
  is finite and correct: the loss check fails ("NaN/inf on one side only"), the gradient passes.

`--check`: paddle_cases.py's sweep (both kernels: false alarms, planted bugs missed).
fixtures/frameworks_semantics/mindspore/ (tests/test_semantic_frameworks.py,
tests/test_mindspore_real.py): `--small --fixtures`, without the .json files.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import paddle_cases  # noqa: E402  (numpy only at import)

NP: dict[str, type[np.floating]] = {"f32": np.float32, "f16": np.float16}
EPS_LS = 0.1
# variant -> (family, ce-check reduction, layout, target)
VARIANTS = {
    "none": ("ce", "none", "nc", "index"), "sum": ("ce", "sum", "nc", "index"),
    "mean_ign": ("ce", "mean", "nc", "index"), "axis1": ("ce", "mean", "ncd", "index"),
    "weight": ("ce", "mean", "nc", "index"), "weight_sum": ("ce", "sum", "nc", "index"),
    "smooth": ("ce", "mean", "nc", "index"), "smooth_weight": ("ce", "mean", "nc", "index"),
    "prob": ("ce", "mean", "nc", "prob"), "prob_weight": ("ce", "mean", "nc", "prob"),
    "prob_smooth": ("ce", "mean", "nc", "prob"), "neginf": ("ce", "mean", "nc", "index"),
    "bce": ("bce", "mean", "nc", "binary"), "bce_sum": ("bce", "sum", "nc", "binary"),
    "bce_weight": ("bce", "mean", "nc", "binary"), "bce_pw": ("bce", "mean", "nc", "binary"),
}
IGNORED = ("sum", "mean_ign", "axis1", "weight", "weight_sum", "smooth", "smooth_weight")
WEIGHTED = ("weight", "weight_sum", "smooth_weight", "prob_weight")
BUGS = {"mean_ign": ("allrows",), "axis1": ("allrows",), "weight": ("weight1",),
        "weight_sum": ("weight1",), "smooth": ("nosmooth",), "smooth_weight": ("nosmooth",),
        "prob_weight": ("weight1",), "prob_smooth": ("nosmooth",), "bce_pw": ("nopw",)}


def cases(small: bool) -> list[dict]:
    return [c for c in common.semantic_cases("mindspore", VARIANTS, NP, small)
            if c["scale"] in paddle_cases.SCALES]


def fixture_keep(c: dict) -> bool:
    """The committed subset of --small: C = 10 (every std, both dtypes)."""
    return c["C"] == 10


def draw(case: dict, small: bool, seed: int):
    """paddle_cases.draw's arrays, with labels -100 where the variant ignores."""
    v = case["variant"]
    z, y, t, b, w = paddle_cases.draw(dict(case, variant="neginf" if v == "neginf" else ""),
                                      small, seed)
    if v in IGNORED:
        off = np.random.default_rng(seed + 1).random(y.shape) < 0.15
        off.flat[0], off.flat[-1] = True, False
        y[off] = -100
    return z, y, t, b, w


def forward(case: dict, x, y, t, b, w, bug: str):
    """MindSpore's loss of the case (scalar, or per row for `none`), with `bug`."""
    from mindspore import ops
    v = case["variant"]
    if bug == "weight1":
        import mindspore as ms
        w = ms.Tensor(paddle_cases.bad_weight(w.asnumpy(), y.asnumpy()))
    if case["call_tag"] == "bce":
        return ops.binary_cross_entropy_with_logits(
            x, b, weight=w if v == "bce_weight" else None,
            pos_weight=w if v == "bce_pw" and bug != "nopw" else None,
            reduction="sum" if v == "bce_sum" else "mean")
    eps = 0.0 if bug == "nosmooth" or "smooth" not in v else EPS_LS
    kw: dict = dict(weight=w if v in WEIGHTED else None, label_smoothing=eps,
              reduction="sum" if v in ("sum", "weight_sum") else
              "none" if v == "none" else "mean")
    target = t if v.startswith("prob") else y
    if bug == "allrows":
        n = float(y.asnumpy().size)
        return ops.cross_entropy(x, target, **dict(kw, reduction="sum")) / n
    return ops.cross_entropy(x, target, **kw)


def value_and_grad(case: dict, arrays: tuple, bug: str = ""):
    import mindspore as ms
    z, y, t, b, w = arrays
    dt = NP[case["dtype"]]
    x = ms.Tensor(z.astype(dt))
    args = (ms.Tensor(y), ms.Tensor(t.astype(dt)), ms.Tensor(b.astype(dt)), ms.Tensor(w.astype(dt)))

    def f(xx):
        out = forward(case, xx, *args, bug)
        return out.sum() if out.ndim else out
    loss = forward(case, x, *args, bug)
    return loss.asnumpy(), ms.grad(f)(x).asnumpy()


def ce_options(case: dict, arrays: tuple, extra: dict) -> dict:
    """PyTorch's semantics throughout: the flags of the call (`extra` gets the arrays)."""
    v, dt = case["variant"], case["dtype"]
    z, y, t, b, w = arrays
    opts: dict = dict(reduction=case["reduction"], precision=dt)
    if v in WEIGHTED or v in ("bce_weight", "bce_pw"):
        key = "pos_weight" if v == "bce_pw" else "weight"
        opts[key], extra[key] = key, w.astype(NP[dt])
    if case["call_tag"] == "ce" and case["target"] == "index":
        opts["ignore_index"] = -100
    if case["layout"] == "ncd":
        opts["class_axis"] = 1
    if "smooth" in v:
        opts["label_smoothing"] = EPS_LS
    return opts


def compute(outdir: str, small: bool):
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    os.makedirs(os.path.join(outdir, "own"), exist_ok=True)

    def one(case: dict, seed: int):
        v, dt = case["variant"], case["dtype"]
        arrays = draw(case, small, seed)
        z, y, t, b, w = arrays
        loss, grad = value_and_grad(case, arrays)
        extra: dict = {}
        opts = ce_options(case, arrays, extra)
        for bug in BUGS.get(v, ()) if dt == "f32" else ():
            extra["grad_bug_" + bug] = value_and_grad(case, arrays, bug)[1]
        if dt == "f32":
            g = grad.astype(np.float64).reshape(-1, grad.shape[-1]).copy()
            g[int(np.argmax(np.abs(g).max(axis=1)))] *= 1.001
            extra["grad_bug_row1001"] = g.reshape(grad.shape).astype(grad.dtype)
        labels = b if case["call_tag"] == "bce" else (t if v.startswith("prob") else y)
        own = (any(k in opts for k in ("weight", "pos_weight")) or dt == "f16"
               or case["call_tag"] == "bce" or v == "neginf")
        meta = dict(mindspore=ms.__version__, shape=list(z.shape), loss_clipped=False,
                    grad_p_minus_t=False, loss_dtype=str(loss.dtype), grad_dtype=str(grad.dtype))
        if case["call_tag"] == "bce":
            meta["target"] = "binary"
        common.write_case(os.path.join(outdir, "own") if own else outdir, case,
                          logits=z.astype(NP[dt]), labels=labels.astype(NP[dt]) if
                          labels.dtype.kind == "f" else labels, grad=grad, loss=loss,
                          axis=1 if case["layout"] == "ncd" else -1, precision=dt, seed=seed,
                          arrays_extra=extra, ce_check=opts, meta_extra=meta)
    return one


def main():
    if "--check" in sys.argv:
        sys.argv.remove("--check")
        paddle_cases.sweep(sys.argv[1])
        return
    fixtures = "--fixtures" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--fixtures"]
    args = common.parse_args("mindspore_cases.py")
    common.run(cases(args.small), args, compute(args.outdir, args.small),
               fixture_keep if fixtures else None)


if __name__ == "__main__":
    main()
