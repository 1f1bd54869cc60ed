"""`ce-check batch`: a JSON-lines manifest of cases, read and validated.

One case per line; the keys are the input roles and the check's settings, by their parameter
names (the command line's flags with `_` for `-`):

    {"name": "ce", "kind": "multiclass", "logits": "z.npy", "labels": "y.npy", "grad": "g.npy"}

Paths are relative to the manifest's folder (to the working directory for a manifest read
from stdin). A line that is not a valid case becomes an `error` result naming the line and the
key; the other cases still run. Nothing here runs a check or prints: `ce_cli.batch.runner`
runs the cases, and `ce_cli.cli.batch` renders the results.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from ce_cli.enums import FDMode, Kind, Precision, Reduction
from ce_cli.errors import CeCheckError
from ce_cli.io import limits
from ce_cli.io.inputs import NUMBER_ROLES, STDIN, InputSpec, Origin
from ce_cli.io.limits import quoted
from ce_cli.io.loading import read_pipe
from ce_cli.verify.results import Report

LINEAR = "linear"  # fused linear cross-entropy (check_linear): hidden states and weight, no logits
KINDS = (*(k.value for k in Kind), LINEAR)
LINEAR_INPUTS = ("hidden", "bias", "grad_hidden", "grad_weight", "grad_bias", "class_weight")
SEMANTIC_INPUTS = ("lse", "sample_weight", "z_loss_value")
INPUT_ROLES = ("logits", "labels", "grad", "loss", "weight", "pos_weight", *LINEAR_INPUTS,
               *SEMANTIC_INPUTS)
REQUIRED = ("name", "kind", "logits", "labels")
REQUIRED_BY_KIND = {LINEAR: ("name", "kind", "hidden", "weight", "labels")}

PASS, FAIL, ERROR = "pass", "fail", "error"


# --- the settings keys: each one's check, in one table -----------------------------------------

Validator = Callable[[str, Any], Any]


def _json_value(value: Any) -> str:
    """The value as JSON, cut to MAX_QUOTED_CHARS (a message is one short line)."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = "a value"
    limit = limits.MAX_QUOTED_CHARS
    return text if len(text) <= limit else text[:limit] + "..."


def _choice(enum: type[Enum]) -> Validator:
    choices = [str(m.value) for m in enum]

    def check(key: str, value: Any) -> Any:
        if value not in choices:
            raise CeCheckError(f"'{key}': must be one of {', '.join(choices)}, got {_json_value(value)}")
        return value

    return check


def _integer(minimum: int | None = None) -> Validator:
    bound = "" if minimum is None else f" >= {minimum}"

    def check(key: str, value: Any) -> Any:
        if (not isinstance(value, int) or isinstance(value, bool)
                or (minimum is not None and value < minimum)):
            raise CeCheckError(f"'{key}': must be an integer{bound}, got {_json_value(value)}")
        return value

    return check


