"""The stored format read from the values (ce_cli/io/stored.py): a float32 gradient written as
CSV or upcast to float64, a bf16 gradient `.float()`ed to be saved, a float32 loss's `.item()`
are compared as what they were stored in, with a note; a genuine float64 (float32) array, or one
of values that prove nothing (0, 0.25), keeps its dtype's precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ce_cli
from ce_cli.io.stored import NAMES, infer_stored, inferred
from tests.conftest import FIXTURES, save, softmax
from tests.test_api_bfloat16 import as_float, to_bf16_bits

D = FIXTURES / "example"
Z, Y, G32 = (np.load(D / f"{n}.npy") for n in ("logits", "labels", "grad"))


def tag(x) -> str | None:
    return inferred(infer_stored(np.asarray(x)).dtype)


def test_float32_values_in_float64():
    assert tag(G32.astype(np.float64)) == "f32"
    assert tag(np.float64(np.float32(4.191544897))) == "f32"  # a float32 loss's .item()
    exact = softmax(Z.astype(np.float64))
    assert tag(exact) is None  # a float64 computation
    mixed = exact.copy()
    mixed[0, 0] = np.float32(mixed[0, 0])
    assert tag(mixed) is None  # every entry, or none


def test_values_that_prove_nothing_keep_the_dtype():
    assert tag(np.array([0.0, 0.25, -1.0, 3.0, np.inf, np.nan])) is None
    assert tag(np.zeros((4, 5), np.float32)) is None
    assert tag(np.array([], np.float64)) is None
    assert tag(np.full(8, 10000.0)) is None  # losses of exactly |z|: integers
    same = np.full(20, np.float32(0.1234567), np.float32)
    assert tag(same.astype(np.float64)) == "f32"  # one value is evidence enough for float32
    assert tag(as_float(to_bf16_bits(same))[:1].repeat(20).astype(np.float32)) is None  # not 16
    tiny = (np.arange(1, 40) * 2.0**-24).astype(np.float16)  # float16 subnormals: few bits
    assert tag(tiny) is None  # a float16 array is never bf16


def test_narrower_formats_in_float32():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(64).astype(np.float32) * 1e-3
    bf16 = as_float(to_bf16_bits(x)).astype(np.float32)
    assert tag(bf16) == "bf16" and tag(bf16.astype(np.float64)) == "bf16"
    f16 = x.astype(np.float16).astype(np.float32)
    assert tag(f16) == "f16"
    assert tag(x) is None
    # a few bf16 values (each a float32 coincidence of 2^-16): 2 distinct are evidence enough,
    # also when float16 holds them too (the looser rule: no false alarm on a bf16 gradient)
    assert tag(bf16[:2]) == "bf16" and tag(bf16[:1].repeat(9)) is None
    assert tag(f16[:3]) == "f16" and tag(f16[:2]) is None
    both = np.array([0.0078125 * (1 + k / 64) for k in (5, 13)], np.float32)
    assert tag(both) == "bf16" and tag(both.astype(np.float16)) is None


def test_small_bf16_gradient_passes(invoke, tmp_path):
    """A correct bf16 gradient of a (2, 5) batch, `.float()`ed to be saved: 10 entries."""
    z = np.array([[1.5, -0.25, 2.0, 0.75, -1.0], [0.5, 1.25, -2.0, 3.0, 0.125]], np.float32)
    y = np.array([1, 3])
    exact = softmax(z.astype(np.float64))
    exact[np.arange(2), y] -= 1.0
    g = as_float(to_bf16_bits((exact / 2).astype(np.float32))).astype(np.float32)
    paths = [save(tmp_path, n, a) for n, a in (("z.npy", z), ("y.npy", y), ("g.npy", g))]
    r = invoke(["grad", *paths[:2], "--grad", paths[2], "--json"])
    assert r.exit_code == 0, r.stdout
    assert "every entry is a bfloat16 value" in " ".join(json.loads(r.stdout)["warnings"])


@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False),
                min_size=1, max_size=50))
def test_widened_float32_is_always_recognised_when_evidence_exists(values):
    arr = np.array(values, np.float32).astype(np.float64)
    from ce_cli.io.stored import _evidence
    got = tag(arr)
    if _evidence(arr, "f32", 1):
        assert got in ("f32", "f16", "bf16")
    else:
        assert got is None


def _held_by_casting(v: np.ndarray, f: str) -> bool:
    """The definition: a round trip through the format gives every entry back."""
    with np.errstate(all="ignore"):
        narrow = v.astype(np.float16 if f == "f16" else np.float32)
        same = narrow.astype(v.dtype) == v
        if f == "bf16":
            same &= (narrow.view(np.uint32) & 0xFFFF) == 0
    return bool((same | ~np.isfinite(v)).all())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=st.data())
def test_holding_is_the_round_trip(dtype, data):
    """Any bit pattern (subnormals, the formats' edges, past their largest, inf, NaN)."""
    from ce_cli.io.stored import NARROWER, _holding
    uint = np.uint32 if dtype == np.float32 else np.uint64
    # float16's largest, past it, its least subnormal and half of it; bf16's largest; the
    # least float32; bf16's and float32's least subnormals halved (rounded in a cast)
    edges = [65504.0, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25,
             float.fromhex("0x1.FEp127"), float(np.float32(1e-45))]
    edges += [k * 2.0**e for k in (1, 3) for e in (-134, -150)]
    # bit patterns with their low k bits cleared: at k = 52 - 7 (float64) or 23 - 7 (float32)
    # a bfloat16 value if normal, at k one less a value with one significand bit too many
    spare = 52 if dtype == np.float64 else 23
    cleared = st.one_of(st.sampled_from([spare - p + d for p in (7, 10, 23) for d in (0, -1)
                                         if spare - p + d > 0]), st.integers(0, spare))
    bits = st.tuples(st.integers(0, np.iinfo(uint).max), cleared)
    patterns = st.one_of(bits.map(lambda t: uint((t[0] >> t[1]) << t[1]).view(dtype)),
                         st.sampled_from(edges), st.floats(width=16), st.floats(width=32))
    patterns = patterns.map(dtype)
    v = np.array(data.draw(st.lists(patterns, min_size=1, max_size=3)), dtype)
    formats = list(NARROWER[v.dtype.itemsize])
    assert _holding(v, formats) == [f for f in formats if _held_by_casting(v, f)]


@given(st.integers(0, 10_000))
def test_float64_computations_are_not_tagged(seed):
    z = np.random.default_rng(seed).standard_normal((4, 7)) * 3.0
    assert tag(softmax(z) - 0.25) is None


def test_csv_float32_gradient_passes_with_a_note(invoke, tmp_path):
    for name, arr in (("z.csv", Z), ("g.csv", G32)):
        np.savetxt(tmp_path / name, arr, delimiter=",")
    result = invoke(["grad", tmp_path / "z.csv", D / "labels.npy", "--grad", tmp_path / "g.csv",
                     "--json"])
    assert result.exit_code == 0, result.stdout
    rep = json.loads(result.stdout)
    assert rep["options"]["precision"] == "f32"
    assert any("every entry is a float32 value (held as float64)" in w for w in rep["warnings"])
    bad = np.load(D / "grad_bad.npy")
    np.savetxt(tmp_path / "bad.csv", bad, delimiter=",")
    result = invoke(["grad", tmp_path / "z.csv", D / "labels.npy", "--grad",
                     tmp_path / "bad.csv", "--json"])
    assert result.exit_code == 1
    worst = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "grad_vs_reference")
    assert worst["worst"][0]["index"] == [7, 3]


