"""What an input argument names: a file (path, FILE.npz:KEY, '-' for stdin) or a typed number.

`InputSpec.parse` is the one rule, for the command line and for batch manifests alike:

- `-` is standard input;
- a path that exists is that file; otherwise `FILE.npz:KEY` names the array KEY of FILE.npz
  (`FILE.safetensors:NAME` the tensor NAME);
- for the roles that may be typed as a number (NUMBER_ROLES: loss, pos_weight), text that names
  no existing file and reads as a number is that number (`2.3026`, `nan`);
- anything else is a file (reported missing when it is loaded).

`InputSpec.load` loads any of them; `load_all` loads the inputs of one check together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ce_cli.enums import Kind
from ce_cli.errors import CeCheckError

if TYPE_CHECKING:  # numpy and the loaders load with the first input (`ce-check --help` needs neither)
    import numpy as np

STDIN = "-"
# roles that may be typed as a number instead of naming a file
NUMBER_ROLES = ("loss", "pos_weight", "z_loss_value")
# roles whose one-row or one-column table is flattened to its C values, by kind of check
VECTOR_ROLES: dict[Kind, tuple[str, ...]] = {Kind.multiclass: ("weight",), Kind.binary: ("pos_weight",)}
SHAPED_ROLES = ("pos_weight",)  # broadcast with the labels: an array file's shape is meant


class Origin(str, Enum):
    """Where an input's values come from."""

    file = "file"
    stdin = "stdin"
    number = "number"


def parse_number(text: str, param: str = "loss") -> tuple[np.ndarray, float]:
    """A number typed on the command line: the value, and half a unit of its last typed digit."""
    try:
        dec = Decimal(text.strip())
    except InvalidOperation:
        raise CeCheckError(f"`{param}`: '{text}' is neither a file nor a number") from None
    import numpy as np

    if not dec.is_finite():
        return np.array(float(dec)), 0.0
    exponent = min(max(int(dec.as_tuple().exponent), -400), 400)  # beyond float64 either way
    return np.array(float(dec)), 0.5 * 10.0**exponent if exponent < 309 else float("inf")


def is_number_text(text: str) -> bool:
    """True when `text` reads as a number (`parse_number` accepts it)."""
    try:
        Decimal(text.strip())
    except InvalidOperation:
        return False
    return True


def split_npz_key(text: str) -> tuple[Path, str | None]:
    """The file `text` names and the .npz member or .safetensors tensor it selects (None: the
    path itself, no key)."""
    path = Path(text)
    if ":" not in text or _exists(path):
        return path, None
    # FILE.npz:KEY (or FILE.safetensors:NAME), the key itself may hold colons: the first FILE.npz that exists, else the last
    splits = [(text[:i], text[i + 1:]) for i, ch in enumerate(text)
              if ch == ":" and text[:i].lower().endswith((".npz", ".safetensors"))]
    for base, key in splits:
        if _exists(Path(base)):
            return Path(base), key
    if splits:
        return Path(splits[-1][0]), splits[-1][1]
    return path, None


