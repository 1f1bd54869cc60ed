"""`ce-check batch MANIFEST`: every case of a JSON-lines manifest, one JSON line per case on
stdout, a summary table on stderr, JUnit XML for CI. Registered on `ce_cli.cli.app.app`."""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ce_cli.cli.app import COMMANDS, app, epilog, guarded
from ce_cli.report.console import drop_stdout, stderr_console, stdout_console
from ce_cli.report.emit import message_line
from ce_cli.report.format import fmt_value

if TYPE_CHECKING:  # numpy, Rich's tables and the library load in the command, not for `--help`
    from rich.console import Console

    from ce_cli.batch.manifest import CaseResult

BATCH_EPILOG = ("Exit codes: 0 every case passed; 1 a case failed; 2 a case could not run (bad "
                "input, an invalid manifest line) or a usage error; 3 internal error.")

MANIFEST_HELP = (
    "JSON-lines manifest, one case per line, or '-' for stdin. Keys: name, kind (multiclass or "
    "binary), logits, labels; optional grad, loss (path or number), weight, reduction, rtol, "
    "atol, precision, floor_factor, fd, samples, seed, worst, ignore_index, label_smoothing, "
    "class_axis (multiclass), pos_weight, two_class (binary): the flags' names with _ for -. "
    "Paths are relative to the manifest's folder (the working directory for stdin).")


class BatchFormat(str, Enum):
    jsonl = "jsonl"
    table = "table"


@app.command(short_help=COMMANDS["batch"], epilog=epilog(
    "ce-check batch cases.jsonl",
    "ce-check batch cases.jsonl --jobs 0 --junit-xml report.xml",
    "ce-check batch cases.jsonl --format table --fail-fast",
    exit_codes=BATCH_EPILOG))
@guarded
def batch(
    manifest: Annotated[str, typer.Argument(metavar="MANIFEST", help=MANIFEST_HELP, show_default=False)],
    fmt: Annotated[BatchFormat, typer.Option(
        "--format", "-f", metavar="jsonl|table", help="jsonl: one JSON object per case on stdout (the --json object plus "
        "name and status), summary on stderr; table: the summary table on stdout instead.")
    ] = BatchFormat.jsonl,
    junit_xml: Annotated[Optional[Path], typer.Option(
        "--junit-xml", metavar="FILE", help="Also write JUnit XML here (one testcase per case) for CI systems.")
    ] = None,
    fail_fast: Annotated[bool, typer.Option(
        "--fail-fast", help="Start no case after the first fail or error; cases not run are left "
        "out of the JSON lines and counted as skipped.")] = False,
    jobs: Annotated[int, typer.Option(
        "--jobs", "-j", min=0, metavar="N", help="Cases run at once, in worker processes (0: one per CPU). "
        "Output stays in manifest order.")] = 1,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print nothing (--junit-xml is still written); the exit code tells.")
    ] = False,
) -> None:
    """Run every case of a JSON-lines manifest (multiclass and binary checks with their options).
    A case with bad input is reported as an error and the others still run."""
    from ce_cli.batch.junit import check_writable, junit_tree, write_junit
    from ce_cli.batch.manifest import parse_manifest, read_manifest
    from ce_cli.batch.runner import exit_status, run_cases
    from ce_cli.io.inputs import STDIN

    if junit_xml is not None:
        check_writable(junit_xml)
    text, base, label = read_manifest(manifest)
    cases = parse_manifest(text, base, label)
    suite = f"ce-check batch {'(stdin)' if manifest == STDIN else manifest}"
    start = time.perf_counter()
    results: list[CaseResult] = []
    out = _Lines(enabled=fmt is BatchFormat.jsonl and not quiet)
    for res in run_cases(cases, jobs=jobs or _cpus(), fail_fast=fail_fast):
        results.append(res)
        out.write(res.to_json())
    seconds = time.perf_counter() - start
    skipped = [(c.name, c.kind) for c in cases[len(results):]]  # results are a prefix, in order
    if not quiet:
        console = stdout_console() if fmt is BatchFormat.table else stderr_console()
        try:
            render_summary(results, skipped, console, title=suite, seconds=seconds)
        except BrokenPipeError:
            drop_stdout()
    if junit_xml is not None:
        write_junit(junit_xml, junit_tree(results, skipped=skipped, suite=suite, seconds=seconds))
    raise typer.Exit(exit_status(results))


def _cpus() -> int:
    """CPUs this process may run on (a container's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Lines:
    """JSON lines to stdout, flushed one by one; a closed pipe (`| head -1`) stops the output,
    not the batch: the cases still run, the JUnit file is still written, the exit code tells."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.enabled = False
            drop_stdout()


def details(res: CaseResult) -> str:
    """Failing checks with their mismatches and worst index, or the error; then warnings."""
    if res.report is None:
        return res.error or ""
    parts = []
    for c in res.report.checks:
        if not c.ok:
            bad = next((e for e in c.worst if not e.ok), None)
            parts.append(f"{c.name} {c.mismatches}/{c.total}" + (f" at {tuple(bad.index)}" if bad else ""))
    parts += [message_line(w) for w in res.report.warnings]
    return "; ".join(parts)


def render_summary(results: list[CaseResult], skipped: list[tuple[str, str | None]], console: Console, *, title: str,
                   seconds: float) -> None:
    from rich.table import Table
    from rich.text import Text

    from ce_cli.batch.manifest import ERROR, FAIL, PASS

    status_style = {PASS: "green", FAIL: "bold red", ERROR: "bold magenta"}
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("case")
    table.add_column("kind")
    table.add_column("status")
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("failing checks / error")
    for r in results:
        loss = fmt_value(r.report.loss) if r.report is not None else "-"
        table.add_row(Text(r.name), r.kind or "-", Text(r.status, style=status_style[r.status]),
                      loss, Text(details(r)))
    for name, kind in skipped:
        table.add_row(Text(name), kind or "-", Text("skipped", style="dim"), "-",
                      Text("not run (--fail-fast)"))
    console.print(table)
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, ERROR)}
    n = len(results) + len(skipped)
    line = (f"{n} case{'s' * (n != 1)}: {counts[PASS]} passed, {counts[FAIL]} failed, "
            f"{counts[ERROR]} error{'s' * (counts[ERROR] != 1)}")
    if skipped:
        line += f", {len(skipped)} skipped (--fail-fast)"
    console.print(Text(f"{line} in {seconds:.2f} s"))
