"""The sampled finite-difference stage imports numpy.random (its generator, ~10 ms) on a thread
while the pass works, so `finish` does not wait for it; a module already imported starts none."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np

from ce_cli.verify import stages
from ce_cli.verify.checks import check_grad

SCRIPT = """
import sys, threading
from ce_cli.models.softmax import build_softmax_ce
import numpy as np
from ce_cli.verify.stages import SampledFDStage
assert "numpy.random" not in sys.modules
started = []
start = threading.Thread.start
def record(self):
    started.append(self)
    start(self)
threading.Thread.start = record
problem = build_softmax_ce(np.zeros((3, 4)), np.array([0, 1, 2]))[0]
SampledFDStage(problem, None, 3, 8, 0, None)
assert [t.name for t in started] == ["ce-check-import-numpy.random"] and started[0].daemon
started[0].join()
print("numpy.random" in sys.modules)
"""


def test_stage_imports_the_generator_on_a_thread():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_no_thread_for_an_imported_module(monkeypatch):
    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name))
    stages.prefetch_module("numpy")
    assert started == []
    stages.prefetch_module("ce_cli_no_such_module_for_the_test")
    assert started == ["ce-check-import-ce_cli_no_such_module_for_the_test"]


def test_sampled_check_runs_with_the_prefetch():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    g = e / e.sum(axis=1, keepdims=True)
    g[np.arange(6), y] -= 1.0
    report = check_grad(z, y, grad=g / 6, fd="sample", samples=6)
    assert report.ok and {"fd_vs_reference", "fd_vs_grad"} <= {c.name for c in report.checks}
