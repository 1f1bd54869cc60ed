"""Regression tests for the robustness defects of issue #17 (D1-D15): each is exit 2 with one
clear line, or the documented behaviour; never exit 3, a hang, a signal death or unbounded memory."""

from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ce_cli.batch.manifest import parse_manifest
from ce_cli.batch.runner import run_case, run_cases
from ce_cli.io import limits
from ce_cli.io.inputs import load_array
from ce_cli.stress.judge import Case
from ce_cli.stress.runner import python_runner, read_output, run_process
from tests.conftest import CE_CHECK, run_script, script_env

IN_CI = bool(os.environ.get("CI"))


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ce-check: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def inputs(tmp_path: Path, shape=(4, 5)) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "z.npy", rng.standard_normal(shape))
    np.save(tmp_path / "y.npy", np.arange(shape[0]) % shape[1])
    return tmp_path / "z.npy", tmp_path / "y.npy"


def manifest(tmp_path: Path, *cases: dict) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"kind": "multiclass", **c}) + "\n" for c in cases))
    return path


def can_mount() -> str | None:
    """Why a private tmpfs cannot be mounted here (None: it can)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) for a private tmpfs"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k t /mnt"],
                           capture_output=True)
    return None if probe.returncode == 0 else f"unshare -m cannot mount: {probe.stderr!r}"


# --- D1 a full disk, D15 SIGTERM: no partial file, no SIGBUS ---------------------------------

def test_d1_out_grad_on_a_full_disk(tmp_path):
    reason = can_mount()
    if reason is not None:
        assert not IN_CI or os.geteuid() != 0, reason
        pytest.skip(reason)
    z, y = inputs(tmp_path, (400, 500))  # a 1.6 MB gradient onto a 1 MB file system
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=1m t {disk} && {CE_CHECK} grad {z} {y} --out-grad "
              f"{disk}/g.npy --fd off -q; echo rc=$?; ls -A {disk}")
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert "rc=2" in out.stdout, out
    assert out.stdout.strip().endswith("rc=2"), out.stdout  # nothing left on the disk
    assert "not enough space" in out.stderr and "Traceback" not in out.stderr


def test_d1_enospc_while_writing_is_an_input_error(tmp_path, monkeypatch):
    from ce_cli.errors import CeCheckError
    from ce_cli.io import output

    def full(fd, data, *rest):
        raise OSError(28, "No space left on device")

    out = output.AtomicFile(tmp_path / "g.npy", "out_grad")
    monkeypatch.setattr(output.os, "write", full)
    with pytest.raises(CeCheckError, match="No space left"):
        out.write(b"x" * 10)
    assert list(tmp_path.iterdir()) == []


def test_d15_sigterm_removes_the_partial_file(tmp_path):
    z, y = inputs(tmp_path, (3000, 2000))
    proc = subprocess.Popen([CE_CHECK, "grad", z, y, "--out-grad", tmp_path / "g.npy", "--fd",
                             "directional", "-q"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".g.npy.*.partial")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the run ended before the partial file could be seen")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    assert not list(tmp_path.glob(".g.npy*")) and not (tmp_path / "g.npy").exists()


# --- D2 FIFOs, D3 unbounded streams ---------------------------------------------------------

def test_d2_silent_fifo_input_gives_up(tmp_path, invoke, monkeypatch):
    monkeypatch.setattr(limits, "PIPE_IDLE_SECONDS", 0.2)
    z, y = inputs(tmp_path)
    fifo = tmp_path / "g.fifo"
    os.mkfifo(fifo)
    one_line_error(invoke(["grad", z, y, "--grad", fifo]), "nothing came through the named pipe")
    one_line_error(invoke(["batch", fifo]), "manifest", "nothing came through")


def test_d2_fifo_case_path_in_a_batch_is_refused(tmp_path, invoke):
    z, y = inputs(tmp_path)
    os.mkfifo(tmp_path / "g.fifo")
    m = manifest(tmp_path, {"name": "a", "logits": "z.npy", "labels": "y.npy", "grad": "g.fifo"})
    result = invoke(["batch", m])
    assert result.exit_code == 2 and "named pipe" in json.loads(result.stdout)["error"]


def test_d2_stress_output_left_as_a_fifo_fails_the_cell(tmp_path):
    os.mkfifo(tmp_path / "grad.npy")
    arr, err = read_output(tmp_path / "grad.npy", "gradient", "{grad}")
    assert arr is None and "not a regular file" in err


def test_d2_fifo_with_a_writer_is_read(tmp_path):
    fifo = tmp_path / "z.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"printf '1,2\\n3,4\\n' > {fifo}"])
    assert load_array(str(fifo)).tolist() == [[1, 2], [3, 4]]
    writer.wait()


def test_d3_stdin_is_capped(invoke, tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_STREAM_BYTES", 1000)
    _, y = inputs(tmp_path)
    one_line_error(invoke(["grad", "-", y], input="1,2,3\n" * 1000), "more than 1000 bytes")


def test_d3_device_manifest_is_refused(invoke):
    one_line_error(invoke(["batch", "/dev/zero"]), "not a regular file or a pipe")


def test_d3_manifest_size_is_capped(tmp_path, invoke, monkeypatch):
    monkeypatch.setattr(limits, "MAX_MANIFEST_BYTES", 100)
    one_line_error(invoke(["batch", "-"], input="{}\n" * 100), "manifest limit")


# --- D4 zip bombs ---------------------------------------------------------------------------

def npz_with(member: str, header_shape, payload: bytes) -> bytes:
    buf = io.BytesIO()
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<f8", "fortran_order": False,
                                               "shape": header_shape})
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, hdr.getvalue() + payload)
    return buf.getvalue()


def test_d4_decompressed_size_is_capped(tmp_path, invoke, monkeypatch):
    monkeypatch.setattr(limits, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(npz_with("z.npy", (1 << 18,), bytes(8 << 18)))  # 2 MiB of zeros
    assert bomb.stat().st_size < 20_000
    _, y = inputs(tmp_path)
    one_line_error(invoke(["grad", bomb, y]), "over the limit")


def test_d4_member_is_read_only_as_far_as_its_header_says(tmp_path):
    lying = tmp_path / "lying.npz"
    lying.write_bytes(npz_with("z.npy", (3,), bytes(64 << 20)))  # 64 MiB behind a 3-value header
    assert load_array(str(lying)).tolist() == [0.0, 0.0, 0.0]


# --- D5 capture, D6 huge output claims, D10 background children, D11 --impl in a child ------

def test_d5_capture_keeps_a_bounded_tail():
    res = run_process(["sh", "-c", "yes | head -c 20000000; echo END"], timeout=60)
    assert res.returncode == 0 and len(res.stdout) <= limits.MAX_CAPTURE_BYTES
    assert res.stdout.endswith(b"y\nEND\n")


def test_d6_output_claiming_a_huge_shape_fails_the_cell(tmp_path):
    path = tmp_path / "grad.npy"
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<f8", "fortran_order": False,
                                               "shape": (10**10,)})
    path.write_bytes(hdr.getvalue() + bytes(80))
    arr, err = read_output(path, "gradient", "{grad}")
    assert arr is None and "bad output" in err and "truncated" in err


def test_d10_background_child_does_not_outlive_the_run():
    res = run_process(["sh", "-c", "sleep 300 & echo $!"], timeout=60)
    assert res.returncode == 0 and not res.timed_out
    pid = int(res.stdout.split()[0])
    for _ in range(500):  # the kill is sent; reaping by init may take a moment
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    pytest.fail(f"background child {pid} still running")


def _case() -> Case:
    z = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    y = np.array([0, 1])
    return Case("spread", 1.0, "f32", z, y, z.astype(np.float64), y)


def _exit7(z, y):
    os._exit(7)


def _segfault(z, y):
    ctypes.string_at(0)


def _swallow(z, y):
    while True:
        try:
            time.sleep(60)
        except BaseException:
            pass


def _good(z, y):
    print("hello")
    return 0.0, np.zeros_like(z)


@pytest.mark.parametrize("fn, reason, text", [
    (_exit7, "crash", "exit status 7"), (_segfault, "crash", "SIGSEGV"),
    (_swallow, "timeout", "timeout")])
def test_d11_impl_crash_or_hang_is_that_cells_verdict(fn, reason, text):
    run = python_runner(fn, timeout=1.0)
    out = run(_case())
    assert out.reason == reason and text in out.error
    assert python_runner(_good, timeout=1e300)(_case()).error == ""  # a huge timeout works


def test_d11_worker_is_restarted_after_a_crash(tmp_path):
    marker = tmp_path / "crashed"

    def flaky(z, y):
        if not marker.exists():
            marker.touch()
            os._exit(3)
        return 0.0, np.zeros_like(z)

    run = python_runner(flaky, timeout=5)
    assert run(_case()).reason == "crash"
    assert run(_case()).error == ""


# --- D7 a dead worker does not take the batch with it ---------------------------------------

def killing_task(case):
    marker = Path(os.environ["CE_TEST_MARKER"])
    if case.name == "killer" or (case.name == "once" and not marker.exists()):
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return run_case(case)


def test_d7_pool_is_restarted_and_cases_run(tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor
    inputs(tmp_path)
    monkeypatch.setenv("CE_TEST_MARKER", str(tmp_path / "marker"))
    names = ["a", "once", *"bcdefgh", "killer", *"ijklmn"]
    m = manifest(tmp_path, *({"name": n, "logits": "z.npy", "labels": "y.npy"} for n in names))
    cases = parse_manifest(m.read_text(), tmp_path)
    results = list(run_cases(cases, jobs=2, task=killing_task,
                             executor_factory=lambda n: ProcessPoolExecutor(n)))
    assert [r.name for r in results] == names
    status = {r.name: r.status for r in results}
    assert status.pop("killer") == "error"
    assert set(status.values()) == {"pass"}, results


# --- D8 exit 3 for bad input or environment -------------------------------------------------

@pytest.mark.parametrize("target", ["/", ".", "", "dir"])
def test_d8_out_grad_directory(tmp_path, invoke, target, monkeypatch):
    monkeypatch.chdir(tmp_path)
    z, y = inputs(tmp_path)
    (tmp_path / "dir").mkdir()
    one_line_error(invoke(["grad", z, y, "--out-grad", target]), "--out-grad")


def test_d8_long_path_component(tmp_path, invoke):
    _, y = inputs(tmp_path)
    one_line_error(invoke(["grad", tmp_path / ("a" * 300), y]), "File name too long")
    one_line_error(invoke(["grad", tmp_path / "z.npy", y, "--out-grad", tmp_path / ("g" * 300)]))


def test_d8_save_failures_in_proc(tmp_path, invoke, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad_impl.py").write_text("import numpy as np\n"
                                          "def f(z, y):\n    return 0.0, np.ones_like(z)\n")
    result = invoke(["stress", "--impl", "bad_impl:f", "--dtypes", "f32", "--scales", "1",
                     "--scenarios", "spread", "--save-failures", "/proc/x", "-q"])
    sys.modules.pop("bad_impl", None)
    one_line_error(result)


def test_d8_deeply_nested_manifest_line(tmp_path, invoke):
    path = tmp_path / "deep.jsonl"
    z, y = inputs(tmp_path)
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n"
                    + json.dumps({"name": "a", "kind": "multiclass", "logits": "z.npy",
                                  "labels": "y.npy"}) + "\n")
    result = invoke(["batch", path])
    assert result.exit_code == 2, result.output
    assert "nested too deeply" in result.stdout.splitlines()[0]


def test_d8_lone_surrogate_name_in_a_table(tmp_path, invoke):
    inputs(tmp_path)
    path = tmp_path / "m.jsonl"
    path.write_text('{"name": "bad\\udc80name", "kind": "multiclass", "logits": "z.npy", '
                    '"labels": "y.npy"}\n')
    result = invoke(["batch", path, "-f", "table"])
    assert result.exit_code == 0, result.output
    assert "bad\ufffdname" in result.stdout


def test_d8_rich_markup_in_paths_and_names(tmp_path, invoke):
    z, y = inputs(tmp_path)
    odd = tmp_path / "[x][red]z.npy"
    shutil.copy(z, odd)
    result = invoke(["grad", odd, y])
    assert result.exit_code == 0 and "[x][red]z.npy" in result.stdout
    m = manifest(tmp_path, {"name": "[/x]", "logits": "z.npy", "labels": "y.npy"})
    shutil.copy(m, tmp_path / "[red]m.jsonl")
    result = invoke(["batch", tmp_path / "[red]m.jsonl", "-f", "table"])
    assert result.exit_code == 0 and "[red]m.jsonl" in "".join(result.stdout.split()) and "[/x]" in result.stdout
    script = tmp_path / "[red]impl"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    result = invoke(["stress", "--impl-cmd", f"'{script}' {{logits}} {{labels}} {{grad}}",
                     "--dtypes", "f32", "--scales", "1", "--scenarios", "spread"])
    assert result.exit_code == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("redirect, code", [(">&-", 0), ("> /dev/full", 2)])
def test_d8_closed_or_full_stdout(tmp_path, redirect, code):
    z, y = inputs(tmp_path)
    out = subprocess.run(["sh", "-c", f"{CE_CHECK} grad {z} {y} {redirect}"],
                         capture_output=True, text=True)
    assert out.returncode == code, out
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == code // 2


def test_d8_large_finite_logits_overflowing_a_sum(tmp_path, invoke):
    (tmp_path / "b.csv").write_text("1e308 4 1e308\n")
    (tmp_path / "t.csv").write_text("0 0 0\n")
    result = invoke(["binary", tmp_path / "b.csv", tmp_path / "t.csv"])
    assert result.exit_code in (0, 1, 2) and "Traceback" not in result.output
    if result.exit_code == 2:
        one_line_error(result)


def test_d8_header_claiming_4_gib(tmp_path, invoke):
    path = tmp_path / "huge.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + (0xFFFFFFFF).to_bytes(4, "little") + b"{}")
    _, y = inputs(tmp_path)
    one_line_error(invoke(["grad", path, y]), "corrupt .npy header", "limit")


# --- D13 cost guard, CSV parser, D14 one clear line -----------------------------------------

def test_d13_fd_full_cost_is_refused_up_front(tmp_path, invoke):
    np.save(tmp_path / "wide.npy", np.zeros((1, 40_000)))
    np.save(tmp_path / "y.npy", np.array([0]))
    one_line_error(invoke(["grad", tmp_path / "wide.npy", tmp_path / "y.npy", "--fd", "full"]),
                   "--fd full", "--fd directional")
    assert limits.fd_full_refusal((1, 30_000)) is None or limits.FD_FULL_BUDGET < 1.8e9


@pytest.mark.parametrize("text, expect", [
    ("1,2\n3,4\n", [[1, 2], [3, 4]]), ("a,b\n1.5,2\n", [[1.5, 2.0]]),
    ("1_000 2\n", [[1000, 2]]), ("\ufeff1\t2\r\n3\t4\r\n", [[1, 2], [3, 4]]),
    ("99999999999999999999,1\n", [[1e20, 1.0]])])
def test_d13_csv_fast_path_matches_the_line_parser(text, expect):
    from ce_cli.io.loading import _parse_text, parse_csv
    got = parse_csv(text.encode(), "x")
    assert got.tolist() == expect and got.dtype == _parse_text(text.lstrip("\ufeff"), "x").dtype


def test_d14_npz_member_names_stay_on_one_line(tmp_path, invoke):
    buf = tmp_path / "m.npz"
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(2000):
            zf.writestr(f"a\nb{i}.npy", b"")
    _, y = inputs(tmp_path)
    result = invoke(["grad", buf, y])
    one_line_error(result, "holds 2000 arrays")
    assert len(result.stderr) < 600


def test_d14_empty_loss_and_colon_keys(tmp_path, invoke):
    z, y = inputs(tmp_path)
    one_line_error(invoke(["grad", z, y, "--loss", ""]), "--loss", "empty")
    np.savez(tmp_path / "x.npz", **{"colon:name": np.zeros((4, 5))})
    result = invoke(["grad", f"{tmp_path}/x.npz:colon:name", y, "-q"])
    assert result.exit_code == 0, result.output


def test_d8_overflowing_loss_sum_is_an_infinite_loss():
    """Row losses whose partial sums overflow: the loss is inf (a report), not an error."""
    import ce_cli

    report = ce_cli.check_binary(np.array([1e308, 4.0, 1e308]), np.array([0.0, 1.0, 0.0]))
    assert report.loss == float("inf")


@pytest.mark.parametrize("fd", ["full", "directional", "sample"])
def test_d12_logit_at_float64_max_is_skipped_not_called_inf(fd, invoke, tmp_path):
    """A finite logit at float64's maximum cannot be perturbed by h: that entry is skipped
    with a note, never reported as a '+inf logit'."""
    z = np.array([[np.finfo(np.float64).max, 1.0, 2.0], [0.5, 0.1, -1.0]])
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", np.array([1, 0]))
    result = invoke(["grad", tmp_path / "z.npy", tmp_path / "y.npy", "--fd", fd])
    assert result.exit_code == 0, result.output
    assert "+inf" not in result.output
    if fd == "full":
        assert "too large to perturb" in result.stderr


# --- D2 Ctrl-C stops a blocked or busy batch ------------------------------------------------
def _interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)  # a hang guard, not a timing assertion
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("ce-check batch did not stop on SIGINT")
    return out.decode(), err.decode()


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` (None once it is gone or without /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_blocked(pid: int) -> None:
    """Until `pid` sleeps without using CPU for 0.5 s (its start-up done, the read blocking),
    however loaded the machine; 1 s without /proc. A hang guard, not a timing assertion."""
    if _cpu_seconds(pid) is None:
        time.sleep(1.0)
        return
    still, last = 0, -1.0
    for _ in range(600):
        time.sleep(0.1)
        cpu = _cpu_seconds(pid)
        if cpu is None:
            return
        still = still + 1 if cpu == last else 0
        last = cpu
        if still >= 5:
            return


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_d2_sigint_stops_a_batch_blocked_on_a_silent_pipe(jobs):
    if not CE_CHECK.exists():
        pytest.skip(f"console script not installed at {CE_CHECK}")
    proc = subprocess.Popen([str(CE_CHECK), "batch", "-", "--jobs", jobs], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_blocked(proc.pid)  # the writer stays open and silent: the manifest read blocks
    _, err = _interrupt(proc)
    proc.stdin.close()
    assert proc.returncode == 130, err
    assert len(err.splitlines()) <= 1 and "Traceback" not in err, err


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_d2_sigint_stops_busy_workers_without_tracebacks_or_orphans(tmp_path):
    if not CE_CHECK.exists() or not Path("/proc/self/task").exists():
        pytest.skip("needs the console script and /proc")
    rng = np.random.default_rng(0)
    # ~4 s of --fd full per case on the numpy kernel, whose sweeps evaluate every row whole
    # (the compiled kernel's steps take 0.02 s)
    np.save(tmp_path / "z.npy", rng.standard_normal((4, 12000)))
    np.save(tmp_path / "y.npy", np.arange(4))
    m = manifest(tmp_path, *({"name": f"c{i}", "logits": "z.npy", "labels": "y.npy", "fd": "full"}
                             for i in range(4)))
    proc = subprocess.Popen([str(CE_CHECK), "batch", str(m), "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "CE_CHECK_FUSED": "0"})
    workers: list[int] = []
    while len(workers) < 2 and proc.poll() is None:
        time.sleep(0.1)
        workers = _children(proc.pid)
    # both workers inside a case: each past its start-up, however loaded the machine (a case
    # runs ~4 s of CPU; start-up takes well under 0.5 s of it)
    for _ in range(600):
        cpu = [_cpu_seconds(pid) for pid in workers]
        if proc.poll() is not None or all(c is None or c >= 0.5 for c in cpu):
            break
        time.sleep(0.1)
    out, err = _interrupt(proc)
    assert workers and proc.returncode == 130, (proc.returncode, err)
    assert len(err.splitlines()) <= 1 and "Traceback" not in err, err
    for pid in workers:  # killed and reaped (by us or by init), not left running
        for _ in range(50):
            stat = Path(f"/proc/{pid}/stat")
            if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"worker {pid} still running after Ctrl-C")


# --- D13 explain's cost, D14 explain's warnings ---------------------------------------------
@pytest.mark.parametrize("steps", [[], ["--steps"]])
def test_d13_explain_refuses_a_million_classes_before_allocating(tmp_path, invoke, steps):
    z = tmp_path / "z.npy"
    np.save(z, np.zeros(10**6, dtype=np.float32))
    one_line_error(invoke(["explain", z, "--label", "3", *steps]),
                   "1000000 classes", "at most 262144", "MAX_EXPLAIN_CLASSES")


def test_d13_explain_class_limit_is_read_from_limits(invoke, monkeypatch):
    monkeypatch.setattr(limits, "MAX_EXPLAIN_CLASSES", 3)
    one_line_error(invoke(["explain", "--logits", "1,2,3,4", "--label", "0"]), "4 classes", "at most 3")
    assert invoke(["explain", "--logits", "1,2,3", "--label", "0"]).exit_code == 0


@pytest.mark.parametrize("args", [
    ["--logits=-800", "--label", "1"], ["--logits=-800", "--label", "0", "--compare-mse", "-v"],
    ["--logits=-800", "--target", "0.3", "--steps", "--json"], ["--logits=800", "--label", "0", "--steps"],
    ["--logits=-1e308", "--label", "1", "--steps"]])
def test_d14_explain_binary_extreme_logits_keep_stderr_clean(args):
    env = script_env()
    env["PYTHONWARNINGS"] = "error::RuntimeWarning"  # a numpy warning would be exit 3
    result = run_script(["explain", "--kind", "binary", *args], env=env)
    assert result.returncode in (0, 1), result.stderr
    assert result.stderr == b"", result.stderr
