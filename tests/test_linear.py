"""`ce-check linear`: fused linear cross-entropy, checked without the (N, V) logits.

Parity with PyTorch (fixtures/linear/ from scripts/make_linear_fixtures.py), the bug zoo of
fused kernels caught and localised, float32/bfloat16 outputs raising no false alarm, bad input."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ce_cli
from ce_cli import CeCheckError
from ce_cli.batch.manifest import parse_manifest
from ce_cli.batch.runner import run_case
from tests.conftest import FIXTURES, save

LIN = FIXTURES / "linear"
PARITY = np.load(LIN / "parity.npz")
CASES = sorted({k.split("/")[0] for k in PARITY.files})
GRADS = ("grad_hidden", "grad_weight", "grad_bias")


def reference(h, w, y, b=None, *, reduction="mean", ignore_index=-100, cw=None, smoothing=0.0,
              count_ignored=False):
    """Dense float64 reference: (loss, dH, dW, db, G); `count_ignored` is the zoo's bug."""
    h, w = np.asarray(h, np.float64).reshape(-1, np.shape(h)[-1]), np.asarray(w, np.float64)
    y = np.asarray(y).reshape(-1)
    z = h @ w.T + (0.0 if b is None else b)
    N, V = z.shape
    a = np.exp(z - z.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    valid = y != ignore_index
    ys = np.where(valid, y, 0)
    cwv = np.ones(V) if cw is None else cw
    q = np.zeros((N, V))
    q[np.arange(N), ys] = (1 - smoothing) * cwv[ys]
    q += smoothing / V * cwv
    q[~valid] = 0
    Q = q.sum(1)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    loss = Q * lse - (q * z).sum(1)
    scale = 1.0 / cwv[ys][valid].sum() if reduction == "mean" else 1.0
    G = scale * (Q[:, None] * a - q)
    if count_ignored:
        G[~valid] = scale * a[~valid]
    total = loss if reduction == "none" else loss.sum() * scale
    return total, G @ w, G.T @ h, G.sum(0), G


def problem(seed=0, N=64, H=24, V=300, ignore=True, bias=True):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, H))
    w = rng.standard_normal((V, H)) * 0.4
    b = rng.standard_normal(V) * 0.3 if bias else None
    y = rng.integers(0, V, N)
    if ignore:
        y[[2, 9]] = -100
    return h, w, y, b


def parity_case(case):
    arrays = {k.split("/")[1]: PARITY[k] for k in PARITY.files if k.startswith(case + "/")}
    spec = {"sum_smooth": dict(reduction="sum", label_smoothing=0.1),
            "none": dict(reduction="none"),
            "weighted_smooth": dict(label_smoothing=0.2)}.get(case, {})
    return arrays, spec


# --- parity with PyTorch ---------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_parity_with_pytorch_float64(case):
    """Losses and all three gradients of F.linear + F.cross_entropy (float64), to ~1e-12."""
    arrays, spec = parity_case(case)
    inputs = {k: arrays.get(k) for k in ("bias", "class_weight")}
    grads = {k: arrays[k] for k in GRADS if k in arrays}
    report = ce_cli.check_linear(arrays["hidden"], arrays["weight"], arrays["labels"], **inputs,
                                 **grads, loss=arrays["loss"], exact=True, **spec)
    assert report.ok, [c for c in report.checks if not c.ok]
    torch_loss = arrays["loss"]
    if spec.get("reduction") != "none":
        assert abs(report.loss - float(torch_loss)) <= 1e-12 * abs(float(torch_loss))
    by = {c.name: c for c in report.checks}
    for g in grads:
        check = by[f"{g}_vs_reference"]
        assert check.total == arrays[g].size
        assert check.max_abs_err <= 1e-12 * np.abs(arrays[g]).max(), (g, check.max_abs_err)
    assert ("grad_bias" in grads) == ("bias" in arrays)


@pytest.mark.parametrize("exact", [False, True])
def test_parity_projections_and_exact_agree(exact):
    arrays, _ = parity_case("bias")
    report = ce_cli.check_linear(arrays["hidden"], arrays["weight"], arrays["labels"],
                                 bias=arrays["bias"], **{g: arrays[g] for g in GRADS}, exact=exact)
    assert report.ok
    assert report.options["exact"] is exact
    assert (report.options["projections"] is None) is exact


