"""`ce-check batch`: a JSON-lines manifest of cases, parsed, validated and run through the library.

One case per line, keys mirroring the command-line flags:

    {"name": "ce", "kind": "multiclass", "logits": "z.npy", "labels": "y.npy", "grad": "g.npy"}

Paths are relative to the manifest's folder (to the working directory for a manifest read
from stdin). A line that is not a valid case becomes an `error` result naming the line and the
key; the other cases still run. Nothing here prints: results are `CaseResult`s, and
`ce_cli.cli.batch` renders them.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from ce_cli.io.inputs import parse_number
from ce_cli.verify.checks import check_binary, check_grad
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.io.loading import STDIN, load_array
from ce_cli.verify.results import Report

KINDS = ("multiclass", "binary")
PATH_KEYS = ("logits", "labels", "grad", "weight")
COMMON_KEYS = ("name", "kind", "logits", "labels", "grad", "loss", "weight", "reduction", "rtol",
               "atol", "precision")
KIND_KEYS = {"multiclass": ("ignore_index", "label_smoothing", "class_axis"),
             "binary": ("pos_weight",)}
ALL_KEYS = COMMON_KEYS + KIND_KEYS["multiclass"] + KIND_KEYS["binary"]
REQUIRED = ("name", "kind", "logits", "labels")
CHOICES = {"reduction": ("mean", "sum", "none"), "precision": ("f16", "bf16", "f32", "f64")}
# a one-row or one-column CSV of these is flattened to its values, as on the command line
VECTORS = {"multiclass": ("weight",), "binary": ("pos_weight",)}

PASS, FAIL, ERROR = "pass", "fail", "error"


@dataclass(frozen=True)
class CaseSpec:
    """One valid manifest line: input paths resolved against the manifest's folder."""

    line: int
    name: str
    kind: str
    files: dict[str, str]  # role -> path (or FILE.npz:KEY) to load
    numbers: dict[str, str] = field(default_factory=dict)  # loss / pos_weight typed as numbers
    options: dict = field(default_factory=dict)  # keyword arguments of check_grad / check_binary


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

    def to_dict(self) -> dict:
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

    def __new__(cls, text: str):
        obj = super().__new__(cls, text)
        obj.text = text
        return obj


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON (write it as a string, e.g. \"nan\")")


def _pairs(pairs):
    keys = [k for k, _ in pairs]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise ValueError(f"duplicate key '{dup}'")
    return dict(pairs)


def _decode(line: str):
    return json.loads(line, parse_float=_Number, parse_constant=_no_constants,
                      object_pairs_hook=_pairs)


