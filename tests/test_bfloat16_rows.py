"""bfloat16 inputs are widened a slice at a time (`Bfloat16Rows`), never whole, on the streamed
`grad` and `binary` checks: a bf16 file costs its own bytes, not twice them again as float32.
Every slice, view and fallback gives the bits `widen_bfloat16` gives the whole array."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ce_cli.io.bfloat16 import Bfloat16Rows, as_array, stored_precision, widen_bfloat16
from tests.conftest import save, sigmoid, softmax


def bf16_bits(x) -> np.ndarray:
    """float values rounded to bfloat16 (nearest even), as uint16 bits."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


SPECIALS = np.array([0.0, -0.0, 1.0, -2.5e-3, 3.0e38, 1e-40, np.inf, -np.inf, np.nan], np.float32)


@pytest.fixture
def never_whole(monkeypatch):
    """Fail the test if anything widens a whole bfloat16 input."""
    def whole(self):
        raise AssertionError(f"a whole {self.shape} bfloat16 array was widened")
    monkeypatch.setattr(Bfloat16Rows, "whole", whole)


@pytest.mark.parametrize("key", [np.s_[2:5], np.s_[3], np.s_[1, 4], np.s_[[0, 5, 2]], np.s_[:, 1::2],
                                 np.s_[..., 3], np.s_[::-2]], ids=str)
def test_slices_widen_as_the_whole_array(key):
    with np.errstate(over="ignore"):
        bits = bf16_bits(np.resize(SPECIALS, (6, 7)) * np.arange(1, 8, dtype=np.float32))
    lazy, whole = Bfloat16Rows(bits), widen_bfloat16(bits)
    part = lazy[key]
    np.testing.assert_array_equal(np.asarray(part).view(np.uint32), np.asarray(whole[key]).view(np.uint32))
    if isinstance(part, np.ndarray):
        assert stored_precision(part.dtype) == "bf16"
    assert not lazy.materialized


def test_views_stay_lazy_and_fallbacks_widen_once():
    bits = bf16_bits(np.linspace(-3, 3, 24, dtype=np.float32)).reshape(2, 3, 4)
    lazy, whole = Bfloat16Rows(bits), widen_bfloat16(bits)
    assert (lazy.shape, lazy.ndim, lazy.size, lazy.nbytes, len(lazy)) == ((2, 3, 4), 3, 24, 96, 2)
    assert lazy.dtype == np.float32 and stored_precision(lazy.dtype) == "bf16"
    rows = lazy.reshape(6, 4)
    np.testing.assert_array_equal(rows[4:], whole.reshape(6, 4)[4:])
    moved = np.moveaxis(lazy, 1, -1)  # np.moveaxis goes through transpose: the bits move
    assert isinstance(moved, Bfloat16Rows)
    np.testing.assert_array_equal(moved[1], np.moveaxis(whole, 1, -1)[1])
    assert not (lazy.materialized or rows.materialized or moved.materialized)
    assert as_array(lazy) is lazy and isinstance(as_array([1.0]), np.ndarray)
    # anything else answers from one widened copy: the same values as widen_bfloat16's
    np.testing.assert_array_equal(np.asarray(lazy), whole)
    assert lazy.materialized and np.asarray(lazy) is np.asarray(lazy)
    mine = np.array(lazy)  # a copy asked for is one: writing to it changes nothing else
    mine[0] = 7.0
    np.testing.assert_array_equal(np.asarray(lazy), whole)
    np.testing.assert_array_equal(lazy * 2 + 1, whole * 2 + 1)
    np.testing.assert_array_equal(np.exp(lazy), np.exp(whole))
    assert lazy.max() == whole.max() and lazy.astype(np.float64).dtype == np.float64


def _bf16_file(tmp_path, name, values):
    return save(tmp_path, name, bf16_bits(values).view("V2"))


@pytest.mark.parametrize("threads", [1, 2])
def test_grad_reads_bf16_files_a_slice_at_a_time(tmp_path, invoke, both_kernels, never_whole, threads):
    rng = np.random.default_rng(5)
    z = (rng.standard_normal((96, 700)) * 4).astype(np.float32)
    zb = np.asarray(widen_bfloat16(bf16_bits(z)), np.float64)
    y = rng.integers(0, 700, 96)
    g = softmax(zb)
    g[np.arange(96), y] -= 1.0
    g /= 96
    zf, gf = _bf16_file(tmp_path, "z.npy", z), _bf16_file(tmp_path, "g.npy", g)
    yf = save(tmp_path, "y.npy", y)
    res = invoke(["grad", zf, yf, "--grad", gf, "--json", "--threads", threads])
    assert res.exit_code == 0, res.output
    lazy = json.loads(res.stdout)
    # the report the float32 widening gives with bf16's rule said, bit for bit
    wide = [save(tmp_path, n, np.asarray(widen_bfloat16(bf16_bits(v))).view(np.float32))
            for n, v in (("zw.npy", z), ("gw.npy", g))]
    res = invoke(["grad", wide[0], yf, "--grad", wide[1], "--json", "--precision", "bf16",
                  "--threads", threads])
    same = json.loads(res.stdout)
    assert lazy["checks"] == same["checks"] and lazy["loss"] == same["loss"]
    # a wrong bf16 gradient still fails: one row's label entry with the wrong sign
    g[7, y[7]] = -g[7, y[7]]
    res = invoke(["grad", zf, yf, "--grad", _bf16_file(tmp_path, "bad.npy", g), "--json"])
    assert res.exit_code == 1 and "grad_vs_reference" in json.loads(res.stdout)["verdict"]


def test_binary_reads_bf16_files_a_slice_at_a_time(tmp_path, invoke, both_kernels, never_whole):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((64, 300)) * 3).astype(np.float32)
    xb = np.asarray(widen_bfloat16(bf16_bits(x)), np.float64)
    y = (rng.random((64, 300)) < 0.3).astype(np.float32)
    g = (sigmoid(xb) - y) / y.size
    files = [_bf16_file(tmp_path, "x.npy", x), save(tmp_path, "y.npy", y)]
    res = invoke(["binary", *files, "--grad", _bf16_file(tmp_path, "g.npy", g), "--json"])
    assert res.exit_code == 0, res.output
    worst = np.unravel_index(np.argmax(np.abs(g)), g.shape)
    g[worst] = -g[worst]  # the sign of the largest entry flipped
    res = invoke(["binary", *files, "--grad", _bf16_file(tmp_path, "bad.npy", g), "--json"])
    assert res.exit_code == 1
    check = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "grad_vs_reference")
    assert check["mismatches"] == 1 and check["worst"][0]["index"] == [int(i) for i in worst]
