"""The per-shard reports merged into one (`merge_reports`): counts and totals add, maxima take the
maximum, the worst entries are re-ranked by |error| / allowed over the shards' own worst lists
(each shard's top k holds the global top k), with GLOBAL indices. The loss is `math.fsum` of the
shards' losses, each an exactly rounded sum of its rows (divided by D for 'mean'): for
non-negative row losses it is within (2 + n_shards) eps/2 relative of the single-process loss.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from ce_cli.models.semantics import mean_of_nothing
from ce_cli.models.softmax import empty_mean_warning
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, Diagnosis, Entry, InputInfo, Report, verdict_line
from ce_cli.verify.shards.inputs import BatchInputs
from ce_cli.verify.shards.plan import Shard, ShardedReport, ShardPlan, ShardSummary
from ce_cli.verify.shards.share import ShardShare, batch_checks


def global_index(index: tuple[int, ...], shard: Shard) -> tuple[int, ...]:
    """A shard's entry index in the whole batch: rows shift axis 0, the vocabulary the class
    axis (indices of rows alone, without a class, stay)."""
    if not index:
        return index
    if shard.axis == "rows":
        return (index[0] + shard.offset,) + tuple(index[1:])
    last = len(shard.shape) - 1  # the class axis (the bridge adds a part name after it)
    if len(index) > last:
        return tuple(index[:last]) + (index[last] + shard.offset,) + tuple(index[last + 1:])
    return tuple(index)


def _ratio(e: Entry) -> float:
    with np.errstate(all="ignore"):
        r = np.float64(e.abs_err) / np.float64(e.allowed)
    return float(r) if not np.isnan(r) else math.inf


def merge_checks(parts: list[tuple[Shard, CheckResult]], worst: int) -> CheckResult:
    """One check over every shard: counts add, maxima take the max, worst re-ranked globally."""
    first = parts[0][1]
    entries = [replace(e, index=global_index(tuple(e.index), s)) for s, c in parts for e in c.worst]
    entries.sort(key=lambda e: (-_ratio(e), e.index))
    notes = [f"shard {s.index}: {c.note}" for s, c in parts if c.note and c.note != first.note]
    note = "; ".join(([first.note] if first.note and all(c.note == first.note for _, c in parts)
                      else []) + notes)
    return replace(first, ok=all(c.ok for _, c in parts),
                   max_abs_err=max(c.max_abs_err for _, c in parts),
                   max_rel_err=max(c.max_rel_err for _, c in parts),
                   mismatches=sum(c.mismatches for _, c in parts),
                   total=sum(c.total for _, c in parts), worst=tuple(entries[:worst]), note=note)


def merge_reports(plan: ShardPlan, reports: list[Report], options: CheckOptions,
                  denominator: float | None = None, repeated: float = 0.0,
                  client: dict[str, CheckResult] | None = None,
                  client_inputs: tuple[InputInfo, ...] = ()) -> ShardedReport:
    """The shards' reports as one: see the module's docstring for each field's rule.
    `repeated`: what the shards' losses count more than once (vocabulary shards: every shard's
    loss holds each row's lse, only the label's shard its -z_y). `client`: checks made on the
    merged sums, in place of the shards' placeholders of the same name."""
    first, pairs = reports[0], list(zip(plan.shards, reports))
    checks = _with_client(_merge_all_checks(pairs, options.worst), client or {}, first.fd_mode)
    ok = all(c.ok for c in checks)
    diagnosis = _merge_diagnosis(pairs)
    warnings = list(dict.fromkeys(w for r in reports for w in r.warnings))
    loss = merged_loss(reports, options, denominator, repeated)
    if _zero_total(options, denominator):
        every = sum(r.n_ignored for r in reports) == sum(r.n_rows for r in reports)
        warnings.append(empty_mean_warning(options.empty_mean, every))
    merged = replace(
        first, ok=ok, loss=loss, shape=plan.shape, checks=checks,
        loss_per_sample_shape=_per_sample_shape(plan, first),
        inputs=tuple(i for r in reports for i in r.inputs
                     if i.role in ("logits", "labels", "grad", "loss")) + client_inputs,
        warnings=tuple(warnings), fd_evaluations=sum(r.fd_evaluations for r in reports),
        diagnosis=diagnosis, verdict=verdict_line(ok, checks, diagnosis), **_sizes(plan, reports))
    return ShardedReport(plan.axis, merged, tuple(_summary(s, r) for s, r in pairs))


def _placed(check: CheckResult, client: CheckResult | None) -> CheckResult:
    """The client's check in place of the shards' placeholder; on the merged `normaliser`
    check, the client's finding that your loss does not carry its row factors (`batch_checks`),
    which, when it fails, fails every fitted row as one process does."""
    if client is None:
        return check
    if check.name == "normaliser":
        return replace(check, ok=check.ok and client.ok,
                       mismatches=check.mismatches if client.ok else check.total,
                       note=f"{check.note}; {client.note}")
    return client


