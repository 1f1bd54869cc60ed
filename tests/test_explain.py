"""`ce-check explain`: the derivation of dC/dz = a - y, number by number.

The API tests compare each step with an independent float64 computation (tests/conftest.py's
softmax, finite differences written here); the CLI tests cover exit codes, --json, the C > 12
summary, --compare-mse, --steps and --plot.
"""

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ce_cli.errors import CeCheckError
from ce_cli.explain import (
    FULL_C,
    KAPPA,
    SATURATION_OFFSETS,
    compare_mse,
    explain_binary,
    explain_softmax,
    parse_row,
    step_curve,
)
from tests.conftest import save, sigmoid, softmax, strict_json

EPS = float(np.finfo(np.float64).eps)
EXAMPLE = ["explain", "--logits", "2.0,1.0,0.1", "--label", "0"]
JSON_KEYS = {"z", "a", "y", "jacobian", "dC_da", "chain_rule", "a_minus_y", "fd", "checks"}


def softmax_fd_jacobian(z, h=1e-6):
    """J[j, i] = da_j/dz_i by central differences of the test suite's own softmax."""
    C = z.size
    J = np.empty((C, C))
    for i in range(C):
        e = np.zeros(C)
        e[i] = h
        J[:, i] = (softmax(z + e) - softmax(z - e)) / (2 * h)
    return J


# ---------------------------------------------------------------------------------------------
# the numbers


def test_example_numbers():
    e = explain_softmax([2.0, 1.0, 0.1], label=0)
    a = softmax(np.array([2.0, 1.0, 0.1]))
    y = np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(e.a, a, rtol=1e-15)
    np.testing.assert_array_equal(e.y, y)
    assert e.loss == pytest.approx(-math.log(a[0]), rel=1e-15)
    np.testing.assert_allclose(e.dC_da, [-1.0 / a[0], 0.0, 0.0], rtol=1e-15)
    np.testing.assert_allclose(e.chain_rule, a - y, rtol=0, atol=1e-12)       # product = a - y
    np.testing.assert_allclose(e.a_minus_y, a - y, rtol=0, atol=1e-15)
    np.testing.assert_allclose(e.fd, a - y, rtol=0, atol=1e-9)
    assert e.ok, [c for c in e.checks if not c.ok]
    assert [c.name for c in e.checks] == [
        "softmax_sums_to_1", "softmax_in_0_1", "target_is_distribution", "jacobian_symmetric",
        "jacobian_rows_sum_to_0", "jacobian_vs_fd", "dC_da_vs_fd", "chain_rule_vs_a_minus_y",
        "fd_vs_a_minus_y"]


def test_jacobian_properties():
    z = np.array([0.3, -1.2, 2.5, 0.0, 1.1])
    e = explain_softmax(z, label=2)
    J, a = e.jacobian, softmax(z)
    np.testing.assert_allclose(J, np.diag(a) - np.outer(a, a), rtol=0, atol=1e-16)
    np.testing.assert_array_equal(J, J.T)                                       # symmetric
    assert np.abs(J.sum(axis=1)).max() <= 1e-16                                 # rows sum to 0
    np.testing.assert_allclose(J, softmax_fd_jacobian(z), rtol=0, atol=1e-8)    # finite differences
    np.testing.assert_allclose(e.jacobian_fd, J, rtol=0, atol=1e-9)
    assert np.all(e.jacobian_fd_bound < 1e-8)


