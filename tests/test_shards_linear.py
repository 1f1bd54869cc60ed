"""`linear --shards rows` (ce_cli/verify/shards/linear.py, linear_run.py): row shards of HIDDEN, LABELS and
--grad-hidden with one WEIGHT, --grad-weight and --grad-bias for the batch, merged into the
single-process `check_linear` report, in this process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ce_cli.errors import CeCheckError
from ce_cli.verify import shards as sh
from ce_cli.verify.linear import LinearSettings, check_linear
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.shards.linear_run import LinearBatch, run_linear_shards

EPS = float(np.finfo(np.float64).eps)


def make_linear(n=90, h=12, v=30, seed=0, dtype=np.float32, reduction="mean", smoothing=0.0,
                class_weight=False):
    """Hidden, weight, bias, labels, class weights and the float64 gradients cast to `dtype`."""
    rng = np.random.default_rng(seed)
    H = rng.normal(size=(n, h)).astype(dtype)
    W = (rng.normal(size=(v, h)) * 0.4).astype(dtype)
    b = (rng.normal(size=v) * 0.2).astype(dtype)
    y = rng.integers(0, v, n)
    y[::7] = -100
    cw = rng.uniform(0.5, 2.0, v) if class_weight else np.ones(v)
    z = H.astype(np.float64) @ W.astype(np.float64).T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    live = y != -100
    q = np.zeros_like(p)
    q[np.arange(n)[live], y[live]] = 1.0 - smoothing
    q[live] += smoothing / v
    q *= cw[None, :]
    G = p * q.sum(axis=1, keepdims=True) - q
    G[~live] = 0.0
    if reduction == "mean":
        G /= cw[y[live]].sum()
    grads = {"grad_hidden": G @ W.astype(np.float64), "grad_weight": G.T @ H.astype(np.float64),
             "grad_bias": G.sum(axis=0)}
    arrays = {"hidden": H, "weight": W, "bias": b, "labels": y}
    if class_weight:
        arrays["class_weight"] = cw
    return arrays, {k: g.astype(dtype) for k, g in grads.items()}


def write_linear(tmp_path, arrays, grads, cuts):
    """Row shards of hidden, labels and grad_hidden; one weight, bias, grad_weight, grad_bias."""
    for name in ("weight", "bias", "class_weight"):
        if name in arrays:
            np.save(tmp_path / f"{name}.npy", arrays[name])
    for name in ("grad_weight", "grad_bias"):
        np.save(tmp_path / f"{name}.npy", grads[name])
    files = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        for name, arr in (("hidden", arrays["hidden"]), ("labels", arrays["labels"]),
                          ("gh", grads["grad_hidden"])):
            np.save(tmp_path / f"{name}_{i}.npy", arr[a:b])
        files.append(sh.ShardFiles(*(str(tmp_path / f"{n}_{i}.npy") for n in ("hidden", "labels", "gh"))))
    return files


def run_both(tmp_path, arrays, grads, cuts, mapper=None, exact=False, **opts):
    files = write_linear(tmp_path, arrays, grads, cuts)
    options = CheckOptions.build(None, **{"fd": "off", **opts})
    batch = LinearBatch(str(tmp_path / "weight.npy"), str(tmp_path / "bias.npy"),
                        str(tmp_path / "class_weight.npy") if "class_weight" in arrays else None,
                        LinearSettings(exact=exact))
    merged = run_linear_shards(files, options, batch, grad_weight=str(tmp_path / "grad_weight.npy"),
                               grad_bias=str(tmp_path / "grad_bias.npy"), mapper=mapper)
    single = check_linear(**arrays, **grads, options=options, exact=exact)
    return merged, single


def assert_same_linear(merged, single, n_shards):
    """Verdict, counts, failing entries (global index, values), the loss within the fsum bound;
    passing projections' deviations within a few ulps of the summed partials."""
    assert merged.ok == single.ok
    assert (merged.shape, merged.n_rows, merged.n_classes, merged.n_ignored, merged.reduction) == \
        (single.shape, single.n_rows, single.n_classes, single.n_ignored, single.reduction)
    assert [c.name for c in merged.checks] == [c.name for c in single.checks]
    assert (merged.fd_mode, merged.fd_evaluations) == (single.fd_mode, single.fd_evaluations)
    for m, s in zip(merged.checks, single.checks):
        assert (m.ok, m.mismatches, m.total) == (s.ok, s.mismatches, s.total), m.name
        if m.name.startswith("fd_"):
            assert_same_fd(m, s)
            continue
        if not s.ok:  # the failing entries; passing ones after them rank by rounding noise
            bad_m, bad_s = ([e for e in c.worst if not e.ok] for c in (m, s))
            assert [e.index for e in bad_m] == [e.index for e in bad_s], m.name
            for a, b in zip(bad_m, bad_s):
                assert a.got == b.got and a.expected == pytest.approx(b.expected, rel=1e-12, abs=1e-15)
        assert m.max_abs_err == pytest.approx(s.max_abs_err, rel=1e-6, abs=1e-13), m.name
    bound = (2 + n_shards) * EPS / 2 * abs(single.loss)
    assert abs(merged.loss - single.loss) <= bound
    assert merged.options == single.options


