"""JUnit XML for CI systems: one <testsuite>, one <testcase> per manifest case.

A failed case carries <failure> with the worst-entries text of `ce_cli.report.render.failure_message`;
a case that could not run (bad input, an invalid manifest line) carries <error> with its
one-line message; a case that `--fail-fast` never started carries <skipped>.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from ce_cli.batch.manifest import ERROR, FAIL, CaseResult
from ce_cli.io.output import atomic_output, check_target
from ce_cli.report.render import failure_message

# characters XML 1.0 cannot carry at all, even escaped
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(s: str) -> str:
    return _NOT_XML.sub("\ufffd", s)


def _classname(kind: str | None) -> str:
    return f"ce-check.{kind}" if kind else "ce-check"


def junit_tree(results: Sequence[CaseResult], *, skipped: Sequence[tuple[str, str | None]] = (),
               suite: str = "ce-check batch", seconds: float | None = None) -> ET.ElementTree:
    """`results` in manifest order; `skipped` the (name, kind) of cases not run."""
    failures = sum(r.status == FAIL for r in results)
    errors = sum(r.status == ERROR for r in results)
    total = sum(r.seconds for r in results) if seconds is None else seconds
    attrs = {"name": _text(suite), "tests": str(len(results) + len(skipped)),
             "failures": str(failures), "errors": str(errors), "skipped": str(len(skipped)),
             "time": f"{total:.3f}"}
    root = ET.Element("testsuites", attrs)
    ts = ET.SubElement(root, "testsuite", attrs)
    for r in results:
        tc = ET.SubElement(ts, "testcase", {"classname": _classname(r.kind), "name": _text(r.name),
                                            "time": f"{r.seconds:.3f}"})
        if r.status == FAIL and r.report is not None:
            failing = [c.name for c in r.report.checks if not c.ok]
            el = ET.SubElement(tc, "failure", {"message": _text("failed: " + ", ".join(failing)),
                                               "type": "CheckFailed"})
            el.text = _text(failure_message(r.report))
        elif r.status == ERROR:
            error_type = "InternalError" if r.internal else "CeCheckError"
            el = ET.SubElement(tc, "error", {"message": _text(r.error or ""), "type": error_type})
            el.text = _text(r.error or "")
    for name, kind in skipped:
        tc = ET.SubElement(ts, "testcase", {"classname": _classname(kind), "name": _text(name),
                                            "time": "0.000"})
        ET.SubElement(tc, "skipped", {"message": "not run: --fail-fast stopped the batch"})
    ET.indent(root)
    return ET.ElementTree(root)


def check_writable(path: str | Path) -> None:
    """Refuse, before any case runs, a path whose folder is missing, a directory, or anything
    but a regular file (see `ce_cli.io.output`)."""
    check_target(path, "junit_xml")


def write_junit(path: str | Path, tree: ET.ElementTree) -> None:
    """Written to an unpredictable temporary file beside `path` and renamed into place (see
    `ce_cli.io.output`): a reader never sees half a file, a planted symlink is never followed."""
    buf = io.BytesIO()
    tree.write(buf, encoding="utf-8", xml_declaration=True)
    data = buf.getvalue()
    with atomic_output(path, "junit_xml", len(data)) as out:
        out.write(data)