def test_soft_target_product_equals_a_minus_y():
    rng = np.random.default_rng(0)
    for _ in range(20):
        C = int(rng.integers(2, 40))
        z = rng.normal(size=C) * rng.choice([0.1, 3.0, 30.0])
        t = rng.dirichlet(np.ones(C))
        e = explain_softmax(z, target=t)
        ref = softmax(z) * t.sum() - t
        np.testing.assert_allclose(e.chain_rule, ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(e.chain_rule, e.a_minus_y, rtol=0, atol=1e-12)
        assert e.ok, [c.name for c in e.checks if not c.ok]


@settings(max_examples=40, deadline=None)
@given(z=st.lists(st.floats(-60, 60), min_size=2, max_size=15), data=st.data())
def test_every_step_checks_out(z, data):
    z = np.array(z)
    label = data.draw(st.integers(0, z.size - 1))
    e = explain_softmax(z, label=label)
    assert e.ok, [(c.name, c.max_abs_err) for c in e.checks if not c.ok]
    assert np.abs(e.chain_rule - e.a_minus_y).max() <= 1e-12


def test_dC_da_is_zero_where_a_underflows_with_y_zero():
    e = explain_softmax([0.0, -800.0, 1.0], label=0)
    assert e.a[1] == 0.0 and e.dC_da[1] == 0.0                  # -0/0 would be NaN; the term is absent
    assert np.isfinite(e.chain_rule).all()
    assert e.ok
    assert any("underflows" in n for n in e.notes)


def test_target_whose_a_underflows_fails_honestly():
    """-y/a is not representable when a underflows with y > 0: the float64 chain rule fails."""
    e = explain_softmax([0.0, -800.0], label=1)
    failed = {c.name for c in e.checks if not c.ok}
    assert "chain_rule_vs_a_minus_y" in failed
    assert "fd_vs_a_minus_y" not in failed                       # a - y itself stays exact
    assert e.a_minus_y[1] == -1.0
    assert any("fuse" in n for n in e.notes)


def test_target_not_summing_to_one_fails_the_identity():
    t = np.array([0.3, 0.3, 0.3])
    z = np.array([2.0, 1.0, 0.1])
    e = explain_softmax(z, target=t)
    failed = {c.name for c in e.checks if not c.ok}
    assert failed == {"target_is_distribution", "chain_rule_vs_a_minus_y", "fd_vs_a_minus_y"}
    # the product and the finite differences agree with each other: (sum y) a - y
    np.testing.assert_allclose(e.chain_rule, 0.9 * softmax(z) - t, atol=1e-12)
    np.testing.assert_allclose(e.fd, 0.9 * softmax(z) - t, atol=1e-9)


def test_saturated_and_masked_samples():
    e = explain_softmax([40.0, 0.0, 0.0], label=0)   # a_0 rounds to 1.0 in float64
    assert e.a[0] == 1.0 and e.one_minus_a[0] == pytest.approx(2 * math.exp(-40), rel=1e-14)
    assert e.a_minus_y[0] == pytest.approx(-2 * math.exp(-40), rel=1e-14)
    assert e.ok
    e = explain_softmax([1.0, -np.inf, 0.0], label=0)
    assert e.a[1] == 0.0 and e.ok and 1 not in e.probed
    e = explain_softmax([1e6 + 52.2, 1e6 + 19.7], label=1)   # large logits: the FD bounds still hold
    assert e.ok
    with pytest.raises(CeCheckError):
        explain_softmax([0.0, -np.inf], label=1)


def test_large_C_is_probed():
    rng = np.random.default_rng(1)
    z = rng.normal(size=FULL_C + 500) * 2
    e = explain_softmax(z, label=7)
    assert e.jacobian is None and 7 in e.probed and e.probed.size < z.size
    np.testing.assert_allclose(e.chain_rule, softmax(z) - np.eye(z.size)[7], atol=1e-12)
    assert e.ok
    assert np.isnan(e.fd).sum() == z.size - e.probed.size


def test_binary_derivation():
    for x, y in ((1.5, 1.0), (-3.0, 0.0), (0.2, 0.3), (40.0, 0.0), (-30.0, 1.0), (705.0, 0.5)):
        e = explain_binary(x, y)
        s = sigmoid(x)
        assert e.ok, (x, y, [c.name for c in e.checks if not c.ok])
        assert e.jacobian[0, 0] == pytest.approx(s * (1 - s), rel=1e-13)
        assert e.chain_rule[0] == pytest.approx(s - y, rel=1e-12, abs=1e-12)
        assert e.a_minus_y[0] == pytest.approx(s - y, rel=1e-12, abs=1e-300)
    with pytest.raises(CeCheckError):
        explain_binary(1.0, 1.5)


def test_mse_vanishes_at_saturation_while_ce_does_not():
    e = explain_softmax([2.0, 1.0, 0.1], label=0)
    m = compare_mse(e)
    s = sigmoid(e.z)
    np.testing.assert_allclose(m.mse_error, (s - e.y) * s * (1 - s), rtol=1e-13)
    np.testing.assert_allclose(m.mse_fd, m.mse_error, atol=1e-9)
    assert m.wrong == 1
    rows = m.saturation
    assert [r.offset for r in rows] == list(SATURATION_OFFSETS)
    assert [r.z for r in rows] == [2.0 + d for d in SATURATION_OFFSETS]
    mse = np.array([abs(r.mse) for r in rows])
    ce = np.array([abs(r.ce) for r in rows])
    assert np.all(np.diff(mse) < 0) and mse[-1] < 1e-9                    # vanishes
    assert np.all(np.diff(ce) > 0) and ce[-1] > 0.999                     # stays ~1
    assert np.all(mse < ce)
    r = rows[0]
    assert r.mse == pytest.approx(sigmoid(2.0) ** 2 * (1 - sigmoid(2.0)), rel=1e-13)
    assert r.ce == pytest.approx(softmax(np.array([2.0, 2.0, 0.1]))[1], rel=1e-13)
    assert all(c.ok for c in m.checks)

    b = compare_mse(explain_binary(1.5, 1.0))
    assert [r.z for r in b.saturation] == [-d for d in SATURATION_OFFSETS]
    assert abs(b.saturation[-1].mse) < 1e-8 and abs(b.saturation[-1].ce) > 0.999999
    assert all(c.ok for c in b.checks)


@pytest.mark.parametrize("z, label", [([2.0, 1.0, 0.1], 0), ([0.5, -0.3, 0.9, 0.1], 3),
                                      ([3.0, -2.0], 1), ([0.7], None)])
def test_step_curve_minimum_near_cube_root_of_eps(z, label):
    e = explain_softmax(z, label=label) if label is not None else explain_binary(z[0], 1.0)
    c = step_curve(e)
    assert c.h[0] == pytest.approx(0.1) and c.h[-1] == pytest.approx(1e-12)
    assert c.h[c.chosen] == KAPPA
    best = c.h[c.best]
    assert KAPPA / 10 <= best <= KAPPA * 10, best
    # the V: both ends are far worse than the bottom (truncation on the left, rounding on the right)
    assert c.error[0] > 1e3 * c.error[c.best] and c.error[-1] > 1e3 * c.error[c.best]
    assert np.all(c.error <= 2 * c.bound)
    assert c.checks[0].ok


def test_parse_row():
    assert parse_row("7") == (7,)
    assert parse_row("1,2") == (1, 2)
    assert parse_row("(1, 2)") == (1, 2)
    for bad in ("", "x", "-1"):
        with pytest.raises(CeCheckError):
            parse_row(bad)


# ---------------------------------------------------------------------------------------------
# the command


def test_cli_example(invoke):
    r = invoke(EXAMPLE)
    assert r.exit_code == 0, r.output
    out = r.stdout
    for text in ("a = softmax(z)", "J[j, i] = da_j/dz_i", "J^T dC/da", "a - y", "finite diff",
                 "0.6590011389", "-0.3409988611", "chain_rule_vs_a_minus_y", "verdict: PASS"):
        assert text in out, text
    assert r.stderr == ""


def test_cli_json_keys_and_values(invoke):
    r = invoke([*EXAMPLE, "--json"])
    assert r.exit_code == 0, r.output
    d = strict_json(r.stdout)
    assert JSON_KEYS <= set(d)
    assert d["ok"] is True and d["kind"] == "multiclass" and d["label"] == 0
    a = softmax(np.array([2.0, 1.0, 0.1]))
    np.testing.assert_allclose(d["a"], a, rtol=1e-15)
    np.testing.assert_allclose(d["jacobian"], np.diag(a) - np.outer(a, a), atol=1e-16)
    np.testing.assert_allclose(d["chain_rule"], d["a_minus_y"], atol=1e-12)
    np.testing.assert_allclose(d["fd"], d["a_minus_y"], atol=1e-9)
    names = {c["name"] for c in d["checks"]}
    assert {"chain_rule_vs_a_minus_y", "jacobian_vs_fd", "fd_vs_a_minus_y"} <= names
    assert all(c["ok"] and {"max_abs_err", "rule", "worst", "mismatches", "total"} <= set(c)
               for c in d["checks"])


def test_cli_summary_beyond_12_classes(invoke, tmp_path):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(3, 20))
    lz, ly = save(tmp_path, "z.npy", z), save(tmp_path, "y.npy", np.array([4, 7, 19]))
    r = invoke(["explain", lz, ly, "--row", "1"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "row 1 of logits file" in out
    assert "the Jacobian is 20 x 20; its largest entries" in out
    assert "the target's row J[7, i] and column J[i, 7]" in out
    assert "of 20 classes" in out
    assert "j \\ i" not in out                                         # no full matrix
    d = strict_json(invoke(["explain", lz, ly, "--row", "1", "--json"]).stdout)
    assert len(d["jacobian"]) == 20 and d["target"] == 7
    np.testing.assert_allclose(d["chain_rule"], softmax(z[1]) - np.eye(20)[7], atol=1e-12)
    assert len(d["jacobian_summary"]["target_row"]) == 20


def test_cli_btv_tuple_row_and_probability_labels(invoke, tmp_path):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 3, 5))
    t = rng.dirichlet(np.ones(5), size=(2, 3))
    lz, lt = save(tmp_path, "z.npy", z), save(tmp_path, "t.npy", t)
    r1 = strict_json(invoke(["explain", lz, lt, "--row", "1,2", "--json"]).stdout)
    r2 = strict_json(invoke(["explain", lz, lt, "--row", "5", "--json"]).stdout)
    assert r1["row"] == [1, 2] and r1["z"] == r2["z"] == list(z[1, 2])
    np.testing.assert_allclose(r1["chain_rule"], softmax(z[1, 2]) - t[1, 2], atol=1e-12)
    assert r1["label"] is None and r1["ok"]