def assert_same_fd(m, s):
    """A finite-difference check: its failing entries at the same global indices; every entry
    listed by both with its finite difference within the probe's own error bound of the
    single-process one (the logits of a row are h W^T by BLAS, which may round differently in a
    shard's row block) and its reference, a sum of row terms, within 1e-12 relative."""
    assert {e.index for e in m.worst if not e.ok} == {e.index for e in s.worst if not e.ok}, m.name
    theirs = {e.index: e for e in s.worst}
    for e in m.worst:
        if e.index in theirs:
            t = theirs[e.index]
            assert abs(e.expected - t.expected) <= t.allowed, (m.name, e, t)
            assert e.got == pytest.approx(t.got, rel=1e-12, abs=1e-20), (m.name, e, t)
            assert e.allowed == pytest.approx(t.allowed, rel=1e-9), (m.name, e, t)
    assert abs(m.max_abs_err - s.max_abs_err) <= max(e.allowed for e in s.worst), m.name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_row_shards_equal_the_single_process_report(tmp_path, dtype, reduction):
    arrays, grads = make_linear(dtype=dtype, reduction=reduction)
    merged, single = run_both(tmp_path, arrays, grads, [0, 20, 21, 64, 90], reduction=reduction)
    assert single.ok and merged.report.ok
    assert_same_linear(merged.report, single, 4)
    assert [s.offset for s in merged.shards] == [0, 20, 21, 64]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fd", ["directional", "sample", "auto"])
def test_finite_differences_equal_the_single_process_report(tmp_path, dtype, fd):
    """Hidden probes on their shards (a one-row shard included), weight and bias probes and the
    bias direction summed over the shards: the nine checks of `check_linear`, in its order."""
    arrays, grads = make_linear(dtype=dtype, class_weight=True, smoothing=0.1)
    merged, single = run_both(tmp_path, arrays, grads, [0, 20, 21, 64, 90], fd=fd,
                              label_smoothing=0.1)
    assert single.ok and merged.report.ok
    assert single.fd_mode in ("directional", "sample") and single.fd_evaluations > 0
    assert sum(c.name.startswith("fd_") for c in single.checks) == 6
    assert_same_linear(merged.report, single, 4)


def _projections(arrays, grads, options):
    """The batch's Gaussian matrices R (dL/dW) and S (dL/dH) as `check_linear` draws them."""
    from ce_cli.verify.linear.arrays import LinearSettings, user_arrays
    from ce_cli.verify.linear.check import linear_problem
    from ce_cli.verify.linear.stream import linear_pass

    src = {k: k for k in ("hidden", "weight", "labels", "bias", "class_weight", "sample_weight",
                          "grad_hidden", "grad_weight", "grad_bias")}
    problem, _, _ = linear_problem(arrays["hidden"], arrays["weight"], arrays["labels"], arrays["bias"],
                             None, None, options, LinearSettings(), src)
    users = user_arrays(problem, grads, src, options, "VH")
    run = linear_pass(problem, users, LinearSettings(), options)
    return run.pw.r, run.ph.r


def _blind(r, size, seed):
    """An error of norm `size` that every projection in R misses (orthogonal to its columns)."""
    e = np.random.default_rng(seed).normal(size=r.shape[0])
    e -= r @ np.linalg.lstsq(r, e, rcond=None)[0]
    return size * e / np.linalg.norm(e)