@pytest.mark.parametrize("role", ["grad", "loss"])
def test_upcast_values_through_the_api(role):
    loss = float(np.load(D / "loss.npy"))  # float32 loss, as .item() gives it
    report = ce_cli.check_grad(Z, Y, grad=G32.astype(np.float64) if role == "grad" else G32,
                               loss=loss)
    assert report.ok
    label = {"grad": "grad", "loss": "loss"}[role]
    assert any(w.startswith(f"{label}: every entry is a float32 value") for w in report.warnings)


def test_saved_npy_of_upcast_float32(invoke, tmp_path):
    g = save(tmp_path, "g.npy", G32.astype(np.float64))
    result = invoke(["grad", D / "logits.npy", D / "labels.npy", "--grad", g])
    assert result.exit_code == 0 and "compared as stored in f32" in result.stderr


# --- what is read, and for which inputs -------------------------------------------------------

def test_only_compared_inputs_are_read_for_it(tmp_path):
    """Labels, logits and weights set no tolerance: they are loaded as they are, however their
    values look (0/1 float32 labels of a multi-label batch are any format's values)."""
    from ce_cli.io.inputs import InputSpec, Origin

    g = G32.astype(np.float64)  # float32 values, with evidence
    path = save(tmp_path, "g.npy", g)
    assert inferred(InputSpec("grad", path, Origin.file).load().dtype) == "f32"
    for role in ("logits", "labels", "weight", "sample_weight"):
        assert InputSpec(role, path, Origin.file).load().dtype.metadata is None


def test_no_evidence_reads_only_the_spread_sample(monkeypatch):
    """An array of values that prove nothing (0/1 labels as a gradient, zeros) is refused from
    its spread sample alone: no pass over every entry."""
    from ce_cli.io import stored

    sizes = []
    holding = stored._holding
    monkeypatch.setattr(stored, "_holding", lambda v, f: sizes.append(v.size) or holding(v, f))
    x = (np.random.default_rng(0).random(3 << 20) < 0.05).astype(np.float32)
    assert infer_stored(x) is x
    blocks, size = stored.SPREAD
    assert sizes and max(sizes) <= stored.SAMPLE + blocks * size


