"""MLX's real losses: `mlx.nn.losses.cross_entropy` and `binary_cross_entropy` (MLX 0.32.4,
CPU backend, mx.grad), fixtures/frameworks_semantics/mlx/ made by
`scripts/frameworks/mlx_cases.py OUTDIR --small --fixtures` (no MLX import here).

tests/test_semantic_frameworks.py checks the top-level fixtures for false alarms (and its own
planted bugs). This file: the elementwise-weighted BCE of own/ (PyTorch's BCE `weight`, which
that test cannot pass), MLX's planted bugs (its code with one thing changed, differentiated by
mx.grad), why MLX's BCE backward (1 - sigmoid(-z)) passes without an absolute tolerance, and
MLX's float16 smoothing whose loss overflows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ce_cli

FIX = Path(__file__).parent.parent / "fixtures" / "frameworks_semantics" / "mlx"
TOP = sorted(FIX.glob("*.npz"))
OWN = sorted((FIX / "own").glob("*.npz"))
EPS = {"f32": 2.0 ** -23, "f16": 2.0 ** -10, "bf16": 2.0 ** -7}


def _load(path: Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("meta").reshape(-1)[0]))


def _check(arrays: dict, meta: dict, grad_key: str = "grad", loss: bool = True,
           drop: tuple[str, ...] = (), **settings):
    """ce-check on a case with the options its meta states (arrays named by key), minus `drop`."""
    opts = {k: v for k, v in meta["ce_check"].items() if k not in drop}
    named = {k: arrays[v] for k, v in opts.items() if isinstance(v, str) and v in arrays}
    opts = {k: v for k, v in opts.items() if k not in named} | settings
    fn = ce_cli.check_binary if meta["target"] == "binary" else ce_cli.check_grad
    return fn(arrays["logits"], arrays["labels"], grad=arrays[grad_key],
              loss=arrays["loss"] if loss else None, **named, **opts)


def _failed(report) -> list[str]:
    return [c.name for c in report.checks if not c.ok]


def test_mlx_fixtures_are_there():
    names = [p.stem for p in TOP]
    for v in ("int", "int_mean", "int_sum", "smooth", "prob", "prob_smooth", "weights", "masked",
              "axis1", "ninf", "bce", "bce_soft"):
        assert any(n.endswith(f"_{v}") for n in names), v
    assert {n.split("_")[2] for n in names} == {"f32", "f16", "bf16"}
    assert OWN and all(p.stem.endswith("_bce_w") for p in OWN)
    keys = {k for p in TOP + OWN for k in np.load(p).files if k.startswith("grad_bug_")}
    assert keys == {"grad_bug_nosmooth", "grad_bug_allrows", "grad_bug_wone", "grad_bug_row1001"}


@pytest.mark.parametrize("path", OWN, ids=lambda p: p.stem)
def test_no_false_alarm_on_mlx_elementwise_weighted_bce(path):
    arrays, meta = _load(path)
    assert "weight" in meta["ce_check"] and "atol" not in meta["ce_check"]
    report = _check(arrays, meta)
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]


BUGGED = [(p, k) for p in TOP + OWN for k in np.load(p).files if k.startswith("grad_bug_")]


@pytest.mark.parametrize("path,bug", BUGGED, ids=lambda x: getattr(x, "stem", x))
def test_mlx_planted_bugs_are_caught(path, bug):
    """`nosmooth` (MLX's -eps mean(z) term dropped), `allrows` (mlx-lm's masked sum over every
    token), `wone` (one sample's weight doubled), `row1001` (one row's loss x 1.001)."""
    arrays, meta = _load(path)
    assert not np.array_equal(arrays[bug], arrays["grad"])
    report = _check(arrays, meta, bug, loss=False, fd="sample")
    assert "grad_vs_reference" in _failed(report)


BCE32 = [p for p in TOP + OWN if p.stem.startswith("mlx_bce_f32_")]


def test_mlx_bce_complement_rounding_is_within_the_floor():
    """MLX's BCE backward is logaddexp(0, z)'s vjp, 1 - sigmoid(-z): sigmoid(z) to an absolute
    eps / 2, not a relative one where sigmoid(z) << 1. Every float32 entry is within 1.6 eps |w| / D
    of the float64 gradient, and thousands are off by more than the floor's relative part
    (6 eps); the floor's |1 - y| term, k eps |w| |1 - y| / D, passes them without an atol (the
    fixtures carry none)."""
    beyond = 0
    for path in BCE32:
        arrays, meta = _load(path)
        assert "atol" not in meta["ce_check"]
        z = arrays["logits"].astype(np.float64)
        y = arrays["labels"].astype(np.float64)
        w = arrays.get("weight", np.ones_like(z)).astype(np.float64)
        D = z.size if meta["ce_check"]["reduction"] == "mean" else 1
        ref = w * (1.0 / (1.0 + np.exp(-z)) - y) / D
        err = np.abs(arrays["grad"].astype(np.float64) - ref)
        assert (err <= 1.6 * EPS["f32"] * np.abs(w) / D).all(), path.stem
        normal = np.abs(ref) > np.finfo(np.float32).tiny
        beyond += int((err[normal] > 6 * EPS["f32"] * np.abs(ref[normal])).sum())
        assert _check(arrays, meta).ok, path.stem
    assert beyond >= 1000


F16_SMOOTH = [p for p in TOP if p.stem.startswith("mlx_ce_f16_") and "_C1000_s30_" in p.stem]


@pytest.mark.parametrize("path", F16_SMOOTH, ids=lambda p: p.stem)
def test_mlx_float16_smoothing_loss_overflow_is_named(path):
    """MLX's smoothing term -eps mean(z - max) sums C shifted float16 logits in float16: at C =
    1,000, std 30 the sum passes 65,504 and the loss is inf. The loss check fails and says a
    step before the result overflowed; the gradient (1/C per class) passes."""
    arrays, meta = _load(path)
    assert np.isinf(arrays["loss"]).all()
    report = _check(arrays, meta)
    bad = [c for c in report.checks if not c.ok]
    assert [c.name for c in bad] == ["loss_vs_reference"]
    assert "overflowed" in bad[0].note
    assert _check(arrays, meta, loss=False).ok


RELEASED = FIX / "released"


@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_mlx_4188_unshifted_loss_stays_within_the_lse_allowance(dt):
    """ml-explore/mlx#4188: up to 0.32.0 the loss was logsumexp(z) - z_y on the raw logits, so
    a common offset o costs ~eps |o| per row (scripts/frameworks/mlx_released_cases.py: offset
    1e6 in float32, 300 in bfloat16). ce-check passes it, by design: its loss floor allows
    k eps (1 + |lse|) per row, the rounding of every kernel that forms lse = m + log s before
    subtracting z_y (Liger's, flash-attn's), and the gradient is 0.32.1's. Not caught: the
    0.32.0 row losses err 6e4 (f32: 0.029 on ~4.9) and 43 (bf16: 1.0 on ~5.0) times more than
    0.32.4's, and both pass."""
    errs = {}
    for version in ("0.32.0", "0.32.4"):
        arrays, meta = _load(RELEASED / f"mlx{version}_offset_{dt}.npz")
        z = arrays["logits"].astype(np.float64)
        m = z.max(axis=1)
        ref = m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - z[np.arange(len(z)),
                                                                 arrays["labels"]]
        errs[version] = float(np.abs(arrays["loss"] - ref).max())
        assert _check(arrays, meta).ok, version
    assert errs["0.32.0"] > {"f32": 1e4, "bf16": 20.0}[dt] * errs["0.32.4"], errs


@pytest.mark.parametrize("case", ["ce_bf16", "bce_bf16", "bce_f16"])
def test_mlx_4379_16bit_running_sum_loss_is_caught(case):
    """ml-explore/mlx#4379 (fixed in 0.32.3 by #4387): the CPU sum of float16 / bfloat16
    arrays accumulated in that dtype and stalled (bfloat16 sums of ones at 256, float16 at
    2048), so MLX 0.32.2's mean losses come out 34-62 % low (1,024 x 8 bf16 CE: 1.33 for 2.51).
    The loss check fails, alone (the mean's gradient is a broadcast 1/N); 0.32.4's passes."""
    arrays, meta = _load(RELEASED / f"mlx0.32.2_sum16_{case}.npz")
    report = _check(arrays, meta)
    assert _failed(report) == ["loss_vs_reference"]
    (worst,) = next(c for c in report.checks if c.name == "loss_vs_reference").worst[:1]
    assert worst.got < 0.7 * worst.expected
    assert _check(arrays, meta, loss=False).ok
    assert _check(*_load(RELEASED / f"mlx0.32.4_sum16_{case}.npz")).ok