# the checks a report lists before your loss (ranks 0 and 1 of verify/stages.py) on vocabulary
# shards; `fd_vs_reference` too with --fd full (rank 0; sampled, rank 4, it follows the loss)
RANKED_BEFORE_LOSS = ("fd_rows_vs_reference", "grad_vs_reference", "normaliser")


def _with_client(checks: tuple[CheckResult, ...], client: dict[str, CheckResult],
                 fd_mode: str = "off") -> tuple[CheckResult, ...]:
    """The merged checks with the client's in place of their placeholders; the z-loss after
    the lse, as one process ranks them (the placeholders lead their rank)."""
    out = [_placed(c, client.get(c.name)) for c in checks]
    names = [c.name for c in out]
    added: tuple[str, ...] = ()
    for name, check in client.items():  # no placeholder (vocabulary shards): before rank 3
        if name not in names and name != "normaliser":
            before = RANKED_BEFORE_LOSS + (("fd_vs_reference",) if fd_mode == "full" else ()) + added
            added += (name,)  # the client's checks in their order: the loss, then the lse
            at = next((i for i, n in enumerate(names) if n not in before), len(out))
            out.insert(at, check)
            names.insert(at, name)
    if "z_loss_vs_reference" in client and "lse_vs_reference" in names and \
            "z_loss_vs_reference" not in added:  # a placeholder of the shards' (row shards)
        out.insert(names.index("lse_vs_reference"), out.pop(names.index("z_loss_vs_reference")))
    return tuple(out)


def _per_sample_shape(plan: ShardPlan, first: Report) -> tuple[int, ...] | None:
    """Softmax: a loss per row (the batch shape); binary: one per entry (the logits' shape)."""
    if first.loss_per_sample_shape is None:
        return None
    per_entry = len(first.loss_per_sample_shape) == len(plan.shape)
    return plan.shape if per_entry else plan.shape[:-1]


def _merge_all_checks(pairs: list[tuple[Shard, Report]], worst: int) -> tuple[CheckResult, ...]:
    """Each check, by name in the order the shards report them, merged over the shards."""
    names = list(dict.fromkeys(c.name for _, r in pairs for c in r.checks))
    return tuple(merge_checks([(s, c) for s, r in pairs for c in r.checks if c.name == name],
                              worst) for name in names)


def _sizes(plan: ShardPlan, reports: list[Report]) -> dict[str, Any]:
    """Row shards add their rows and ignored rows; vocabulary shards add their classes."""
    if plan.axis == "rows":
        return {"n_rows": sum(r.n_rows for r in reports),
                "n_ignored": sum(r.n_ignored for r in reports)}
    return {"n_classes": plan.shape[-1]}


def _merge_diagnosis(pairs: list[tuple[Shard, Report]]) -> tuple[Diagnosis, ...]:
    """The likely causes of the shard with the most mismatched gradient entries first."""
    def bad(r: Report) -> int:
        return sum(c.mismatches for c in r.checks if c.name == "grad_vs_reference")

    ranked = sorted(pairs, key=lambda sr: (-bad(sr[1]), sr[0].index))
    out: dict[str, Diagnosis] = {}
    for shard, r in ranked:
        for d in r.diagnosis:
            out.setdefault(d.code, replace(d, evidence=f"shard {shard.index}: {d.evidence}"))
    return tuple(out.values())


def _summary(shard: Shard, r: Report) -> ShardSummary:
    mism = sum(c.mismatches for c in r.checks if c.name == "grad_vs_reference")
    return ShardSummary(shard.index, shard.name, shard.offset, shard.size, r.ok, r.verdict, mism,
                        r.loss)


def merge_results(plan: ShardPlan, results: list[tuple[Report, ShardShare]],
                  options: CheckOptions, inputs: BatchInputs, denominator: float | None = None,
                  repeated: float = 0.0) -> ShardedReport:
    """`merge_reports`, with the batch's reduced loss and z-loss checked once on the merged
    sums (the shards' reports hold placeholders where these checks go)."""
    reports, shares = [r for r, _ in results], [s for _, s in results]
    total = merged_loss(reports, options, denominator, repeated)
    checks = batch_checks(plan, shares, inputs, options, total)
    infos = ((InputInfo("loss", inputs.loss_source, (), inputs.loss_dtype),)
             if inputs.loss is not None else ())
    return merge_reports(plan, reports, options, denominator, repeated, checks, infos)


def merged_loss(reports: list[Report], options: CheckOptions, denominator: float | None,
                repeated: float) -> float:
    """`math.fsum` of the shards' losses, less what vocabulary shards repeat; for 'mean' when
    every target is ignored, NaN (0/0, as PyTorch) or 0 (`empty_mean`)."""
    if _zero_total(options, denominator):
        return mean_of_nothing(options.empty_mean)
    return math.fsum([r.loss for r in reports] + [-repeated])


def _zero_total(options: CheckOptions, denominator: float | None) -> bool:
    """'mean' over a zero total weight (no outside denominator)."""
    return denominator == 0 and options.reduction.value == "mean" and options.denominator is None