def test_weight_bug_the_projections_miss_is_caught_by_finite_differences(tmp_path):
    """dL/dW row 7 wrong by an error orthogonal to R (H = 12 > k = 8): every projection agrees,
    the weight probe along row 7 does not."""
    arrays, grads = make_linear(dtype=np.float64)
    r, _ = _projections(arrays, grads, CheckOptions(fd="directional"))
    grads["grad_weight"][7] += _blind(r, 0.02, 1)
    merged, single = run_both(tmp_path, arrays, grads, [0, 30, 60, 90], fd="directional")
    assert not merged.report.ok
    assert_same_linear(merged.report, single, 3)
    checks = {c.name: c for c in merged.report.checks}
    assert checks["grad_weight_vs_reference"].ok  # the projections are blind to it
    assert not checks["fd_weight_vs_grad"].ok
    assert {e.index[0] for e in checks["fd_weight_vs_grad"].worst if not e.ok} == {7}
    assert [c.name for c in merged.report.checks if not c.ok] == ["fd_weight_vs_grad"]


def test_hidden_bug_is_localised_to_its_global_row_by_finite_differences(tmp_path):
    """dL/dH row 71 (shard 2) wrong orthogonally to S: found by its own shard's probe alone."""
    arrays, grads = make_linear(dtype=np.float64)
    _, s = _projections(arrays, grads, CheckOptions(fd="directional"))
    grads["grad_hidden"][71] += _blind(s, 0.05, 2)
    merged, single = run_both(tmp_path, arrays, grads, [0, 30, 60, 90], fd="directional")
    assert_same_linear(merged.report, single, 3)
    checks = {c.name: c for c in merged.report.checks}
    assert checks["grad_hidden_vs_reference"].ok
    fd = checks["fd_hidden_vs_grad"]
    assert not fd.ok and fd.worst[0].index == (71,)
    assert [c.name for c in merged.report.checks if not c.ok] == ["fd_hidden_vs_grad"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_equals_the_single_process_report(tmp_path, dtype):
    """`exact`: dL/dH entry by entry on its shard, dL/dW from the shards' summed G_i^T H_i."""
    arrays, grads = make_linear(dtype=dtype)
    merged, single = run_both(tmp_path, arrays, grads, [0, 20, 21, 64, 90], exact=True)
    assert single.ok and merged.report.ok
    assert [c.note for c in merged.report.checks][:2] == ["exact: every entry"] * 2
    assert_same_linear(merged.report, single, 4)
    grads["grad_hidden"][64, 2] += 0.01
    grads["grad_weight"][3, 9] -= 0.01
    merged, single = run_both(tmp_path, arrays, grads, [0, 20, 21, 64, 90], exact=True, fd="auto")
    assert_same_linear(merged.report, single, 4)
    checks = {c.name: c for c in merged.report.checks}
    assert checks["grad_hidden_vs_reference"].worst[0].index == (64, 2)
    assert checks["grad_hidden_vs_reference"].mismatches == 1
    assert checks["grad_weight_vs_reference"].worst[0].index == (3, 9)
    assert [s.ok for s in merged.shards] == [True, True, True, False]


def test_mean_with_class_weights_and_smoothing_uses_the_batch_denominator(tmp_path):
    arrays, grads = make_linear(class_weight=True, smoothing=0.1)
    merged, single = run_both(tmp_path, arrays, grads, [0, 45, 90], label_smoothing=0.1)
    assert single.ok and merged.report.ok
    assert_same_linear(merged.report, single, 2)
    # each shard's dL/dH divided by its own count instead would fail: the scale is the batch's
    grads["grad_hidden"][:45] *= 2.0
    merged, single = run_both(tmp_path, arrays, grads, [0, 45, 90], label_smoothing=0.1)
    assert not merged.report.ok
    assert_same_linear(merged.report, single, 2)


def test_planted_hidden_bug_is_found_at_its_global_row(tmp_path):
    arrays, grads = make_linear()
    grads["grad_hidden"][71, 4] += 0.05
    merged, single = run_both(tmp_path, arrays, grads, [0, 30, 60, 90])
    assert not merged.report.ok
    assert_same_linear(merged.report, single, 3)
    check = next(c for c in merged.report.checks if c.name == "grad_hidden_vs_reference")
    assert check.worst[0].index == (71, 4) and not check.worst[0].ok
    assert [s.ok for s in merged.shards] == [True, True, False]


def test_planted_weight_bug_is_found_at_its_vocabulary_row(tmp_path):
    """dL/dW rows 7 and 19 wrong: found by the summed projections, listed exactly by the
    second mapped pass (each shard's G_i^T H_i summed)."""
    arrays, grads = make_linear()
    grads["grad_weight"][7, 2] += 0.02
    grads["grad_weight"][19] *= 1.5
    merged, single = run_both(tmp_path, arrays, grads, [0, 30, 60, 90])
    assert not merged.report.ok
    assert_same_linear(merged.report, single, 3)
    check = next(c for c in merged.report.checks if c.name == "grad_weight_vs_reference")
    assert {e.index[0] for e in check.worst if not e.ok} == {7, 19}
    assert "2 of 30 vocabulary rows fail: 7, 19" in check.note
    hidden = next(c for c in merged.report.checks if c.name == "grad_hidden_vs_reference")
    assert hidden.ok


def test_planted_bias_bug(tmp_path):
    arrays, grads = make_linear()
    grads["grad_bias"][11] -= 0.01
    merged, single = run_both(tmp_path, arrays, grads, [0, 50, 90])
    assert_same_linear(merged.report, single, 2)
    check = next(c for c in merged.report.checks if c.name == "grad_bias_vs_reference")
    assert not check.ok and check.worst[0].index == (11,)


def test_weight_gradient_of_one_shard_only_fails(tmp_path):
    """A rank that forgot the all-reduce: dL/dW of shard 0's rows alone."""
    arrays, grads = make_linear()
    part, _ = make_linear()
    cut = 40
    H, W, b, y = (arrays[k] for k in ("hidden", "weight", "bias", "labels"))
    z = H[:cut].astype(np.float64) @ W.astype(np.float64).T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    live = y[:cut] != -100
    p[np.arange(cut)[live], y[:cut][live]] -= 1.0
    p[~live] = 0.0
    grads["grad_weight"] = (p.T @ H[:cut] / np.count_nonzero(y != -100)).astype(np.float32)
    merged, single = run_both(tmp_path, arrays, grads, [0, cut, 90])
    assert not merged.report.ok
    assert_same_linear(merged.report, single, 2)


def test_cli_linear_shards(tmp_path, invoke):
    arrays, grads = make_linear()
    grads["grad_hidden"][33, 1] += 0.05
    write_linear(tmp_path, arrays, grads, [0, 30, 90])
    np.save(tmp_path / "hidden.npy", arrays["hidden"])
    np.save(tmp_path / "labels.npy", arrays["labels"])
    np.save(tmp_path / "gh.npy", grads["grad_hidden"])
    common = [tmp_path / "weight.npy", "--bias", tmp_path / "bias.npy", "--grad-weight",
              tmp_path / "grad_weight.npy", "--grad-bias", tmp_path / "grad_bias.npy", "--json"]
    single = invoke(["linear", tmp_path / "hidden.npy", common[0], tmp_path / "labels.npy",
                     "--grad-hidden", tmp_path / "gh.npy", *common[1:]])
    sharded = invoke(["linear", tmp_path / "hidden_*.npy", common[0], tmp_path / "labels_*.npy",
                      "--grad-hidden", tmp_path / "gh_*.npy", *common[1:], "--shards", "rows"])
    assert single.exit_code == sharded.exit_code == 1, sharded.output
    one, many = json.loads(single.stdout), json.loads(sharded.stdout)
    assert [(c["name"], c["ok"], c["mismatches"]) for c in one["checks"]] == \
        [(c["name"], c["ok"], c["mismatches"]) for c in many["checks"]]
    assert many["fd"] == one["fd"] and many["fd"]["mode"] == "directional"  # `--fd auto`, the default
    hidden = next(c for c in many["checks"] if c["name"] == "grad_hidden_vs_reference")
    assert hidden["worst"][0]["index"] == [33, 1]
    assert [s["verdict"] for s in many["shards"]["per_shard"]] == ["PASS", "FAIL"]


def test_cli_listed_shard_files(tmp_path, invoke):
    """HIDDEN... WEIGHT LABELS and --grad-hidden once per shard: the globbed run's report."""
    arrays, grads = make_linear()
    grads["grad_hidden"][75, 2] += 0.05
    write_linear(tmp_path, arrays, grads, [0, 30, 60, 90])
    tail = ["--bias", tmp_path / "bias.npy", "--grad-weight", tmp_path / "grad_weight.npy",
            "--shards", "rows", "--json"]
    globbed = invoke(["linear", tmp_path / "hidden_*.npy", tmp_path / "weight.npy",
                      tmp_path / "labels_*.npy", "--grad-hidden", tmp_path / "gh_*.npy", *tail])
    listed = invoke(["linear", *(tmp_path / f"hidden_{i}.npy" for i in range(3)),
                     tmp_path / "weight.npy", tmp_path / "labels_*.npy",
                     *(a for i in range(3) for a in ("--grad-hidden", tmp_path / f"gh_{i}.npy")),
                     *tail])
    assert globbed.exit_code == listed.exit_code == 1, listed.output
    assert json.loads(globbed.stdout) == json.loads(listed.stdout)
    hidden = next(c for c in json.loads(listed.stdout)["checks"]
                  if c["name"] == "grad_hidden_vs_reference")
    assert hidden["worst"][0]["index"] == [75, 2]


@pytest.mark.parametrize("extra", [["--grad-hidden", "GH", "--grad-hidden", "GH"], ["HIDDEN"]])
def test_cli_several_files_need_shards(tmp_path, invoke, extra):
    arrays, grads = make_linear()
    write_linear(tmp_path, arrays, grads, [0, 30, 90])
    h, gh = str(tmp_path / "hidden_0.npy"), str(tmp_path / "gh_0.npy")
    extra = [gh if e == "GH" else e for e in extra]
    first = [h, h] if extra == ["HIDDEN"] else [h]
    extra = [] if extra == ["HIDDEN"] else extra
    result = invoke(["linear", *first, tmp_path / "weight.npy", tmp_path / "labels_0.npy", *extra])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "several only with --shards" in result.stderr, result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--fd", "full"], "--fd full: not available for linear"),
    (["--fd", "off", "--shift-labels"], "--shift-labels: linear row shards need (B, T, H)"),
    (["--fd", "off", "--sample-weight", "LABELS"], "shape (30,) has fewer than the 90 rows"),
    (["--fd", "off", "--reduction", "none", "--loss", "LABELS"], "has fewer than the 90 rows"),
    (["--fd", "off", "--shards", "vocab"], "--shards: linear shards split rows"),
])
def test_cli_refuses_what_linear_shards_do_not_carry(tmp_path, invoke, extra, message):
    arrays, grads = make_linear()
    write_linear(tmp_path, arrays, grads, [0, 30, 90])
    extra = [str(tmp_path / "labels_0.npy") if e == "LABELS" else e for e in extra]
    if "--shards" not in extra:
        extra += ["--shards", "rows"]
    result = invoke(["linear", tmp_path / "hidden_*.npy", tmp_path / "weight.npy",
                     tmp_path / "labels_*.npy", *extra])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr


def test_hidden_shards_of_other_shapes_are_refused(tmp_path):
    """(N, H) or (B, T, H) with one T: a 4-D shard, or sequences of different lengths, are one
    line."""
    arrays, grads = make_linear(n=60)
    np.save(tmp_path / "h.npy", arrays["hidden"].reshape(6, 10, -1))
    np.save(tmp_path / "h5.npy", arrays["hidden"].reshape(12, 5, -1))
    np.save(tmp_path / "h4.npy", arrays["hidden"].reshape(3, 2, 10, -1))
    np.save(tmp_path / "w.npy", arrays["weight"])
    np.save(tmp_path / "y.npy", arrays["labels"])
    for names in (["h4.npy"], ["h.npy", "h5.npy"]):
        files = [sh.ShardFiles(str(tmp_path / n), str(tmp_path / "y.npy")) for n in names]
        with pytest.raises(CeCheckError, match="need \\(N, H\\) hidden states, or \\(B, T, H\\)"):
            run_linear_shards(files, CheckOptions(fd="off"), LinearBatch(str(tmp_path / "w.npy")))


@pytest.mark.parametrize("options, batch, message", [
    ({"class_axis": 0}, {}, "`class_axis`: shards need the classes on the last axis"),
    ({"vocab_offset": 3}, {}, "`vocab_offset`: not supported with linear `shards`"),
    ({"reduction": "none"}, {"loss_files": ("a.npy", "b.npy", "c.npy")},
     "`loss`: 3 files for 2 hidden shards (give one per shard, or one file for the whole batch)"),
    ({}, {"sample_weight": ("a.npy", "b.npy", "c.npy")}, "`sample_weight`: 3 files for 2 hidden"),
])
def test_what_linear_shards_refuse_reads_as_the_other_shards(tmp_path, options, batch, message):
    """The refusals linear shards share with `grad --shards`, in their words: one line each."""
    arrays, grads = make_linear(n=20)
    files = write_linear(tmp_path, arrays, grads, [0, 8, 20])
    with pytest.raises(CeCheckError) as err:
        run_linear_shards(files, CheckOptions(fd="off", **options),
                          LinearBatch(str(tmp_path / "weight.npy"), **batch))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fault", ["corrupt", "missing_weight_grad"])