def test_reference_matches_dense_numpy_with_options():
    h, w, y, b = problem(3)
    cw = np.random.default_rng(1).random(300) + 0.5
    loss, dh, dw, db, _ = reference(h, w, y, b, cw=cw, smoothing=0.15, reduction="sum")
    report = ce_cli.check_linear(h, w, y, bias=b, class_weight=cw, label_smoothing=0.15,
                                 reduction="sum", grad_hidden=dh, grad_weight=dw, grad_bias=db,
                                 loss=loss, exact=True)
    assert report.ok and abs(report.loss - loss) <= 1e-12 * abs(loss)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), N=st.integers(1, 40), H=st.integers(1, 12),
       V=st.integers(2, 90), bias=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_property_reference_gradients_pass(seed, N, H, V, bias, reduction):
    h, w, y, b = problem(seed, N, H, V, ignore=False, bias=bias)
    loss, dh, dw, db, _ = reference(h, w, y, b, reduction=reduction)
    grads = dict(grad_hidden=dh, grad_weight=dw, grad_bias=db if bias else None)
    report = ce_cli.check_linear(h, w, y, bias=b, loss=loss, reduction=reduction, **grads)
    assert report.ok, [c for c in report.checks if not c.ok]


# --- the bug zoo -------------------------------------------------------------------------------

VB = 64  # the zoo kernel's vocabulary block
RB = 16  # and row block


def zoo(bug, h, w, y, b):
    """A blocked kernel with one bug; returns (grad_hidden, grad_weight, grad_bias)."""
    _, dh, dw, db, G = reference(h, w, y, b, count_ignored=bug == "ignored_in_dw")
    if bug == "ignored_in_dw":
        _, dh, _, db, _ = reference(h, w, y, b)
    elif bug == "transposed":
        dw = dw.T.copy()
    elif bug == "wrong_side":
        dw = (h.T @ G).reshape(dw.shape)  # an (H, V) product written into a (V, H) buffer
    elif bug == "bias_no_mean":
        db = db * np.count_nonzero(y != -100)
    elif bug == "wrong_w_block":
        dh = dh - G[:, VB:2 * VB] @ w[VB:2 * VB] + G[:, VB:2 * VB] @ w[2 * VB:3 * VB]
    elif bug == "row_block_lost":
        dh[RB:2 * RB] = 0.0
        dw = dw - G[RB:2 * RB].T @ h[RB:2 * RB]
    elif bug == "vocab_block_twice":
        dw[VB:2 * VB] *= 2.0
        dh = dh + G[:, VB:2 * VB] @ w[VB:2 * VB]
    return dh, dw, db


ZOO = {  # bug -> (failing check, where the worst entries must lie: predicate on the index)
    "transposed": ("grad_weight_vs_reference", None),
    "wrong_side": ("grad_weight_vs_reference", None),
    "bias_no_mean": ("grad_bias_vs_reference", None),
    "ignored_in_dw": ("grad_weight_vs_reference", None),
    "wrong_w_block": ("grad_hidden_vs_reference", None),
    "row_block_lost": ("grad_hidden_vs_reference", lambda idx: RB <= idx[0] < 2 * RB),
    "vocab_block_twice": ("grad_weight_vs_reference", lambda idx: VB <= idx[0] < 2 * VB),
}


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("bug", sorted(ZOO))
def test_bug_zoo_caught_and_localised(bug, exact):
    h, w, y, b = problem(7)
    dh, dw, db = zoo(bug, h, w, y, b)
    report = ce_cli.check_linear(h, w, y, bias=b, grad_hidden=dh, grad_weight=dw, grad_bias=db,
                                 exact=exact)
    assert not report.ok
    by = {c.name: c for c in report.checks}
    name, where = ZOO[bug]
    check = by[name]
    assert not check.ok and check.mismatches > 0
    if bug != "transposed":  # a transposed but right gradient has no wrong entry: the note says so
        assert check.worst and not check.worst[0].ok
    if where is not None:
        assert all(where(e.index) for e in check.worst if not e.ok)
    if bug == "transposed":
        assert "transposed" in check.note and "correct once transposed" in check.note
    if not exact and bug in ("row_block_lost", "vocab_block_twice"):
        lo = RB if bug == "row_block_lost" else VB
        assert f"fail: {lo}-{2 * lo - 1}" in check.note