def test_cli_compare_mse(invoke):
    r = invoke([*EXAMPLE, "--compare-mse"])
    assert r.exit_code == 0, r.output
    assert "saturation: the wrong class 1's logit" in r.stdout
    d = strict_json(invoke([*EXAMPLE, "--compare-mse", "--json"]).stdout)
    m = d["compare_mse"]
    sat = m["saturation"]
    assert [row["z"] for row in sat] == [2.0, 4.0, 7.0, 12.0, 22.0]
    assert sat[0]["mse"] == pytest.approx(0.0924780432, rel=1e-9)
    assert sat[0]["ce"] == pytest.approx(0.4652096198, rel=1e-9)
    assert sat[-1]["mse"] < 1e-9 and sat[-1]["ce"] > 0.999
    assert all(abs(row["mse"]) < abs(row["ce"]) for row in sat)
    z = np.array([2.0, 1.0, 0.1])
    s = sigmoid(z)
    np.testing.assert_allclose(m["mse_error"], (s - [1, 0, 0]) * s * (1 - s), rtol=1e-13)
    assert {"mse_vs_fd", "mse_vanishes_at_saturation"} <= {c["name"] for c in d["checks"]}
    b = strict_json(invoke(["explain", "--kind", "binary", "--logits", "0.5", "--label", "1",
                            "--compare-mse", "--json"]).stdout)
    assert [row["z"] for row in b["compare_mse"]["saturation"]] == [0.0, -2.0, -5.0, -10.0, -20.0]
    assert b["ok"]