def read_manifest(spec: str, *, stdin=None) -> tuple[str, Path, str]:
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
        data, base = stdin.read(), Path()
    else:
        path = Path(spec)
        label = f"manifest '{spec}'"
        if not path.exists():
            raise CeCheckError(f"{label}: no such file")
        if path.is_dir():
            raise CeCheckError(f"{label}: is a directory, not a JSON-lines file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None
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


def _json_type(obj) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number")


def _line_error(lineno: int, name: str | None, kind: str | None, message: str) -> CaseResult:
    return CaseResult(name=name or f"line {lineno}", line=lineno, kind=kind, status=ERROR,
                      error=message)


def _case(lineno: int, obj: dict, base: Path) -> Case:
    name = obj.get("name")
    name = name if isinstance(name, str) and name.strip() else None
    kind = obj.get("kind") if obj.get("kind") in KINDS else None
    try:
        return _validate(lineno, obj, base, name, kind)
    except CeCheckError as exc:
        return _line_error(lineno, name, kind, f"line {lineno}: {exc}")


def _validate(lineno: int, obj: dict, base: Path, name: str | None, kind: str | None) -> CaseSpec:
    for key in obj:
        if key not in ALL_KEYS:
            close = difflib.get_close_matches(key, ALL_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(ALL_KEYS)})"
            raise CeCheckError(f"unknown key '{key}'{hint}")
    for key in REQUIRED:
        if obj.get(key) is None:
            raise CeCheckError(f"missing key '{key}'")
    if name is None:
        raise CeCheckError(f"'name': must be a non-empty string, got {json.dumps(obj['name'])}")
    if kind is None:
        raise CeCheckError(f"'kind': must be \"multiclass\" or \"binary\", got {json.dumps(obj['kind'])}")
    for other, keys in KIND_KEYS.items():
        for key in keys:
            if other != kind and obj.get(key) is not None:
                raise CeCheckError(f"key '{key}' applies to kind \"{other}\", not \"{kind}\"")
    files, numbers, options = {}, {}, {}
    for key in PATH_KEYS:
        if obj.get(key) is not None:
            files[key] = _path(key, obj[key], base)
    for key in ("loss", "pos_weight"):
        value = obj.get(key)
        if value is None:
            continue
        if _is_number(value):
            numbers[key] = getattr(value, "text", repr(value))
        elif isinstance(value, str) and value.strip():
            resolved = _path(key, value, base)
            if _exists(resolved) or not _is_number_text(value):
                files[key] = resolved  # a missing file is reported when the case runs
            else:
                numbers[key] = value.strip()  # a number written as a string: "4.1915", "nan"
        else:
            raise CeCheckError(f"'{key}': must be a path or a number, got {_json_type(value)}")
    for key, choices in CHOICES.items():
        value = obj.get(key)
        if value is not None:
            if value not in choices:
                raise CeCheckError(f"'{key}': must be one of {', '.join(choices)}, got {json.dumps(value)}")
            options[key] = value
    for key in ("ignore_index", "class_axis"):
        value = obj.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise CeCheckError(f"'{key}': must be an integer, got {json.dumps(value)}")
            options[key] = value
    for key in ("label_smoothing", "rtol", "atol"):
        value = obj.get(key)
        if value is not None:
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise CeCheckError(f"'{key}': must be a finite number >= 0, got {json.dumps(value)}")
            options[key] = float(value)
    return CaseSpec(line=lineno, name=name, kind=kind, files=files, numbers=numbers, options=options)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _path(key: str, value, base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CeCheckError(f"'{key}': must be a path (a non-empty string), got {json.dumps(value)}")
    if value == STDIN:
        raise CeCheckError(f"'{key}': '-' (stdin) cannot be an input in a batch; name a file")
    return value if Path(value).is_absolute() else str(base / value)


def _is_number_text(text: str) -> bool:
    try:
        Decimal(text.strip())
    except InvalidOperation:
        return False
    return True


def _exists(spec: str) -> bool:
    return Path(spec).exists() or Path(spec.rpartition(":")[0] or spec).exists()


# --- running ---------------------------------------------------------------------------------

def run_case(case: Case) -> CaseResult:
    """Run one case through the library. Bad input becomes an `error` result with its one-line
    message; an unexpected exception too, flagged `internal` (re-raised with CE_CHECK_DEBUG=1)."""
    if isinstance(case, CaseResult):
        return case
    start = time.perf_counter()

    def result(status, report=None, error=None, internal=False):
        return CaseResult(name=case.name, line=case.line, kind=case.kind, status=status,
                          report=report, error=error, internal=internal,
                          seconds=time.perf_counter() - start)

    try:
        report = _run(case)
    except CeCheckError as exc:
        return result(ERROR, error=" ".join(str(exc).split()))
    except MemoryError:
        return result(ERROR, error="out of memory", internal=True)
    except Exception as exc:
        if os.environ.get("CE_CHECK_DEBUG"):
            raise
        return result(ERROR, internal=True, error=(
            f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(set CE_CHECK_DEBUG=1 for the traceback; please report it)"))
    return result(PASS if report.ok else FAIL, report=report)


def _run(case: CaseSpec) -> Report:
    arrays = {role: load_array(spec, what=role) for role, spec in case.files.items()}
    for role in VECTORS[case.kind]:
        arr = arrays.get(role)
        if arr is not None and arr.ndim == 2 and 1 in arr.shape:
            arrays[role] = arr.reshape(-1)  # one CSV row or column of values
    sources = {role: f"{role} file '{spec}'" for role, spec in case.files.items()}
    loss_atol = 0.0
    for role, text in case.numbers.items():
        arrays[role], atol = parse_number(text, role)
        if role == "loss":
            loss_atol = atol
        sources[role] = f"--{role.replace('_', '-')} {text}"
    check = check_grad if case.kind == "multiclass" else check_binary
    logits, labels = arrays.pop("logits"), arrays.pop("labels")
    with np.errstate(all="ignore"):  # over/underflow is expected and handled
        return check(logits, labels, **arrays, loss_atol=loss_atol, sources=sources, **case.options)


def run_cases(cases: list[Case], *, jobs: int = 1, fail_fast: bool = False,
              executor_factory: Callable[[int], Executor] | None = None) -> Iterator[CaseResult]:
    """Run `cases`, yielding results in manifest order as soon as each one and all before it are
    done; up to `jobs` cases run at once.

    `jobs` = 1 runs the cases in one worker thread of this process; `jobs` > 1 in a pool of
    `jobs` processes (threads do not scale: the finite-difference sweeps loop in Python, under
    the GIL). Either way a case runs off its process's main thread: with glibc the main thread's
    heap returns the check's 1 MB chunk buffers to the kernel after each use and faults them
    back in, which made a 256x500 case 3 to 5 times slower; a thread's arena keeps them.
    `executor_factory(jobs)` replaces the executor (tests use threads to watch the scheduling).

    With `fail_fast` no case is started after a fail or error has been seen (running ones
    finish and are yielded); the cases never started are not yielded: the results are always
    a prefix of `cases`.
    """
    jobs = max(1, min(jobs, len(cases)))
    if executor_factory is not None:
        executor, task = executor_factory(jobs), run_case
    elif jobs == 1:
        executor, task = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ce-check"), run_case
    else:
        executor, task = ProcessPoolExecutor(max_workers=jobs), run_case_off_main_thread
    results: dict[int, CaseResult] = {}
    pending: dict = {}
    submitted = emitted = 0
    stop = False
    try:
        while True:
            while not stop and submitted < len(cases) and len(pending) < jobs:
                case = cases[submitted]
                if isinstance(case, CaseResult):  # an invalid line: nothing to run
                    results[submitted] = case
                    stop = fail_fast
                else:
                    try:
                        pending[executor.submit(task, case)] = submitted
                    except BrokenExecutor as exc:  # a worker process died earlier
                        results[submitted] = _crashed(case, exc)
                        stop = fail_fast
                submitted += 1
            if emitted not in results and pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    results[i] = _outcome(fut, cases[i])
                    stop = stop or (fail_fast and results[i].status != PASS)
            while emitted in results:
                yield results.pop(emitted)
                emitted += 1
            if emitted == submitted and (stop or submitted == len(cases)):
                return
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


_worker_thread: ThreadPoolExecutor | None = None


def run_case_off_main_thread(case: Case) -> CaseResult:
    """`run_case` in a worker process, on a thread of its own (see `run_cases`)."""
    global _worker_thread
    if _worker_thread is None:
        _worker_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ce-check")
    return _worker_thread.submit(run_case, case).result()


def _outcome(fut, case: CaseSpec) -> CaseResult:
    try:
        return fut.result()
    except Exception as exc:  # the worker process died (killed, out of memory), or CE_CHECK_DEBUG
        if os.environ.get("CE_CHECK_DEBUG"):
            raise
        return _crashed(case, exc)


def _crashed(case: CaseSpec, exc: BaseException) -> CaseResult:
    return CaseResult(name=case.name, line=case.line, kind=case.kind, status=ERROR, internal=True,
                      error=f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
                            "(the worker failed; please report it)")


def exit_status(results: Iterable[CaseResult]) -> ExitCode:
    """3 if a case hit an internal error, else 2 if any case is an error, 1 if any failed, else 0."""
    results = list(results)
    if any(r.internal for r in results):
        return ExitCode.INTERNAL_ERROR
    if any(r.status == ERROR for r in results):
        return ExitCode.USAGE_OR_INPUT_ERROR
    return ExitCode.CHECK_FAILED if any(r.status == FAIL for r in results) else ExitCode.OK