@pytest.mark.parametrize("bug", [None, "row_block_lost", "vocab_block_twice", "wrong_w_block"])
def test_exact_in_small_blocks_matches_one_block(monkeypatch, bug):
    """`--exact` with many row and vocabulary blocks (dL/dH in the pass's row blocks, dL/dW per
    vocabulary block over recomputed row blocks) gives the one-block verdicts and worst entries."""
    from ce_cli.models import linear as model
    from ce_cli.verify.linear import exact

    h, w, y, b = problem(7)
    if bug is None:
        _, dh, dw, db, _ = reference(h, w, y, b)
    else:
        dh, dw, db = zoo(bug, h, w, y, b)
    grads = dict(bias=b, grad_hidden=dh, grad_weight=dw, grad_bias=db, exact=True, fd="off")
    whole = ce_cli.check_linear(h, w, y, **grads)
    monkeypatch.setattr(model, "BLOCK_BYTES", 16 * 300 * 8)   # 16 rows a pass block: 4 blocks
    monkeypatch.setattr(model, "BLOCK_SHARE", 0.0)
    monkeypatch.setattr(model, "VOCAB_BYTES", 8 * 24 * 100)   # 256 vocabulary rows a block
    monkeypatch.setattr(exact, "EXACT_BLOCK_BYTES", 8 * 24 * 40)  # dL/dW: 40 x 24 blocks
    assert exact.exact_steps(model.LinearCE(h, w, None, y, y >= 0, None, 0.0, "mean", 1.0, (64,)
                                              )) == (40, 24)
    blocked = ce_cli.check_linear(h, w, y, **grads)
    assert blocked.ok is whole.ok is (bug is None)
    for a, c in zip(whole.checks, blocked.checks):
        assert (a.name, a.ok, a.mismatches, a.total) == (c.name, c.ok, c.mismatches, c.total)
        if not a.ok:  # a correct gradient's worst entries are rounding: their order may differ
            assert [e.index for e in a.worst] == [e.index for e in c.worst]
            assert c.max_abs_err == pytest.approx(a.max_abs_err, rel=1e-6)


def test_exact_all_gives_the_in_pass_verdicts():
    """`exact_all` (the row shards' entry point: dL/dH from recomputed row blocks) agrees with
    `check_linear --exact`, which compares dL/dH inside its pass."""
    from ce_cli.verify.linear.arrays import LinearSettings, user_arrays
    from ce_cli.verify.linear.check import ROLES, linear_problem
    from ce_cli.verify.linear.exact import exact_all
    from ce_cli.verify.linear.stream import linear_pass
    from ce_cli.verify.options import CheckOptions

    h, w, y, b = problem(7)
    dh, dw, _ = zoo("row_block_lost", h, w, y, b)
    report = ce_cli.check_linear(h, w, y, bias=b, grad_hidden=dh, grad_weight=dw, exact=True,
                                 fd="off")
    opts, lin = CheckOptions.build(None, fd="off"), LinearSettings(exact=True)
    src = {r: r for r in ROLES}
    prob = linear_problem(h, w, y, b, None, None, opts, lin, src)[0]
    users = user_arrays(prob, {"grad_hidden": dh, "grad_weight": dw}, src, opts, "VH")
    run = linear_pass(prob, users, lin, opts)
    assert run.exact_h is None
    got = exact_all(prob, users, run.lse, run.herr, opts.worst)
    by = {c.name: c for c in report.checks}
    assert [c.name for c in got] == ["grad_weight_vs_reference", "grad_hidden_vs_reference"]
    for c in got:
        a = by[c.name]
        assert (a.ok, a.mismatches, a.total) == (c.ok, c.mismatches, c.total)
        assert [e.index for e in a.worst] == [e.index for e in c.worst]
    assert not by["grad_hidden_vs_reference"].ok


def test_zoo_ignored_tokens_leave_the_hidden_gradient_alone():
    h, w, y, b = problem(7)
    dh, dw, db = zoo("ignored_in_dw", h, w, y, b)
    by = {c.name: c for c in ce_cli.check_linear(h, w, y, bias=b, grad_hidden=dh, grad_weight=dw,
                                                  grad_bias=db).checks}
    assert by["grad_hidden_vs_reference"].ok and by["grad_bias_vs_reference"].ok
    assert not by["grad_weight_vs_reference"].ok


def test_single_entry_error_found_with_its_index():
    h, w, y, b = problem(11)
    _, dh, dw, db, _ = reference(h, w, y, b)
    dw = dw.astype(np.float32)
    dw[123, 5] *= 1.01
    report = ce_cli.check_linear(h, w, y, bias=b, grad_weight=dw)
    check = next(c for c in report.checks if c.name == "grad_weight_vs_reference")
    assert not check.ok and check.worst[0].index == (123, 5)


