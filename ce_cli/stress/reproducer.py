"""Reproducers for `--save-failures`: a failing cell shrunk to one row when that row fails on its
own, written as a folder of .npy inputs, the float64 reference, and a command.sh that reruns the
implementation and checks it."""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ce_cli.enums import Kind, Reduction
from ce_cli.models.sigmoid import build_sigmoid_bce
from ce_cli.stress.dtypes import DTYPE_NAMES, as_storable
from ce_cli.stress.judge import Case, Cell, Outcome, judge
from ce_cli.stress.scenarios import IGNORE_INDEX
from ce_cli.verify.checks import reference

Runner = Callable[[Case], Outcome]
Rerun = Callable[[Case, Path], str]   # shell lines running the implementation in a folder


def reference_outputs(kind: str, case: Case, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """The float64 reference (loss, grad) of the case: the reduced loss, or per-sample losses
    for reduction 'none'."""
    none = reduction == Reduction.none.value
    with np.errstate(all="ignore"):
        if kind == Kind.multiclass.value:
            ref = reference(case.logits64, case.labels64, reduction=reduction)
            return (ref.per_sample if none else np.array(ref.loss)), ref.grad
        problem, _ = build_sigmoid_bce(case.logits64, case.labels64, reduction=reduction)
        ev = problem.evaluate(0, problem.n_rows)
        assert ev.grad is not None and ev.items is not None  # a full evaluation has both
        grad = problem.layout.from_rows(ev.grad)
        if none:
            return problem.layout.from_rows(ev.items), grad
        return np.array(problem.reduce(math.fsum(ev.loss.tolist()))), grad


def sub_case(case: Case, row: int) -> Case:
    """The case cut down to one row (the batch axis is the first axis in every scenario)."""
    sl = slice(row, row + 1)
    return replace(case, logits=case.logits[sl], labels=case.labels[sl],
                   logits64=case.logits64[sl], labels64=case.labels64[sl])


def candidate_row(kind: str, case: Case, cell: Cell, reduction: str) -> int | None:
    """The row to shrink a failing case to: the worst entry's, else the largest reference loss."""
    if case.logits.shape[0] <= 1:
        return None
    if cell.where:
        row = int(cell.where[0])
    else:
        per_sample, _ = reference_outputs(kind, case, Reduction.none.value)
        per_row = np.asarray(per_sample, dtype=np.float64).reshape(case.logits.shape[0], -1).sum(axis=1)
        row = int(np.nanargmax(per_row)) if np.isfinite(per_row).any() else 0
    if kind == Kind.multiclass.value and case.labels64[row] == IGNORE_INDEX:
        return None
    return row


def shrink(kind: str, case: Case, cell: Cell, run: Runner,
           reduction: str) -> tuple[int, Case, Outcome, Cell] | None:
    """One row of the failing case that fails on its own, with its outcome and cell; else None.
    Costs one more run of the implementation."""
    row = candidate_row(kind, case, cell, reduction)
    if row is None:
        return None
    small = sub_case(case, row)
    outcome = run(small)
    small_cell = judge(kind, small, outcome, cell.impl, reduction)
    return (row, small, outcome, small_cell) if not small_cell.ok else None


def folder_name(cell: Cell) -> str:
    """impl__scenario__s<scale>__dtype, with anything but [A-Za-z0-9._-] turned into _."""
    raw = f"{cell.impl}__{cell.scenario}__s{cell.scale:g}__{cell.dtype}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")


def _save_arrays(folder: Path, kind: str, reduction: str, case: Case, outcome: Outcome) -> None:
    """Inputs, the float64 reference, and the implementation's outputs when it gave any."""
    np.save(folder / "logits.npy", as_storable(case.logits))
    np.save(folder / "labels.npy", as_storable(case.labels))
    exp_loss, exp_grad = reference_outputs(kind, case, reduction)
    np.save(folder / "expected_loss.npy", np.asarray(exp_loss, dtype=np.float64))
    np.save(folder / "expected_grad.npy", np.asarray(exp_grad, dtype=np.float64))
    for name in ("grad", "loss"):
        value = getattr(outcome, name)
        path = folder / f"{name}.npy"
        path.unlink(missing_ok=True)
        if value is not None:
            try:
                np.save(path, as_storable(np.asarray(value)))
            except Exception:  # an object numpy cannot store: the README has the error
                path.unlink(missing_ok=True)