def _choice_of(key: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise CeCheckError(f"'{key}': must be one of {', '.join(choices)}, got {_json_value(value)}")
    return value


def _non_negative(key: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise CeCheckError(f"'{key}': must be a finite number >= 0, got {_json_value(value)}")
    return float(value)


def _positive(key: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise CeCheckError(f"'{key}': must be a finite number > 0, got {_json_value(value)}")
    return float(value)


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise CeCheckError(f"'{key}': must be true or false, got {_json_value(value)}")
    return value


# settings every kind takes, then each kind's own: the fields of CheckOptions a manifest sets
COMMON_SETTINGS: dict[str, Validator] = {
    "reduction": _choice(Reduction), "rtol": _non_negative, "atol": _non_negative,
    "precision": _choice(Precision), "floor_factor": _non_negative, "fd": _choice(FDMode),
    "samples": _integer(1), "seed": _integer(0), "worst": _integer(0),
    "normaliser_rtol": _non_negative, "strict_subnormals": _boolean,
}
KIND_SETTINGS: dict[str, dict[str, Validator]] = {
    Kind.multiclass.value: {"ignore_index": _integer(), "label_smoothing": _non_negative,
                            "class_axis": _integer(), "z_loss": _non_negative,
                            "softcap": _positive, "logit_scale": _positive,
                            "smoothing_form": lambda k, v: _choice_of(k, v, ("torch", "others")),
                            "denominator": _positive, "shift_labels": _boolean,
                            "vocab_offset": _integer(0), "vocab_size": _integer(1),
                            "kl_loss": _boolean,
                            "empty_mean": lambda k, v: _choice_of(k, v, ("nan", "zero"))},
    Kind.binary.value: {"two_class": _boolean, "label_smoothing": _non_negative,
                        "softcap": _positive, "logit_scale": _positive, "denominator": _positive},
    LINEAR: {"ignore_index": _integer(), "label_smoothing": _non_negative, "exact": _boolean,
             "projections": _integer(1), "weight_layout": lambda k, v: _choice_of(k, v, ("VH", "HV"))},
}
# linear takes grad's training-code options and sample weights too
KIND_SETTINGS[LINEAR].update({k: KIND_SETTINGS[Kind.multiclass.value][k] for k in (
    "z_loss", "softcap", "logit_scale", "smoothing_form", "denominator", "shift_labels",
    "empty_mean")})
KIND_INPUTS = {Kind.multiclass.value: SEMANTIC_INPUTS, Kind.binary.value: ("pos_weight", "sample_weight"),
               LINEAR: (*LINEAR_INPUTS, "sample_weight")}
KIND_KEYS = {kind: (*KIND_INPUTS[kind], *KIND_SETTINGS[kind]) for kind in KIND_SETTINGS}
COMMON_KEYS = ("name", "kind", *(r for r in INPUT_ROLES
                                  if r not in ("pos_weight", *LINEAR_INPUTS, *SEMANTIC_INPUTS)),
               *COMMON_SETTINGS)
ALL_KEYS = tuple(dict.fromkeys(COMMON_KEYS + KIND_KEYS[Kind.multiclass.value]
                               + KIND_KEYS[Kind.binary.value] + KIND_KEYS[LINEAR]))


@dataclass(frozen=True)
class CaseSpec:
    """One valid manifest line: its inputs (paths resolved against the manifest's folder) and
    the settings of its check (keyword arguments of check_grad / check_binary)."""

    line: int
    name: str
    kind: str
    inputs: dict[str, InputSpec]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> dict[str, str]:
        """role -> path (or FILE.npz:KEY) of the inputs read from files."""
        return {r: s.text for r, s in self.inputs.items() if s.origin is Origin.file}

    @property
    def numbers(self) -> dict[str, str]:
        """role -> the number typed for it (loss, pos_weight), with the digits it was written with."""
        return {r: s.text for r, s in self.inputs.items() if s.origin is Origin.number}


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one case: `status` is pass, fail or error; `report` is set unless error."""

    name: str
    line: int
    kind: str | None
    status: str
    report: Report | None = None
    error: str | None = None
    seconds: float = 0.0
    internal: bool = False  # an error that is a bug in ce-check, not bad input

    def to_dict(self) -> dict[str, Any]:
        """The JSON-lines record: the `--json` object plus name and status, or the error."""
        if self.report is None:
            return {"name": self.name, "status": self.status, "error": self.error, "ok": False,
                    "kind": self.kind}
        from ce_cli.report.render import report_to_dict

        return {"name": self.name, "status": self.status, **report_to_dict(self.report)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


Case = CaseSpec | CaseResult  # a line that does not validate is already its (error) result


# --- parsing ---------------------------------------------------------------------------------

class _Number(float):
    """A JSON number with the digits it was written with (a typed loss is compared to half a
    unit of its last digit, as `--loss 2.3026` is)."""

    text: str

    def __new__(cls, text: str) -> _Number:
        obj = super().__new__(cls, text)
        obj.text = text
        return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (write it as a string, e.g. \"nan\")")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise ValueError(f"duplicate key '{dup}'")
    return dict(pairs)


def _decode(line: str) -> Any:
    if len(line) > limits.MAX_MANIFEST_LINE_BYTES:
        raise ValueError(f"a line over {limits.MAX_MANIFEST_LINE_BYTES} characters")
    try:
        return json.loads(line, parse_float=_Number, parse_constant=_no_constants,
                          object_pairs_hook=_pairs)
    except RecursionError:
        raise ValueError("nested too deeply") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text: str) -> str:
    """A name as it can be printed and encoded: lone surrogates (JSON "\\udc80") become U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def read_manifest(spec: str, *, stdin: BinaryIO | None = None) -> tuple[str, Path, str]:
    """The manifest's text, the folder its paths are relative to, and its display label."""
    if spec == STDIN:
        label = "manifest from stdin"
        if stdin is None:
            if sys.stdin is None:
                raise CeCheckError(f"{label}: standard input is closed")
            if sys.stdin.isatty():
                raise CeCheckError(f"{label}: standard input is a terminal; pipe a JSON-lines "
                                   "manifest into it")
            stdin = sys.stdin.buffer
        data, base = _read_capped(stdin, label), Path()
    else:
        path = Path(spec)
        label = f"manifest {quoted(spec, 200)}"
        data = _read_manifest_file(path, label)
        base = path.parent
    if isinstance(data, str):
        data = data.encode()
    if b"\x00" in data[:4096]:
        raise CeCheckError(f"{label}: binary data, not a JSON-lines manifest")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CeCheckError(f"{label}: not UTF-8 text") from None
    return text, base, label


def _read_capped(stream: BinaryIO, label: str) -> bytes:
    """At most MAX_MANIFEST_BYTES of `stream`."""
    data = stream.read(limits.MAX_MANIFEST_BYTES + 1)
    if len(data) > limits.MAX_MANIFEST_BYTES:
        raise CeCheckError(f"{label}: over {limits.MAX_MANIFEST_BYTES} bytes (the manifest limit)")
    return data


def _read_manifest_file(path: Path, label: str) -> bytes:
    """A regular file or a named pipe (`<(...)`, bounded in size and idle time); never a device
    such as /dev/zero."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise CeCheckError(f"{label}: is a directory, not a JSON-lines file")
        if stat.S_ISFIFO(mode):
            data = read_pipe(path, label)
            if len(data) > limits.MAX_MANIFEST_BYTES:
                raise CeCheckError(f"{label}: over {limits.MAX_MANIFEST_BYTES} bytes (the "
                                   "manifest limit)")
            return data
        if not stat.S_ISREG(mode):
            raise CeCheckError(f"{label}: not a regular file or a pipe")
        with path.open("rb") as fh:
            return _read_capped(fh, label)
    except FileNotFoundError:
        raise CeCheckError(f"{label}: no such file") from None
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None


def parse_manifest(text: str, base: Path | str = ".", label: str = "manifest") -> list[Case]:
    """One `CaseSpec` per valid line, one error `CaseResult` per invalid line (blank lines are
    skipped). Raises `CeCheckError` when there is no case or no line is a JSON object at all
    (the file is not JSON lines: a JSON document, an array file, ...)."""
    base = Path(base)
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not lines:
        raise CeCheckError(f"{label}: empty: no cases (one JSON object per line)")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    objects = 0
    first_problem = None
    for lineno, line in lines:
        try:
            obj = _decode(line)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            where = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            problem = f"line {lineno}: not valid JSON ({msg}{where})"
            first_problem = first_problem or problem
            cases.append(_line_error(lineno, None, None, problem))
            continue
        if not isinstance(obj, dict):
            problem = f"line {lineno}: expected a JSON object, got {_json_type(obj)}"
            first_problem = first_problem or problem
            cases.append(_line_error(lineno, None, None, problem))
            continue
        objects += 1
        case = _case(lineno, obj, base)
        name = case.name
        if name in seen and isinstance(obj.get("name"), str):
            case = _line_error(lineno, name, case.kind,
                               f"line {lineno}: duplicate name '{name}' (also on line {seen[name]})")
        else:
            seen.setdefault(name, lineno)
        cases.append(case)
    if objects == 0:
        raise CeCheckError(f"{label}: not JSON lines (one JSON object per line): {first_problem}")
    return cases


def _json_type(obj: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number")


def _line_error(lineno: int, name: str | None, kind: str | None, message: str) -> CaseResult:
    return CaseResult(name=name or f"line {lineno}", line=lineno, kind=kind, status=ERROR,
                      error=message)


def _case(lineno: int, obj: dict[str, Any], base: Path) -> Case:
    name = obj.get("name")
    name = _clean(name) if isinstance(name, str) and name.strip() else None
    kind = obj.get("kind") if obj.get("kind") in KINDS else None
    try:
        return _validate(lineno, obj, base, name, kind)
    except CeCheckError as exc:
        return _line_error(lineno, name, kind, f"line {lineno}: {exc}")


def _validate(lineno: int, obj: dict[str, Any], base: Path, name: str | None,
              kind: str | None) -> CaseSpec:
    _check_keys(obj, name, kind)
    assert name is not None and kind is not None  # _check_keys refuses them
    given = {key: value for key, value in obj.items() if value is not None}  # null: not given
    inputs = {key: _input(key, value, base) for key, value in given.items() if key in INPUT_ROLES}
    return CaseSpec(line=lineno, name=name, kind=kind, inputs=inputs,
                    settings=check_settings(given, kind, inputs))


def _check_keys(obj: dict[str, Any], name: str | None, kind: str | None) -> None:
    """Unknown keys, missing keys, the name, the kind, keys of the other kind."""
    for key in obj:
        if key not in ALL_KEYS:
            close = difflib.get_close_matches(key, ALL_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(ALL_KEYS)})"
            raise CeCheckError(f"unknown key {quoted(key)}{hint}")
    for key in REQUIRED_BY_KIND.get(kind or "", REQUIRED):
        if obj.get(key) is None:
            raise CeCheckError(f"missing key '{key}'")
    if name is None:
        raise CeCheckError(f"'name': must be a non-empty string, got {_json_value(obj['name'])}")
    if kind is None:
        raise CeCheckError(f"'kind': must be \"multiclass\" or \"binary\", got {_json_value(obj['kind'])}")
    _no_logits(obj, kind)
    for other, keys in KIND_KEYS.items():
        for key in keys:
            if other != kind and key not in KIND_KEYS[kind] and obj.get(key) is not None:
                raise CeCheckError(f"key '{key}' applies to kind \"{other}\", not \"{kind}\"")


def _no_logits(obj: dict[str, Any], kind: str) -> None:
    """Kind linear takes hidden states and a weight, never logits."""
    for key in ("logits", "grad"):
        if kind == LINEAR and obj.get(key) is not None:
            raise CeCheckError(f"key '{key}' does not apply to kind \"linear\" (give 'hidden' and 'weight')")


def check_settings(given: dict[str, Any], kind: str,
                   inputs: dict[str, InputSpec]) -> dict[str, Any]:
    """The one place a manifest line's keys become the check's settings (the fields of
    `ce_cli.verify.options.CheckOptions`), each key validated; a typed loss brings its
    tolerance (half a unit of its last digit, as `--loss 2.3026` does)."""
    validators = {**COMMON_SETTINGS, **KIND_SETTINGS[kind]}
    settings = {key: validators[key](key, value) for key, value in given.items() if key in validators}
    if "loss" in inputs:
        settings["loss_atol"] = inputs["loss"].tolerance
    return settings


def _input(key: str, value: Any, base: Path) -> InputSpec:
    """The input a manifest value names: a path (relative to `base`), `FILE.npz:KEY`, or for
    loss and pos_weight a number (a JSON number, or a string that reads as one)."""
    if key in NUMBER_ROLES and _is_number(value):
        return InputSpec.number(getattr(value, "text", repr(value)), key)
    if not isinstance(value, str) or not value.strip():
        if key in NUMBER_ROLES:
            raise CeCheckError(f"'{key}': must be a path or a number, got {_json_type(value)}")
        raise CeCheckError(f"'{key}': must be a path (a non-empty string), got {_json_value(value)}")
    if value == STDIN:
        raise CeCheckError(f"'{key}': '-' (stdin) cannot be an input in a batch; name a file")
    return InputSpec.parse(value, key, base=base)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