# --- correct low-precision outputs: no false alarm -------------------------------------------

def blocked_kernel(h, w, y, b, dtype):
    """A fused kernel computing in `dtype` (float32 accumulation for bfloat16), vocabulary
    block by block with an online normaliser, as GPU kernels do."""
    acc = np.float32
    hh, ww = h.astype(dtype).astype(acc), w.astype(dtype).astype(acc)
    bb = b.astype(dtype).astype(acc)
    z = hh @ ww.T + bb
    m = z.max(1, keepdims=True)
    a = np.exp(z - m)
    a /= a.sum(1, keepdims=True)
    valid = y != -100
    a[np.arange(len(y))[valid], y[valid]] -= 1
    a[~valid] = 0
    a /= np.count_nonzero(valid)
    out = (a @ ww, a.T @ hh, a.sum(0))
    return tuple(o.astype(dtype) for o in out), (hh, ww, bb)


def _dtypes():
    out = [np.float32]
    try:
        import ml_dtypes
        out.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", _dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_low_precision_kernel_no_false_alarm(dtype, exact, scale):
    h, w, y, b = problem(5, N=96, H=48, V=500)
    (dh, dw, db), (hh, ww, bb) = blocked_kernel(h * scale, w, y, b, dtype)
    report = ce_cli.check_linear(hh.astype(dtype), ww.astype(dtype), y, bias=bb, grad_hidden=dh,
                                 grad_weight=dw, grad_bias=db, exact=exact)
    assert report.ok, [(c.name, c.note, c.worst[:1]) for c in report.checks if not c.ok]


def test_pytorch_float32_and_bfloat16_fixtures_pass():
    arrays = {k: np.load(LIN / f"{k}.npy") for k in
              ("hidden", "weight", "bias", "labels", "loss", *GRADS)}
    report = ce_cli.check_linear(arrays.pop("hidden"), arrays.pop("weight"), arrays.pop("labels"),
                                 **arrays)
    assert report.ok
    bf = np.load(LIN / "bf16.npz")
    report = ce_cli.check_linear(bf["hidden"], bf["weight"], bf["labels"], bias=bf["bias"],
                                 **{g: bf[g] for g in GRADS}, loss=bf["loss"], precision="bf16")
    assert report.ok, [c for c in report.checks if not c.ok]


def test_bfloat16_loss_stored_wider_is_a_bfloat16_computation():
    """PyTorch's bf16 loss saved with `.float()` and no precision declared: held, as `grad`
    holds it, as the per-sample losses of your gradients' bf16 computation (it failed float32's
    rule); declared bf16, a loss 10% off fails (bf16's per-sample rule, not float32's floor at
    bf16's eps, which allowed 19%)."""
    bf = np.load(LIN / "bf16.npz")
    args = (bf["hidden"], bf["weight"], bf["labels"])
    grads = {g: bf[g] for g in GRADS}
    report = ce_cli.check_linear(*args, bias=bf["bias"], **grads, loss=bf["loss"])
    (loss,) = [c for c in report.checks if c.name == "loss_vs_reference"]
    assert report.ok and "per-sample losses of a bf16 computation" in loss.note
    assert report.verdict == "PASS"
    off = ce_cli.check_linear(*args, bias=bf["bias"], **grads, loss=float(bf["loss"]) * 1.1,
                              precision="bf16")
    assert not off.ok and off.verdict.startswith("FAIL — loss_vs_reference")


def test_bfloat16_weight_gradient_off_by_a_tenth_fails():
    """The bf16 floor is bf16's: |lse| at weight 1/4 and the logits rounded to bf16 once (half
    an ulp of the row's largest |z|), not |h| max|W| units of bf16's eps: dL/dW 10% too large
    fails (it passed before)."""
    bf = np.load(LIN / "bf16.npz")
    report = ce_cli.check_linear(bf["hidden"], bf["weight"], bf["labels"], bias=bf["bias"],
                                 grad_weight=bf["grad_weight"] * 1.1, precision="bf16")
    assert not report.ok and "weight" in report.verdict