def _command_sh(folder: Path, kind: str, reduction: str, case: Case, cell: Cell,
                outcome: Outcome, rerun_lines: str) -> str:
    sub = "binary" if kind == Kind.binary.value else "grad"
    check = (f"ce-check {sub} logits.npy labels.npy --grad grad.npy"
             + (" --loss loss.npy" if outcome.loss_expected else "")
             + f" --reduction {reduction} --precision {case.dtype} --fd off")
    return ("#!/bin/sh\n"
            f"# ce-check stress reproducer: {cell.impl}, scenario {cell.scenario}, scale "
            f"{cell.scale:g}, {case.dtype}\n"
            "# 1. run the implementation on logits.npy, labels.npy (writes grad.npy, loss.npy)\n"
            f"{rerun_lines}\n"
            "# 2. check its outputs against the float64 reference (expected_*.npy hold it)\n"
            f"cd {shlex.quote(str(folder))} || exit 2\n"
            f"{check}\n")


def _readme(reduction: str, case: Case, cell: Cell, note: str) -> str:
    bf16 = ("logits.npy holds bfloat16 values as float32 (exactly); the implementation gets them "
            "as ml_dtypes.bfloat16\n" if case.dtype == "bf16" else "")
    lines = [
        f"implementation: {cell.impl}",
        f"scenario: {cell.scenario} at scale {cell.scale:g}, dtype {case.dtype} "
        f"({DTYPE_NAMES[case.dtype]}), reduction {reduction}",
        f"logits shape {tuple(case.logits.shape)}" + (f"; {note}" if note else ""),
        f"failure: {cell.error or cell.reason}",
    ]
    text = "\n".join(lines) + "\n" + bf16
    if cell.stderr_tail:
        text += "\noutput tail:\n" + cell.stderr_tail + "\n"
    return text + "\nrerun and check: sh command.sh\n"


def save_reproducer(root: Path, kind: str, reduction: str, case: Case, cell: Cell, outcome: Outcome,
                    rerun: Callable[[Path], str], note: str = "") -> Path:
    """Write logits.npy, labels.npy, expected_loss.npy, expected_grad.npy, the implementation's
    outputs (grad.npy, loss.npy) when it gave any, command.sh (rerun, then check) and README.txt.

    `rerun(folder)` gives the shell lines that run the implementation on the folder's inputs."""
    folder = (Path(root) / folder_name(cell)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _save_arrays(folder, kind, reduction, case, outcome)
    (folder / "command.sh").write_text(
        _command_sh(folder, kind, reduction, case, cell, outcome, rerun(folder)))
    (folder / "command.sh").chmod(0o755)
    (folder / "README.txt").write_text(_readme(reduction, case, cell, note))
    return folder


@dataclass
class FailureSaver:
    """An `on_cell` hook for `run_cells`: a reproducer folder per failing cell, shrunk to one row
    when that row fails on its own (not after a timeout: one more hang is not worth it)."""

    root: Path
    kind: str
    reduction: str
    impls: dict[str, tuple[Runner, Rerun]]
    saved: list[str] = field(default_factory=list)

    def __call__(self, cell: Cell, case: Case, outcome: Outcome) -> None:
        if cell.ok:
            return
        run, rerun = self.impls[cell.impl]
        small = None if cell.reason == "timeout" else shrink(self.kind, case, cell, run, self.reduction)
        note = ""
        if small is not None:
            n_rows = case.logits.shape[0]
            row, case, outcome, cell = small
            note = f"row {row} of the cell's {n_rows} rows, which fails on its own"
        folder = save_reproducer(self.root, self.kind, self.reduction, case, cell, outcome,
                                 functools.partial(rerun, case), note)
        self.saved.append(str(folder))


def python_rerun(spec: str, cwd: str, kind: str, dtype: str, folder: Path,
                 kwargs: dict | None = None) -> str:
    """Shell lines that call `module:function` on the reproducer's inputs in `folder`."""
    module, _, attr = spec.partition(":")
    q = json.dumps  # double-quoted Python strings: the line is single-quoted for the shell
    load, labels, pre = 'np.load("logits.npy")', 'np.load("labels.npy")', ""
    if dtype == "bf16":
        pre = "import ml_dtypes; "
        load += ".astype(ml_dtypes.bfloat16)"
        if kind == Kind.binary.value:
            labels += ".astype(ml_dtypes.bfloat16)"
    kw = "".join(f", {k}={q(v)}" for k, v in (kwargs or {}).items())
    code = (f"import sys, importlib, functools, numpy as np; {pre}sys.path.insert(0, {q(cwd)}); "
            f"fn = functools.reduce(getattr, {q(attr.split('.'))}, importlib.import_module({q(module)})); "
            f"loss, grad = fn({load}, {labels}{kw}); "
            'w = lambda a: np.asarray(a).astype(np.float32) if np.asarray(a).dtype.kind == "V" '
            'else np.asarray(a); np.save("grad.npy", w(grad)); np.save("loss.npy", w(loss))')
    return (f"cd {shlex.quote(str(folder))} || exit 2\n"
            f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}")