def test_evidence_in_the_sample_then_every_entry_is_read():
    """The spread sample finds the evidence; one entry past it that is no bfloat16 value keeps
    the array untagged."""
    from ce_cli.io import stored

    rng = np.random.default_rng(1)
    x = as_float(to_bf16_bits(rng.standard_normal(3 << 20).astype(np.float32)))
    assert inferred(infer_stored(x).dtype) == "bf16"
    late = stored.SAMPLE + stored.SPREAD[1] + 5  # after the first block, before the second
    assert late < int(np.linspace(stored.SAMPLE, x.size - stored.SPREAD[1], stored.SPREAD[0])[1])
    x[late] = 1.0 + 2.0 ** -40  # no float32 value either
    assert infer_stored(x) is x


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_one_loss_value_of_the_logits_16_bit_format(fmt, invoke, tmp_path):
    """A bf16 (float16) computation's loss, `.item()`ed or typed: one value proves no format,
    so it is taken as stored in the logits' 16-bit format when it is a value of it."""
    from tests.test_api_bfloat16 import as_void
    z32, y = np.load(D / "logits.npy"), np.load(D / "labels.npy")
    bits = to_bf16_bits(z32)
    z = as_void(bits) if fmt == "bf16" else z32.astype(np.float16)
    zf = as_float(bits) if fmt == "bf16" else z.astype(np.float64)
    p = softmax(zf)
    exact = float(-np.log(p[np.arange(len(y)), y]).mean())
    loss = float(as_float(to_bf16_bits(np.float32(exact)))[()] if fmt == "bf16"
                 else np.float16(exact))
    assert loss != exact
    report = ce_cli.check_grad(z, y, loss=loss)
    assert report.ok and any(f"loss: every entry is a {NAMES[fmt]} value" in w
                             for w in report.warnings)
    assert not ce_cli.check_grad(z, y, loss=loss * 1.05).ok
    assert not ce_cli.check_grad(z32, y, loss=loss).ok  # float32 logits: held to float64's rule
    if fmt == "f16":  # typed on the command line, float16 logits from a .npy
        np.save(tmp_path / "z.npy", z)
        r = invoke(["grad", tmp_path / "z.npy", D / "labels.npy", "--loss", repr(loss), "--json"])
        assert r.exit_code == 0, r.stdout


def test_loss_and_small_gradient_take_the_format_the_others_show():
    """bf16 logits, gradient and loss, all saved as exact float32 upcasts (JAX's arrays under
    np.asarray(x, np.float32)): the logits' and gradient's values show bf16, and the loss's one
    value and a 4 x 2 gradient's few saturated ones are bf16 values, so all three are held to
    bf16's rule."""
    rng = np.random.default_rng(0)
    z = as_float(to_bf16_bits(rng.standard_normal((64, 50)).astype(np.float32) * 3))
    y = rng.integers(0, 50, 64)
    p = softmax(z)
    exact = float(-np.log(p[np.arange(64), y]).mean())
    p[np.arange(64), y] -= 1.0
    g = as_float(to_bf16_bits((p / 64).astype(np.float32))).astype(np.float32)
    loss = np.float32(as_float(to_bf16_bits(np.float32(exact)))[()])
    report = ce_cli.check_grad(z.astype(np.float32), y, grad=g, loss=loss)
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]
    assert sum("every entry is a bfloat16 value" in w for w in report.warnings) == 2
    assert not ce_cli.check_grad(z.astype(np.float32), y, grad=g, loss=loss * 1.05).ok
    # a 4 x 2 batch of one row repeated: one distinct value, no evidence of its own
    from tests.test_api_bfloat16 import as_void
    zs = np.array([[3.0, 1.0]] * 4, np.float32)
    ys = np.zeros(4, np.int64)
    ps = softmax(zs.astype(np.float64))
    ps[:, 0] -= 1.0
    gs = as_float(to_bf16_bits((ps / 4).astype(np.float32))).astype(np.float32)
    assert tag(gs) is None and not ce_cli.check_grad(zs, ys, grad=gs).ok  # held to float32's
    assert ce_cli.check_grad(as_void(to_bf16_bits(zs)), ys, grad=gs).ok  # bf16 logits


def test_bf16_values_in_float16_subnormal_range_take_float16_spacing_too():
    """Values both formats hold with some below float16's smallest normal (a float16 gradient
    of a mean over many elements: subnormals of few bits) are bfloat16's with float16's
    subnormal spacing (`tiny`) and range; without such values the tag names bfloat16 alone."""
    from ce_cli.io.bfloat16 import stored_also
    from ce_cli.verify.tolerance import PRECISIONS, resolve_tolerance
    rng = np.random.default_rng(3)
    sub = (rng.integers(17, 200, 4000) * 2.0**-24).astype(np.float32)  # float16 subnormals
    sub[::7] *= -1
    t = infer_stored(sub)
    assert tag(t) == "bf16" and stored_also(t.dtype) == "f16"
    tol = resolve_tolerance(t.dtype)
    assert tol.precision == "bf16" and tol.tiny == PRECISIONS["f16"][1] and tol.overflow == 65520.0
    normal = sub * 2.0**12  # the same bits, all normal in float16
    t = infer_stored(normal)
    assert tag(t) == "bf16" and stored_also(t.dtype) is None
    assert resolve_tolerance(t.dtype).tiny == PRECISIONS["bf16"][1]