def test_cli_a_shard_that_fails_to_load(tmp_path, invoke, fault):
    arrays, grads = make_linear()
    write_linear(tmp_path, arrays, grads, [0, 30, 60, 90])
    gw = tmp_path / "grad_weight.npy"
    if fault == "corrupt":
        (tmp_path / "hidden_1.npy").write_bytes(b"\x93NUMPY garbage")
        name = "hidden_1.npy"
    else:
        gw.unlink()
        name = "grad_weight.npy"
    result = invoke(["linear", tmp_path / "hidden_*.npy", tmp_path / "weight.npy",
                     tmp_path / "labels_*.npy", "--grad-hidden", tmp_path / "gh_*.npy",
                     "--grad-weight", gw, "--fd", "off", "--shards", "rows"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and name in result.stderr, result.stderr


def test_cli_loss_is_checked_once_for_the_batch(tmp_path, invoke):
    arrays, grads = make_linear()
    write_linear(tmp_path, arrays, grads, [0, 30, 90])
    loss = check_linear(**arrays, options=CheckOptions(fd="off")).loss
    args = ["linear", tmp_path / "hidden_*.npy", tmp_path / "weight.npy", tmp_path / "labels_*.npy",
            "--bias", tmp_path / "bias.npy", "--fd", "off", "--shards", "rows", "--json"]
    good = invoke([*args, "--loss", repr(loss)])
    bad = invoke([*args, "--loss", repr(loss * (1 + 1e-6))])
    assert (good.exit_code, bad.exit_code) == (0, 1), good.output
    check = json.loads(bad.stdout)["checks"][-1]
    assert check["name"] == "loss_vs_reference" and not check["ok"]


def test_one_labels_file_for_the_batch_is_sliced(tmp_path):
    arrays, grads = make_linear()
    grads["grad_hidden"][61, 0] += 0.05
    files = write_linear(tmp_path, arrays, grads, [0, 30, 90])
    np.save(tmp_path / "labels.npy", arrays["labels"])
    files = [sh.ShardFiles(f.logits, str(tmp_path / "labels.npy"), f.grad) for f in files]
    options = CheckOptions(fd="off")
    merged = run_linear_shards(files, options, LinearBatch(str(tmp_path / "weight.npy"),
                                                           str(tmp_path / "bias.npy")))
    single = check_linear(**arrays, grad_hidden=grads["grad_hidden"], options=options)
    assert_same_linear(merged.report, single, 2)
    assert merged.report.checks[0].worst[0].index == (61, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kw", [{"z_loss": 1e-3}, {"softcap": 3.0}, {"logit_scale": 0.6},
                                {"smoothing_form": "others", "label_smoothing": 0.1},
                                {"denominator": 50.0},
                                {"z_loss": 1e-4, "softcap": 5.0, "logit_scale": 1.3,
                                 "label_smoothing": 0.2, "denominator": 80.0}],
                         ids=lambda kw: "-".join(kw))
def test_row_local_options_on_linear_shards(tmp_path, reduction, kw):
    """The training-code options act token by token: linear row shards give the
    single-process report under each (plain gradients: both fail at the same entries)."""
    arrays, grads = make_linear(reduction=reduction)
    for fd in ("off", "directional"):
        merged, single = run_both(tmp_path, arrays, grads, [0, 30, 90], reduction=reduction,
                                  fd=fd, **kw)
        assert not single.ok
        assert_same_linear(merged.report, single, 2)


def run_sequences(tmp_path, arrays, grads, cuts, T, sample_weight=None, per_shard=False, **opts):
    """(B, T, H) shards of whole sequences (cut at sequence `cuts`) against `check_linear` on the
    (B, T, H) batch; `sample_weight` (B, T) one file or one per shard."""
    H = arrays["hidden"].shape[-1]
    seq = {**arrays, "hidden": arrays["hidden"].reshape(-1, T, H),
           "labels": arrays["labels"].reshape(-1, T)}
    gseq = {**grads, "grad_hidden": grads["grad_hidden"].reshape(-1, T, H)}
    files = write_linear(tmp_path, seq, gseq, cuts)
    sw: tuple[str, ...] = ()
    if sample_weight is not None:
        if per_shard:
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
                np.save(tmp_path / f"sw_{i}.npy", sample_weight[a:b])
            sw = tuple(str(tmp_path / f"sw_{i}.npy") for i in range(len(cuts) - 1))
        else:
            np.save(tmp_path / "sw.npy", sample_weight)
            sw = (str(tmp_path / "sw.npy"),)
    options = CheckOptions.build(None, **{"fd": "off", **opts})
    batch = LinearBatch(str(tmp_path / "weight.npy"), str(tmp_path / "bias.npy"), None,
                        LinearSettings(), sample_weight=sw)
    merged = run_linear_shards(files, options, batch, grad_weight=str(tmp_path / "grad_weight.npy"),
                               grad_bias=str(tmp_path / "grad_bias.npy"))
    single = check_linear(**seq, **gseq, options=options, sample_weight=sample_weight)
    return merged, single


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fd", ["off", "directional", "sample"])
def test_shift_labels_on_sequence_shards(tmp_path, reduction, fd):
    """--shift-labels on (B, T, H) shards, each whole sequences: the shift stays inside a shard
    and 'mean' divides by the batch's shifted count; the single-process report (entries at
    (b, t, h)), with the z-loss too."""
    arrays, grads = make_linear(n=90, reduction=reduction)
    merged, single = run_sequences(tmp_path, arrays, grads, [0, 4, 9], 10, reduction=reduction,
                                   fd=fd, shift_labels=True, z_loss=1e-3)
    assert not single.ok and single.options["shift_labels"]
    assert single.shape == (9, 10, 12)
    assert_same_linear(merged.report, single, 2)
    gh = next(c for c in merged.report.checks if c.name == "grad_hidden_vs_reference")
    assert all(len(e.index) == 3 for e in gh.worst)


@pytest.mark.parametrize("per_shard", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sample_weight_on_linear_shards(tmp_path, reduction, per_shard):
    """--sample-weight (the tokens' shape) on linear row shards, one file for the batch or one
    per shard, with --shift-labels: 'mean''s D is the weighted count over the batch."""
    arrays, grads = make_linear(n=90, reduction=reduction)
    sw = np.random.default_rng(3).choice([0.5, 1.0, 2.0, 0.0], (9, 10))
    merged, single = run_sequences(tmp_path, arrays, grads, [0, 4, 9], 10, sample_weight=sw,
                                   per_shard=per_shard, reduction=reduction, shift_labels=True)
    assert not single.ok and single.options["sample_weighted"]
    assert_same_linear(merged.report, single, 2)


def test_cli_linear_sequence_shards(tmp_path, invoke):
    """Through the command line: (B, T, H) shards with --shift-labels and a --sample-weight
    glob; a bug planted at token (5, 3) is found there (exit 1)."""
    arrays, grads = make_linear(n=90)
    seq_h = arrays["hidden"].reshape(9, 10, -1)
    seq_y = arrays["labels"].reshape(9, 10)
    ref = _reference_grad_hidden(seq_h, arrays, seq_y)
    ref[5, 3, 2] += 1e-2
    write_linear(tmp_path, {**arrays, "hidden": seq_h, "labels": seq_y},
                 {**grads, "grad_hidden": ref.astype(np.float32)}, [0, 4, 9])
    for i, (a, b) in enumerate([(0, 4), (4, 9)]):
        np.save(tmp_path / f"sw_{i}.npy", np.ones((b - a, 10)))
    res = invoke(["linear", tmp_path / "hidden_*.npy", tmp_path / "weight.npy",
                  tmp_path / "labels_*.npy", "--bias", tmp_path / "bias.npy", "--grad-hidden",
                  tmp_path / "gh_*.npy", "--shift-labels", "--sample-weight", tmp_path / "sw_*.npy",
                  "--shards", "rows", "--fd", "off", "--json"])
    assert res.exit_code == 1, res.output
    gh = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "grad_hidden_vs_reference")
    assert [e["index"] for e in gh["worst"] if not e["ok"]][:1] == [[5, 3, 2]]


def _reference_grad_hidden(h, arrays, y):
    """dL/dH of the shifted, mean-reduced loss in float64 (one process's reference)."""
    shifted = np.full(y.shape, -100)
    shifted[:, :-1] = y[:, 1:]
    z = h.reshape(-1, h.shape[-1]).astype(np.float64) @ arrays["weight"].astype(np.float64).T \
        + arrays["bias"]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    t = shifted.reshape(-1)
    live = t != -100
    p[np.arange(t.size)[live], t[live]] -= 1.0
    p[~live] = 0.0
    return (p / live.sum() @ arrays["weight"].astype(np.float64)).reshape(h.shape)


def token_losses(arrays, T=None):
    """`check_linear`'s per-token reference losses (lse - z_y, 0 where ignored), float64."""
    z = arrays["hidden"].astype(np.float64) @ arrays["weight"].astype(np.float64).T + arrays["bias"]
    y = arrays["labels"]
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    live = y != -100
    out = np.where(live, lse - z[np.arange(len(y)), np.where(live, y, 0)], 0.0)
    return out if T is None else out.reshape(-1, T)


@pytest.mark.parametrize("per_shard", [False, True])
@pytest.mark.parametrize("T", [None, 10])
def test_per_token_losses_on_linear_shards(tmp_path, per_shard, T):
    """reduction none with --loss: one file of the batch's tokens (each shard its own) or one
    per shard; a wrong token's loss found at its global index ((b, t) for (B, T, H) shards)."""
    arrays, grads = make_linear(n=90, reduction="none")
    per = token_losses(arrays).astype(np.float32)
    per[64] *= 1.01
    cuts = [0, 30, 90] if T is None else [0, 3, 9]
    batch_per = per if T is None else per.reshape(-1, T)
    if per_shard:
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            np.save(tmp_path / f"loss_{i}.npy", batch_per[a:b])
        loss_files = tuple(str(tmp_path / f"loss_{i}.npy") for i in range(2))
    else:
        np.save(tmp_path / "loss.npy", batch_per)
        loss_files = (str(tmp_path / "loss.npy"),)
    seq = arrays if T is None else {**arrays, "hidden": arrays["hidden"].reshape(-1, T, 12),
                                    "labels": arrays["labels"].reshape(-1, T)}
    gseq = grads if T is None else {**grads, "grad_hidden": grads["grad_hidden"].reshape(-1, T, 12)}
    files = write_linear(tmp_path, seq, gseq, cuts)
    options = CheckOptions(fd="off", reduction="none")
    batch = LinearBatch(str(tmp_path / "weight.npy"), str(tmp_path / "bias.npy"),
                        loss_files=loss_files)
    merged = run_linear_shards(files, options, batch, grad_weight=str(tmp_path / "grad_weight.npy"),
                               grad_bias=str(tmp_path / "grad_bias.npy"))
    single = check_linear(**seq, **gseq, loss=batch_per, options=options)
    assert not single.ok
    assert_same_linear(merged.report, single, 2)
    loss = next(c for c in merged.report.checks if c.name == "loss_vs_reference")
    assert [e.index for e in loss.worst if not e.ok] == [(64,) if T is None else (6, 4)]


def test_cli_per_token_losses_on_linear_shards(tmp_path, invoke):
    arrays, grads = make_linear(n=90, reduction="none")
    per = token_losses(arrays)
    per[10] += 1e-3
    write_linear(tmp_path, arrays, grads, [0, 30, 90])
    np.save(tmp_path / "loss_0.npy", per[:30])
    np.save(tmp_path / "loss_1.npy", per[30:])
    res = invoke(["linear", tmp_path / "hidden_*.npy", tmp_path / "weight.npy",
                  tmp_path / "labels_*.npy", "--bias", tmp_path / "bias.npy", "--reduction", "none",
                  "--loss", tmp_path / "loss_*.npy", "--shards", "rows", "--fd", "off", "--json"])
    assert res.exit_code == 1, res.output
    loss = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "loss_vs_reference")
    assert loss["mismatches"] == 1 and loss["worst"][0]["index"] == [10]
