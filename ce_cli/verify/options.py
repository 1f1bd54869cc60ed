"""`CheckOptions`: every setting of a check in one frozen object, shared by the API, the command
line and `batch` manifests (whose keys are these field names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from ce_cli.enums import FDMode, Precision, Reduction
from ce_cli.errors import CeCheckError
from ce_cli.models.semantics import EMPTY_MEANS, Semantics, validate_scalars
from ce_cli.verify.tolerance import Tolerance, parse_precision, resolve_tolerance


@dataclass(frozen=True)
class CheckOptions:
    """How the loss is defined (PyTorch's arguments) and how closely it is checked.

    Semantics: `reduction`, `ignore_index`, `label_smoothing`, `class_axis` (softmax CE);
    `two_class` (binary: (..., 2) softmax logits). Tolerances (verify/tolerance.py): `rtol`,
    `atol`, `precision` the gradient was computed in, `floor_factor` k of the error floor,
    `loss_atol` (a typed loss's last digit), `normaliser_rtol` the largest row factor allowed
    (default 0.5 eps_sum (C - 1) + k eps, verify/allowance.py), `strict_subnormals` to fail
    results flushed to zero. Finite differences: `fd` mode, `samples`, `seed`.
    Report: `worst` entries per check. `chunk_elements`: entries per streamed row chunk;
    `threads` the kernel's (default: CE_CHECK_THREADS, else the cores this process may use),
    which change no bit of the report.
    Training-code semantics (softmax CE, models/semantics.py): `z_loss` coefficient, `softcap`,
    `logit_scale`, `smoothing_form` (torch: eps/C everywhere; others: 1 - eps on the target,
    eps/(C - 1) elsewhere), an outside `denominator`, `shift_labels` (causal LM), and
    `vocab_offset` K of a vocabulary shard (with the global `lse` given to check_grad) and its
    whole vocabulary's `vocab_size` V (label smoothing over V, V class weights), and
    `kl_loss`: your loss is the KL divergence to the smoothed one-hot targets, the cross-entropy
    minus their entropy H(q) (T5X, Flax; the gradient is the same), and `empty_mean`: 'mean'
    with every target ignored (a zero total weight) is "nan" (0/0, PyTorch) or "zero" (Liger,
    Keras, PaddlePaddle).
    Sigmoid BCE (check_binary) takes `softcap`, `logit_scale`, `denominator` and
    `label_smoothing` (toward 1/2: y (1 - A) + A/2), and refuses the softmax-only ones.
    """

    reduction: Reduction = Reduction.mean
    ignore_index: int = -100
    label_smoothing: float = 0.0
    class_axis: int = -1
    two_class: bool = False
    rtol: float | None = None
    atol: float | None = None
    precision: Precision | None = None
    floor_factor: float | None = None
    loss_atol: float = 0.0
    normaliser_rtol: float | None = None
    strict_subnormals: bool = False
    fd: FDMode = FDMode.auto
    samples: int = 256
    seed: int = 0
    worst: int = 5
    chunk_elements: int | None = None
    threads: int | None = None
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    smoothing_form: str = "torch"
    denominator: float | None = None
    shift_labels: bool = False
    vocab_offset: int | None = None
    vocab_size: int | None = None
    kl_loss: bool = False
    empty_mean: str = "nan"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise once, in a frozen dataclass
        set_(self, "reduction", _choice(Reduction, self.reduction, "reduction"))
        set_(self, "fd", _choice(FDMode, self.fd, "fd"))
        if self.precision is not None:
            set_(self, "precision", _precision(self.precision))
        for name in ("rtol", "atol", "floor_factor", "normaliser_rtol"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise CeCheckError(f"`{name}`: must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.label_smoothing) and 0.0 <= self.label_smoothing <= 1.0):
            raise CeCheckError(f"`label_smoothing`: must be in [0, 1], got {self.label_smoothing}")
        for name, least in INTEGER_LEAST:
            value = getattr(self, name)
            if value is not None and value < least:
                bound = "at least 1" if least else ">= 0"
                raise CeCheckError(f"`{name}`: must be {bound}, got {value}")
        validate_scalars(self.z_loss, self.softcap, self.logit_scale, self.smoothing_form,
                         self.denominator)
        if self.empty_mean not in EMPTY_MEANS:
            raise CeCheckError(f"`empty_mean`: unknown value '{self.empty_mean}' (use nan or zero)")

    def semantics(self, sample_weight: Any = None, **shard: Any) -> Semantics:
        """The training-code semantics these options set (models/semantics.py), with the
        batch's `sample_weight` and a vocabulary shard's `vocab_offset`, `vocab_size`."""
        return Semantics(z_loss=self.z_loss, softcap=self.softcap, logit_scale=self.logit_scale,
                         smoothing_form=self.smoothing_form, denominator=self.denominator,
                         sample_weight=sample_weight, empty_mean=self.empty_mean, **shard)

    @classmethod
    def build(cls, options: CheckOptions | None = None, **settings: Any) -> CheckOptions:
        """`options` (or the defaults) with `settings` replacing fields; unknown names are a
        TypeError, as for any keyword argument."""
        unknown = set(settings) - FIELDS
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return replace(options or cls(), **settings)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def tolerance(self, dtype: Any) -> Tolerance:
        """The tolerance of a compared array stored as `dtype` (not floating point: float64;
        bfloat16 kept as ml_dtypes': bf16), with this check's precision, rtol, atol, k."""
        dt = np.dtype(dtype)
        precision = self.precision.value if self.precision is not None else None
        if dt.name == "bfloat16":  # ml_dtypes' type is not of kind "f"
            precision = precision or "bf16"
        elif dt.kind != "f":
            dt = np.dtype(np.float64)
        return resolve_tolerance(dt, precision, self.rtol, self.atol, self.floor_factor)


FIELDS = frozenset(f.name for f in fields(CheckOptions))
# the integer settings' least values (None, where allowed, is not checked)
INTEGER_LEAST = (("samples", 1), ("worst", 0), ("seed", 0), ("threads", 1), ("vocab_offset", 0),
                 ("vocab_size", 1))


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, (Reduction, FDMode, Precision)) else value


def _choice(enum: Any, value: Any, name: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise CeCheckError(f"`{name}`: unknown value '{value}' (use {allowed})") from None


def _precision(value: Any) -> Precision:
    return Precision(parse_precision(value.value if isinstance(value, Precision) else str(value)))