def _exists(path: Path) -> bool:
    """`path.exists()`, False for a name the system refuses (too long, a NUL, ...)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class InputSpec:
    """One input argument, parsed: `role` (logits, labels, grad, loss, weight, pos_weight, and
    for training-code semantics lse, sample_weight, z_loss_value), the
    `text` as given (a path resolved against the manifest's folder), and where it comes from."""

    role: str
    text: str
    origin: Origin

    @classmethod
    def parse(cls, text: str, role: str, *, base: Path | str | None = None,
              strict: bool = False) -> InputSpec:
        """The input `text` names for `role`. Relative paths are taken from `base` (None: the
        working directory). With `strict`, text of a NUMBER_ROLES role that is neither an
        existing file nor a number is refused at once (the command line, where a mistyped
        number is the likelier slip) instead of being reported as a missing file on loading."""
        if text == STDIN:
            return cls(role, text, Origin.stdin)
        if not text.strip():
            raise CeCheckError(f"`{role}`: empty; name a file" + (" or type a number"
                                                                 if role in NUMBER_ROLES else ""))
        resolved = text if base is None or Path(text).is_absolute() else str(Path(base) / text)
        if role not in NUMBER_ROLES or _exists(split_npz_key(resolved)[0]):
            return cls(role, resolved, Origin.file)
        if is_number_text(text):
            return cls(role, text.strip(), Origin.number)
        if strict:
            parse_number(text, role)  # raises: neither a file nor a number
        return cls(role, resolved, Origin.file)

    @classmethod
    def number(cls, text: str, role: str) -> InputSpec:
        """A number given as such (a JSON number), with the digits it was written with."""
        parse_number(text, role)  # refuses what is not a number
        return cls(role, text, Origin.number)

    @property
    def source(self) -> str:
        """How reports name this input: `logits file 'z.npy'`, `labels from stdin`, `--loss 2.3`."""
        if self.origin is Origin.stdin:
            return f"{self.role} from stdin"
        if self.origin is Origin.number:
            return f"--{self.role.replace('_', '-')} {self.text}"
        return f"{self.role} file '{self.text}'"

    @property
    def tolerance(self) -> float:
        """Half a unit of the last digit of a typed number (0 for files: their values are exact)."""
        return parse_number(self.text, self.role)[1] if self.origin is Origin.number else 0.0

    def is_file(self, path: Path) -> bool:
        """True when this input is read from the file `path` (the same file, by any name)."""
        if self.origin is not Origin.file:
            return False
        mine = split_npz_key(self.text)[0]
        try:
            return mine.exists() and os.path.samefile(mine, path)
        except OSError:
            return False

    def load(self, *, vector: bool = False, stdin: BinaryIO | None = None,
             pipes: bool = True) -> np.ndarray:
        """The input's values. With `vector`, a one-row or one-column table (a CSV of C values
        written across or down) is flattened to its values; a pos_weight from an array file
        (.npy, ...) keeps its shape (a (C, 1) pos_weight broadcasts along its axis, as in
        PyTorch). Without `pipes` a named pipe is refused (batch cases: a FIFO nobody writes to
        would stall the batch)."""
        from ce_cli.io.loading import is_array_file, read_file, read_stdin
        from ce_cli.io.stored import COMPARED_ROLES, infer_stored

        if self.origin is Origin.number:
            return parse_number(self.text, self.role)[0]
        if self.origin is Origin.stdin:
            arr = read_stdin(self.source, stdin)
        else:
            path, key = split_npz_key(self.text)
            arr = read_file(path, key, self.source, pipes=pipes)
            vector = vector and not (self.role in SHAPED_ROLES and is_array_file(path))
        if vector and arr.ndim == 2 and 1 in arr.shape:
            arr = arr.reshape(-1)
        return infer_stored(arr) if self.role in COMPARED_ROLES else arr


def load_array(spec: str, *, what: str = "array", stdin: BinaryIO | None = None) -> np.ndarray:
    """Load `spec` (a path, `FILE.npz:KEY`, or `-` for stdin) as a numeric ndarray; `what`
    names the role ("logits", "labels", ...) in error messages."""
    origin = Origin.stdin if spec == STDIN else Origin.file
    return InputSpec(what, spec, origin).load(stdin=stdin)


@dataclass(frozen=True)
class LoadedInputs:
    """The arrays of one check by role, how to name them, and the typed loss's tolerance."""

    arrays: dict[str, np.ndarray]
    sources: dict[str, str]
    loss_atol: float


def load_all(specs: Mapping[str, InputSpec], *, vectors: tuple[str, ...] = (),
             stdin: BinaryIO | None = None, pipes: bool = True) -> LoadedInputs:
    """Load every input; at most one may come from stdin. `vectors` are the roles whose
    one-row or one-column table is flattened (see `InputSpec.load`)."""
    from_stdin = [role for role, spec in specs.items() if spec.origin is Origin.stdin]
    if len(from_stdin) > 1:
        raise CeCheckError(f"only one input can be '-' (stdin); got {', '.join(from_stdin)}")
    arrays = {role: spec.load(vector=role in vectors, stdin=stdin, pipes=pipes)
              for role, spec in specs.items()}
    loss = specs.get("loss")
    return LoadedInputs(arrays=arrays, sources={role: s.source for role, s in specs.items()},
                        loss_atol=loss.tolerance if loss is not None else 0.0)


def refuse_overwriting(out: Path | None, specs: Mapping[str, InputSpec], *,
                       param: str = "out_grad") -> None:
    """`out` must not be an input: inputs are memory-mapped while it is written."""
    if out is None or not _exists(out):
        return
    for role, spec in specs.items():
        if spec.is_file(out):
            raise CeCheckError(f"`{param}` '{out}': is the {role} file; writing it would destroy "
                               "the input")