def test_bfloat16_gradients_of_a_small_problem_are_checked_entry_by_entry():
    """dL/dH twice too large in bf16: the projections' threshold (every softmax term's bf16
    floor, summed) passes it and their note says so; each entry held to its floor fails it,
    which is the default for bf16 gradients of N V H <= 2^30 (the PyTorch gradient passes);
    float32 gradients keep the projections."""
    bf = np.load(LIN / "bf16.npz")
    args = (bf["hidden"], bf["weight"], bf["labels"])
    twice = bf["grad_hidden"] * 2
    projected = ce_cli.check_linear(*args, bias=bf["bias"], grad_hidden=twice, precision="bf16",
                                    exact=False)
    (note,) = [c.note for c in projected.checks if c.name == "grad_hidden_vs_reference"]
    assert projected.ok and "--exact holds each entry" in note
    default = ce_cli.check_linear(*args, bias=bf["bias"], grad_hidden=twice, precision="bf16")
    assert default.options["exact"] and not default.ok
    assert default.verdict.startswith("FAIL — grad_hidden_vs_reference")
    right = ce_cli.check_linear(*args, bias=bf["bias"], grad_hidden=bf["grad_hidden"],
                                precision="bf16")
    assert right.ok and right.options["exact"]
    arrays = {k: np.load(LIN / f"{k}.npy") for k in ("hidden", "weight", "bias", "labels", *GRADS)}
    f32 = ce_cli.check_linear(arrays.pop("hidden"), arrays.pop("weight"), arrays.pop("labels"),
                              **arrays)
    assert f32.ok and not f32.options["exact"]


def test_bfloat16_outputs_with_a_bug_still_fail():
    bf = np.load(LIN / "bf16.npz")
    gw = bf["grad_weight"].copy()
    gw[64:128] *= 2
    report = ce_cli.check_linear(bf["hidden"], bf["weight"], bf["labels"], bias=bf["bias"],
                                 grad_weight=gw, precision="bf16")
    assert not report.ok


# --- finite differences ----------------------------------------------------------------------

@pytest.mark.parametrize("fd", ["directional", "sample"])
def test_finite_differences_prove_the_reference_and_catch_a_wrong_gradient(fd):
    h, w, y, b = problem(2)
    _, dh, dw, db, _ = reference(h, w, y, b)
    report = ce_cli.check_linear(h, w, y, bias=b, grad_hidden=dh, grad_weight=dw, fd=fd)
    by = {c.name: c for c in report.checks}
    assert report.fd_mode == fd and report.ok
    assert by["fd_hidden_vs_reference"].ok and by["fd_weight_vs_reference"].ok
    report = ce_cli.check_linear(h, w, y, bias=b, grad_hidden=dh * 1.01, grad_weight=dw * 0.99,
                                 fd=fd)
    by = {c.name: c for c in report.checks}
    assert not by["fd_hidden_vs_grad"].ok and not by["fd_weight_vs_grad"].ok
    assert by["fd_hidden_vs_reference"].ok


def test_fd_off_and_full():
    h, w, y, b = problem(2)
    assert ce_cli.check_linear(h, w, y, fd="off").fd_evaluations == 0
    with pytest.raises(CeCheckError, match="fd=full"):
        ce_cli.check_linear(h, w, y, fd="full")


# --- layouts, shapes, bad input ----------------------------------------------------------------

def test_weight_layout_hv_and_batch_shape():
    h, w, y, b = problem(4, N=48)
    _, dh, dw, db, _ = reference(h, w, y, b)
    report = ce_cli.check_linear(h.reshape(2, 24, -1), w.T.copy(), y.reshape(2, 24), bias=b,
                                 grad_hidden=dh.reshape(2, 24, -1), grad_weight=dw.T.copy(),
                                 weight_layout="HV")
    assert report.ok and report.shape == (2, 24, 24)
    dw2 = dw.T.copy()
    dw2[7, 100] += 1.0  # (H, V) index of vocabulary row 100
    report = ce_cli.check_linear(h, w.T.copy(), y, grad_weight=dw2, weight_layout="HV")
    check = next(c for c in report.checks if c.name == "grad_weight_vs_reference")
    assert check.worst[0].index == (7, 100)