def test_cli_steps(invoke):
    r = invoke([*EXAMPLE, "--steps"])
    assert r.exit_code == 0, r.output
    assert "< chosen" in r.stdout and "< min" in r.stdout and "eps^(1/3) = 6.06e-06" in r.stdout
    steps = strict_json(invoke([*EXAMPLE, "--steps", "--json"]).stdout)["steps"]
    assert steps["optimum"] == pytest.approx(EPS ** (1 / 3))
    assert steps["optimum"] / 10 <= steps["best_h"] <= steps["optimum"] * 10
    hs = [row["h"] for row in steps["rows"]]
    assert hs[0] == pytest.approx(0.1) and hs[-1] == pytest.approx(1e-12) and len(hs) == 24
    errors = [row["error"] for row in steps["rows"]]
    assert min(errors) == pytest.approx(errors[hs.index(steps["best_h"])])


def test_cli_plot_svg(invoke, tmp_path):
    out = tmp_path / "steps.svg"
    r = invoke([*EXAMPLE, "--plot", out, "-q"])
    assert r.exit_code == 0, r.output
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = out.read_text()
    assert "chosen" in text and "min" in text
    r = invoke([*EXAMPLE, "--plot", tmp_path / "steps.png"])
    assert r.exit_code == 2 and "only .svg" in r.stderr
    assert not (tmp_path / "steps.png").exists()


