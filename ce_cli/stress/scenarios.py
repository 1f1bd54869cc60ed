"""Scenarios: families of deterministic float64 logits and labels, each a function of a logit
scale s, and the parsers of --scenarios and --scales."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ce_cli.enums import Kind
from ce_cli.errors import CeCheckError

IGNORE_INDEX = -100
DEFAULT_SCALES = (1.0, 10.0, 30.0, 100.0, 1e3, 1e4)
VOCAB = 131_072

Generator = Callable[[float, np.random.Generator, float], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Scenario:
    """A family of inputs; `make(scale, rng, eps)` gives float64 logits and labels."""

    name: str
    kind: str
    description: str
    make: Generator


def _spread(rng: np.random.Generator, n: int, c: int, s: float) -> np.ndarray:
    """Each row's largest logit exactly s, the others uniform in [-s, s - min(s, 3)]: the row's
    log-sum-exp stays within 0.3 of s (C = 8), so an overflow shows at the scale itself."""
    z = rng.uniform(-s, s - min(s, 3.0), size=(n, c))
    z[np.arange(n), rng.integers(0, c, size=n)] = s
    return z


def _upper_labels(rng: np.random.Generator, z: np.ndarray) -> np.ndarray:
    """A random class among each row's logits >= 0: the label a trained model ranks high."""
    keys = np.where(z >= 0, rng.random(z.shape), -1.0)
    return keys.argmax(axis=1).astype(np.int64)


def _mc_spread(s, rng, _eps, n=16, c=8):
    z = _spread(rng, n, c, s)
    return z, _upper_labels(rng, z)


def _mc_far_label(s, rng, _eps, n=16, c=8):
    z = _spread(rng, n, c, s)
    top = z.argmax(axis=1)
    y = (top + rng.integers(1, c, size=n)) % c
    z[np.arange(n), y] = -s
    return z, y.astype(np.int64)


def _mc_ties(s, rng, _eps, n=16, c=8):
    z = rng.uniform(-s, s, size=(n, c))
    pair = np.stack([rng.permutation(c)[:2] for _ in range(n)])
    r = np.arange(n)
    z[r, pair[:, 0]] = s
    z[r, pair[:, 1]] = s
    y = _upper_labels(rng, z)
    y[::2] = pair[::2, 1]
    return z, y


def _mc_dominant(s, rng, eps, n=16, c=8):
    # past the margin where p_y rounds to 1 in the dtype: (C - 1) e^-M < eps / 2, plus 2
    margin = math.log(c - 1) + math.log(2.0 / eps) + 2.0
    z = s - margin - rng.uniform(0.0, 1.0, size=(n, c))
    y = rng.integers(0, c, size=n)
    z[np.arange(n), y] = s
    return z, y.astype(np.int64)


def _mc_masked(s, rng, _eps, n=16, c=8):
    z = _spread(rng, n, c, s)
    y = _upper_labels(rng, z)
    mask = rng.random(z.shape) < 0.25
    mask[0] = True                  # row 0: every entry but the label masked
    mask[np.arange(n), y] = False
    z[mask] = -np.inf
    return z, y


def _mc_equal(s, rng, _eps, n=16, c=8):
    return np.full((n, c), float(s)), rng.integers(0, c, size=n).astype(np.int64)


def _mc_two_class(s, rng, _eps, n=32):
    z = _spread(rng, n, 2, s)
    return z, rng.integers(0, 2, size=n).astype(np.int64)


def _mc_ignored(s, rng, _eps, n=16, c=8):
    z, y = _mc_spread(s, rng, _eps, n, c)
    y[::4] = IGNORE_INDEX
    return z, y


def _mc_vocab(s, rng, _eps, n=2, c=VOCAB):
    return _mc_spread(s, rng, _eps, n, c)


def _bin_spread(s, rng, _eps, n=16, k=8):
    x = _spread(rng, n, k, s)
    x[np.arange(n), (x.argmax(axis=1) + 1) % k] = -s
    return x, rng.integers(0, 2, size=(n, k)).astype(np.float64)


def _bin_saturated(s, rng, _eps, n=16, k=8):
    sign = rng.choice([-1.0, 1.0], size=(n, k))
    agree = (sign > 0).astype(np.float64)
    y = np.where(rng.random((n, k)) < 0.5, agree, 1.0 - agree)
    return sign * s, y


def _bin_soft(s, rng, _eps, n=16, k=8):
    x, _ = _bin_spread(s, rng, _eps, n, k)
    return x, rng.uniform(0.0, 1.0, size=(n, k))


def _bin_many(s, rng, _eps):
    return _bin_spread(s, rng, _eps, n=2, k=VOCAB // 2)


_MC, _BIN = Kind.multiclass.value, Kind.binary.value

SCENARIOS: dict[str, tuple[Scenario, ...]] = {
    _MC: (
        Scenario("spread", _MC, "16x8 logits uniform in [-s, s], row max exactly s; labels "
                 "on logits >= 0", _mc_spread),
        Scenario("far-label", _MC, "the label on a logit at -s, the row max at s: a confidently "
                 "wrong row, gap 2s", _mc_far_label),
        Scenario("ties", _MC, "two logits tied at the max s; half the labels on a tied class",
                 _mc_ties),
        Scenario("dominant", _MC, "the label's logit s, the others a margin below it past "
                 "where p_y - 1 cancels in the dtype (ln(C-1) + ln(2/eps) + 2)", _mc_dominant),
        Scenario("masked", _MC, "spread with a quarter of the non-label entries -inf; row 0 "
                 "all -inf but the label", _mc_masked),
        Scenario("equal", _MC, "all logits equal s", _mc_equal),
        Scenario("two-class", _MC, "32x2 logits, random labels", _mc_two_class),
        Scenario("ignored", _MC, f"spread with every 4th row's label ignore_index "
                 f"({IGNORE_INDEX})", _mc_ignored),
        Scenario("vocab", _MC, f"2 rows of {VOCAB:,} classes, spread", _mc_vocab),
    ),
    _BIN: (
        Scenario("spread", _BIN, "16x8 logits uniform in [-s, s] with -s and s in every row; "
                 "labels 0/1", _bin_spread),
        Scenario("saturated", _BIN, "logits +-s; half the labels agree with the sign, half "
                 "contradict it", _bin_saturated),
        Scenario("soft", _BIN, "spread logits, soft labels uniform in [0, 1]", _bin_soft),
        Scenario("many", _BIN, f"2 x {VOCAB // 2:,} spread logits, labels 0/1", _bin_many),
    ),
}


def split_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_scenarios(kind: str, text: str | None) -> tuple[Scenario, ...]:
    """The named scenarios of `kind` in their defined order (all of them for None)."""
    known = SCENARIOS[kind]
    if text is None:
        return known
    by_name = {s.name: s for s in known}
    names = split_list(text)
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise CeCheckError(f"--scenarios: unknown scenario '{unknown[0] if unknown else ''}' for "
                           f"--kind {kind} (use {', '.join(by_name)})")
    return tuple(s for s in known if s.name in names)


def parse_scales(text: str | None) -> tuple[float, ...]:
    """Distinct finite scales > 0, ascending (DEFAULT_SCALES for None)."""
    if text is None:
        return DEFAULT_SCALES
    out = []
    for tok in split_list(text):
        try:
            value = float(tok)
        except ValueError:
            raise CeCheckError(f"--scales: '{tok}' is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise CeCheckError(f"--scales: scales must be finite and > 0, got '{tok}'")
        out.append(value)
    if not out:
        raise CeCheckError("--scales: empty list (e.g. --scales 1,10,100)")
    return tuple(sorted(set(out)))