@pytest.mark.parametrize("case, message", [
    ("H", "does not match the hidden size H=24"),
    ("transposed", "only transposed; pass --weight-layout HV"),
    ("N", "hold 64 tokens"),
    ("V_bias", "expected bias of shape (300,)"),
    ("label", "out of range [0, 300)"),
    ("grad_hidden", "does not match the hidden states"),
    ("grad_weight", "does not match the weight"),
])
def test_bad_input_exit_2_one_line(invoke, tmp_path, case, message):
    h, w, y, b = problem(1)
    arrays = {"h": h, "w": w, "y": y, "b": b}
    extra = []
    if case == "H":
        arrays["w"] = w[:, :20]
    elif case == "transposed":
        arrays["w"] = w.T
    elif case == "N":
        arrays["y"] = y[:-1]
    elif case == "V_bias":
        arrays["b"] = b[:-1]
    elif case == "label":
        arrays["y"] = np.where(np.arange(64) == 5, 300, y)
    elif case in ("grad_hidden", "grad_weight"):
        extra = [f"--{case.replace('_', '-')}", save(tmp_path, "g.npy", np.zeros((3, 3)))]
    paths = {k: save(tmp_path, f"{k}.npy", v) for k, v in arrays.items()}
    result = invoke(["linear", paths["h"], paths["w"], paths["y"], "--bias", paths["b"], *extra])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ce-check: error: ") and message in lines[0]


# --- the command line and batch ----------------------------------------------------------------

def _fixture_args(grad_weight="grad_weight.npy"):
    return ["linear", LIN / "hidden.npy", LIN / "weight.npy", LIN / "labels.npy",
            "--bias", LIN / "bias.npy", "--grad-hidden", LIN / "grad_hidden.npy",
            "--grad-weight", LIN / grad_weight, "--grad-bias", LIN / "grad_bias.npy",
            "--loss", LIN / "loss.npy"]


def test_cli_fixture_passes_and_bad_fixture_fails(invoke):
    ok = invoke(_fixture_args())
    assert ok.exit_code == 0 and "verdict: PASS" in ok.output
    bad = invoke(_fixture_args("grad_weight_bad.npy") + ["--json"])
    assert bad.exit_code == 1
    data = json.loads(bad.stdout)
    check = next(c for c in data["checks"] if c["name"] == "grad_weight_vs_reference")
    assert data["kind"] == "linear" and not check["ok"]
    assert "64-127" in check["note"]
    assert all(64 <= e["index"][0] < 128 for e in check["worst"])
    assert invoke(_fixture_args("grad_weight_bad.npy") + ["-q"]).output == ""


def test_cli_exact(invoke):
    result = invoke(_fixture_args() + ["--exact", "--json"])
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and data["options"]["exact"] is True
    check = next(c for c in data["checks"] if c["name"] == "grad_weight_vs_reference")
    assert check["total"] == 200 * 32


def test_batch_kind_linear(tmp_path):
    line = {"name": "lin", "kind": "linear", "hidden": str(LIN / "hidden.npy"),
            "weight": str(LIN / "weight.npy"), "labels": str(LIN / "labels.npy"),
            "bias": str(LIN / "bias.npy"), "grad_weight": str(LIN / "grad_weight_bad.npy"),
            "exact": True, "ignore_index": -100}
    good = dict(line, name="ok", grad_weight=str(LIN / "grad_weight.npy"), exact=False)
    cases = parse_manifest("\n".join(json.dumps(x) for x in (line, good)))
    results = [run_case(c) for c in cases]
    assert [r.status for r in results] == ["fail", "pass"]
    bad = parse_manifest(json.dumps({"name": "x", "kind": "linear", "labels": "y.npy",
                                     "weight": "w.npy"}))
    assert bad[0].status == "error" and "hidden" in bad[0].error


def test_api_export():
    assert ce_cli.check_linear is not None and "check_linear" in ce_cli.__all__


def test_inputs_are_not_modified():
    h, w, y, b = problem(8)
    _, dh, dw, db, _ = reference(h, w, y, b)
    copies = [a.copy() for a in (h, w, b, dh, dw)]
    ce_cli.check_linear(h, w, y, bias=b, grad_hidden=dh, grad_weight=dw, grad_bias=db)
    ce_cli.check_linear(h, w, y, bias=b, grad_hidden=dh, grad_weight=dw, exact=True)
    assert all(np.array_equal(a, c) for a, c in zip((h, w, b, dh, dw), copies))


@pytest.mark.parametrize("name, value", [("vocab_offset", 2), ("two_class", True),
                                         ("kl_loss", True), ("class_axis", 1)])
def test_settings_without_logits_are_refused(name, value):
    """check_grad's settings that need the (N, V) logits are one line, never ignored."""
    h, w, y = np.ones((4, 3)), np.ones((5, 3)), np.array([0, 1, 2, 3])
    with pytest.raises(CeCheckError, match=f"`{name}`: not taken by check_linear"):
        ce_cli.check_linear(h, w, y, **{name: value})