def test_cli_binary(invoke):
    r = invoke(["explain", "--kind", "binary", "--logits", "-3", "--label", "1", "--json"])
    assert r.exit_code == 0, r.output
    d = strict_json(r.stdout)
    s = sigmoid(-3.0)
    assert d["kind"] == "binary" and d["a"] == pytest.approx([s], rel=1e-15)
    assert d["jacobian"] == [[pytest.approx(s * (1 - s), rel=1e-14)]]
    assert d["chain_rule"] == pytest.approx([s - 1], rel=1e-12)
    r = invoke(["explain", "--kind", "binary", "--logits", "0.3", "--target", "0.25", "--steps"])
    assert r.exit_code == 0, r.output
    assert "s' dC/ds" in r.stdout


def test_cli_failed_step_exits_1(invoke):
    r = invoke(["explain", "--logits", "2,1,0.1", "--target", "0.3,0.3,0.3"])
    assert r.exit_code == 1
    assert "verdict: FAIL" in r.stdout and "not a probability distribution" in r.stdout
    d = strict_json(invoke(["explain", "--logits", "0,-800", "--label", "1", "--json"]).stdout)
    assert d["ok"] is False and d["dC_da"][1] is None          # -inf is written as null


@pytest.mark.parametrize("args, message", [
    ([], "no logits"),
    (["--logits", "1,2"], "give the target once"),
    (["--logits", "1,2", "--label", "0", "--target", "0.5,0.5"], "give the target once"),
    (["--logits", "1,x", "--label", "0"], "not a number: 'x'"),
    (["--logits", "1,nan", "--label", "0"], "NaN logit at class 1"),
    (["--logits", "1,2", "--label", "2"], "out of range [0, 2)"),
    (["--logits", "1", "--label", "0"], "use --kind binary"),
    (["--logits", "1,2", "--label", "0", "--row", "1"], "--row picks a sample"),
    (["--logits", "1,2", "--label", "0", "--steps", "--entry", "9"], "--entry 9"),
    (["--logits", "1,2", "--target", "1"], "1 values for 2 logits"),
    (["--kind", "binary", "--logits", "1,2", "--label", "1"], "explains one logit"),
    (["--kind", "binary", "--logits", "1", "--label", "3"], "0 or 1"),
    (["--kind", "binary", "--logits", "1", "--target", "1.5"], "outside [0, 1]"),
])
def test_cli_usage_errors_exit_2(invoke, args, message):
    r = invoke(["explain", *args])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("ce-check: error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1 and r.stdout == ""


def test_cli_file_errors_exit_2(invoke, tmp_path):
    lz = save(tmp_path, "z.npy", np.zeros((4, 3)))
    ly = save(tmp_path, "y.npy", np.array([0, 1, 2, 3]))
    r = invoke(["explain", lz, ly])
    assert r.exit_code == 2 and "pick one with --row I (0..3)" in r.stderr
    r = invoke(["explain", lz, ly, "--row", "3"])
    assert r.exit_code == 2 and "label 3 of sample (3,) is out of range [0, 3)" in r.stderr
    r = invoke(["explain", lz, ly, "--row", "4"])
    assert r.exit_code == 2 and "out of range" in r.stderr
    r = invoke(["explain", lz, "--logits", "1,2", "--label", "0"])
    assert r.exit_code == 2 and "not both" in r.stderr
    r = invoke(["explain", lz, ly, "--row", "1", "--label", "0"])
    assert r.exit_code == 2 and "give the target once" in r.stderr
    r = invoke(["explain", lz, "--row", "1", "--label", "2"])
    assert r.exit_code == 0, r.output


# --- finite differences that cannot be taken are skipped, with a note ----------------------------
# With relative steps h = eps^(1/3) |z| the kernel's bound (truncation ~h^2) overflows float64 at
# |z| ~ 1e308 (and at |z| > ~1e159): the probe cannot be judged, which is not a failed derivation.

def _checks(data):
    return {c["name"]: c for c in data["checks"]}


@pytest.mark.parametrize("args", [
    ["--kind", "binary", "--logits=-1e308", "--label", "0", "--steps"],
    ["--kind", "binary", "--logits=1e308", "--label", "1", "--steps"],
    ["--kind", "binary", "--logits=1e200", "--label", "1"],
    ["--logits=1e200,0", "--label", "0", "--steps", "--entry", "0"],
])
def test_cli_huge_logit_skips_the_fd_probe_with_a_note(invoke, args):
    result = invoke(["explain", *args])
    assert result.exit_code == 0, result.output
    assert "note: finite differences skipped 1 of" in " ".join(result.stdout.split())
    data = strict_json(invoke(["explain", *args, "--json"]).stdout)
    assert data["ok"] is True
    checks = _checks(data)
    assert "skipped 1 of" in checks["fd_vs_a_minus_y"]["note"]
    assert any("finite differences skipped" in n for n in data["notes"])
    if "--steps" in args:
        assert "skipped 24 of 24" in checks["step_curve_within_bound"]["note"]
        assert "skipped 24 of 24" in " ".join(result.stdout.split())


def test_cli_huge_logit_other_failures_still_fail(invoke):
    """y = 1 at z = -1e308: dC/ds = -1/s is not representable (a genuine float64 failure of the
    literal chain rule); only the finite-difference probes are skipped."""
    result = invoke(["explain", "--kind", "binary", "--logits=-1e308", "--label", "1", "--steps",
                     "--json"])
    assert result.exit_code == 1
    failed = {name for name, c in _checks(strict_json(result.stdout)).items() if not c["ok"]}
    assert failed == {"dC_da_vs_fd", "chain_rule_vs_a_minus_y"}


def test_fd_compare_skips_only_probes_it_cannot_take():
    from ce_cli.explain.common import fd_compare, vector_index

    idx = vector_index(np.arange(3))
    check, skipped = fd_compare("fd", np.array([1.0, 2.0, 3.0]), np.array([np.nan, 2.0, 3.5]),
                                np.full(3, 0.1), "rule", index=idx, expected_label="x")
    assert skipped == 1 and not check.ok and check.mismatches == 1  # 3.5 vs 3 still fails
    assert "skipped 1 of 3" in check.note
    check, skipped = fd_compare("fd", np.array([1.0, np.nan]), np.array([1.0, np.nan]),
                                np.full(2, 0.1), "rule", index=idx, expected_label="x")
    assert skipped == 0 and check.note == ""  # NaN on both sides is not a skipped probe


def test_step_curve_api_counts_skipped_steps():
    curve = step_curve(explain_binary(np.array([-1e308]), np.array([0.0])))
    assert curve.skipped == curve.h.size and all(c.ok for c in curve.checks)
    assert step_curve(explain_binary(np.array([0.5]), np.array([1.0]))).skipped == 0
