"""Result types: small frozen dataclasses that the renderers format and the API returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    """One compared entry: its index in the user's original array shape."""

    index: tuple[int, ...]
    expected: float
    got: float
    abs_err: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.abs_err <= self.allowed


@dataclass(frozen=True)
class CheckResult:
    """One check (a row of the report): `got` compared with `expected` entry by entry."""

    name: str
    ok: bool
    expected_label: str
    got_label: str
    max_abs_err: float
    max_rel_err: float
    mismatches: int
    total: int
    worst: tuple[Entry, ...]
    rule: str
    note: str = ""


@dataclass(frozen=True)
class InputInfo:
    role: str
    source: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Diagnosis:
    """A likely cause of a failed check: a stable `code`, a sentence, the numbers behind it."""

    code: str
    message: str
    evidence: str


@dataclass(frozen=True)
class Report:
    """Everything one `ce-check grad` run established."""

    kind: str
    ok: bool
    loss: float
    loss_per_sample_shape: tuple[int, ...] | None
    shape: tuple[int, ...]
    n_rows: int
    n_classes: int
    n_ignored: int
    reduction: str
    target_kind: str
    checks: tuple[CheckResult, ...]
    inputs: tuple[InputInfo, ...] = ()
    warnings: tuple[str, ...] = ()
    fd_mode: str = "off"
    fd_evaluations: int = 0
    options: dict = field(default_factory=dict)
    diagnosis: tuple[Diagnosis, ...] = ()
    verdict: str = ""


USER_CHECKS = ("grad_vs_reference", "loss_vs_reference", "fd_vs_grad", "fd_rows_vs_grad")


def user_check(name: str) -> bool:
    """Whether check `name` compares your values: USER_CHECKS, and `linear`'s
    grad_{hidden,weight,bias}_vs_reference and fd_*_vs_grad."""
    return name in USER_CHECKS or name.endswith("_vs_grad") or (
        name.startswith("grad_") and name.endswith("_vs_reference"))


def verdict_line(ok: bool, checks: tuple[CheckResult, ...], diagnosis: tuple[Diagnosis, ...]) -> str:
    """PASS or FAIL with the reason: the first failing check's count and the likely cause."""
    if ok:
        if not any(user_check(c.name) for c in checks):
            return "PASS — reference self-check only: pass `grad` or `loss` to check yours"
        return "PASS"
    failed = next(c for c in checks if not c.ok)
    what = "entries" if failed.name != "normaliser" else "rows"
    reason = f"{failed.name}: {failed.mismatches:,}/{failed.total:,} {what}"
    if diagnosis:
        reason += f", {diagnosis[0].message}"
    return f"FAIL — {reason}"
