"""The compiled kernel (`_fused.c`), loaded with ctypes: loss, gradient, error floor and the
comparison with the user's gradient, one row at a time in three sweeps, no (R, C) temporaries.

`pip install` compiles it when a C compiler is present, for several targets (AVX-512, AVX2, SSE2
or NEON, scalar) of which it runs the best this CPU has, on `default_threads()` threads.
It serves softmax cross-entropy with index targets (weights, ignore_index, label smoothing, -inf
masks included) and probability targets, with z-loss, sample weights, logit scale and softcap
too (FusedKernel: semantic_rows' formulas), and sigmoid BCE (SigmoidKernel, weights,
pos_weight, label smoothing, sample weights, a denominator, logit scale and softcap included);
the numpy kernels (numpy_softmax.py, numpy_sigmoid.py), its reference, serve rows it must report
(NaN, +inf, all -inf), vocabulary shards, and every CPU without a C compiler.
`CE_CHECK_FUSED=0` turns it off.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import weakref
from collections.abc import Iterator
from typing import Any
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import numpy as np

from ce_cli.io.bfloat16 import Bfloat16Rows
from ce_cli.kernels.base import ChunkEval, RowStats, take_rows

_P = ctypes.c_void_p


class _Args(ctypes.Structure):
    """Mirror of `ce_args` in _fused.c."""

    _fields_ = [
        ("n_rows", ctypes.c_int64), ("n_cols", ctypes.c_int64),
        ("z", _P), ("z_is_f32", ctypes.c_int64), ("g", _P), ("g_is_f32", ctypes.c_int64),
        ("alpha", _P), ("beta", _P), ("ys", _P), ("active", _P), ("w", _P),
        ("w_sum", ctypes.c_double), ("scale", ctypes.c_double), ("rtol", ctypes.c_double),
        ("abs_tol", ctypes.c_double), ("floor_coef", ctypes.c_double),
        ("lse_weight", ctypes.c_double),
        ("loss", _P), ("row_max", _P), ("log1p_s1", _P),
        ("ratio_max", _P), ("max_abs", _P), ("max_rel", _P), ("mismatches", _P), ("nonfinite", _P),
        ("out_ref", _P), ("out_floor", _P), ("out_tol", _P), ("out_ratio", _P), ("work", _P),
        ("n_threads", ctypes.c_int64), ("q", _P), ("q_total", _P),
        ("y_bin", _P), ("w_bin", _P), ("pos_w", _P),
        ("out_items", _P), ("out_item_w", _P), ("total_w", _P), ("y_is_f32", ctypes.c_int64),
        ("q_is_f32", ctypes.c_int64), ("q_sum_here", ctypes.c_int64), ("row_min", _P),
        ("ext", ctypes.c_int64), ("x_scale", ctypes.c_double), ("z_loss", ctypes.c_double),
        ("s_w", _P), ("row_zabs", _P), ("softcap", ctypes.c_double),
        ("row_qabs", _P), ("row_qsum", _P), ("row_mag", _P), ("row_g1", _P),
        ("pert_col", _P), ("pert_val", _P), ("n_picks", ctypes.c_int64), ("pick_cols", _P),
        ("pick_g", _P), ("pick_fl", _P),
        ("n_steps", ctypes.c_int64), ("step_cols", _P), ("step_vals", _P), ("step_loss", _P),
        ("flush_min", ctypes.c_double), ("flush_partial", ctypes.c_double),
        ("flush_tiny", ctypes.c_double), ("flushed", _P),
    ]


TARGET_ENV = "CE_CHECK_TARGET"    # avx512, avx2, sse2, neon, scalar: force one (default: the best)
THREADS_ENV = "CE_CHECK_THREADS"  # threads per kernel call (default: the cores this process may use)


@functools.cache
def _library():
    """The built library, or None (not built, or it does not load)."""
    here = Path(__file__).resolve().parent
    for suffix in EXTENSION_SUFFIXES:
        path = here / f"_fused{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
                lib.ce_softmax_rows.argtypes = [ctypes.POINTER(_Args)]
                for name in ("ce_softmax_rows_on", "ce_bce_rows_on", "ce_scan_rows_on"):
                    getattr(lib, name).argtypes = [ctypes.POINTER(_Args), ctypes.c_char_p]
                    getattr(lib, name).restype = ctypes.c_int64
                lib.ce_softmax_rows.restype = ctypes.c_int64
                for name in ("ce_select_target", "ce_target_runs"):
                    getattr(lib, name).argtypes = [ctypes.c_char_p]
                    getattr(lib, name).restype = ctypes.c_int64
                for name in ("ce_target", "ce_targets"):
                    getattr(lib, name).restype = ctypes.c_char_p
                for name in ("ce_widen_f16", "ce_widen_bf16"):
                    getattr(lib, name).argtypes = [_P, _P, ctypes.c_int64, ctypes.c_int64]
                    getattr(lib, name).restype = None
            except (OSError, AttributeError):
                return None
            return lib
    return None


def targets() -> list[str]:
    """The kernel's targets this CPU runs, best first ([] when the kernel is not built)."""
    lib = _library()
    if lib is None:
        return []
    return [t for t in lib.ce_targets().decode().split("|") if lib.ce_target_runs(t.encode())]


@functools.cache
def cpu_count() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 cpu.max quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(-(-int(quota) // int(period)))))
    except (OSError, ValueError):
        pass
    return max(1, n)


_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("ce_check_threads", default=None)


@contextlib.contextmanager
def use_threads(n: int | None) -> Iterator[None]:
    """Within the block (this thread's context) default_threads() is `n`; None changes nothing."""
    token = _THREADS.set(n if n is not None else _THREADS.get())
    try:
        yield
    finally:
        _THREADS.reset(token)


def default_threads() -> int:
    """Threads per kernel call: use_threads' count inside one, else CE_CHECK_THREADS when set
    (>= 1), else cpu_count()."""
    if (n := _THREADS.get()) is not None:
        return n
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        try:
            return max(1, int(text))
        except ValueError:
            pass
    return cpu_count()


class _Entry:
    """ce_softmax_rows_on one target, called as entry(ctypes.byref(args)) -> 0 or 1 + the first
    row it hands back (entry.bce(...): ce_bce_rows_on, sigmoid BCE; entry.scan(...):
    ce_scan_rows_on); n_threads 0 (unset) becomes default_threads()."""

    def __init__(self, lib, target: str):
        self.target = target
        self._name = target.encode()
        self._fn = lib.ce_softmax_rows_on
        self._bce = lib.ce_bce_rows_on
        self._scan = lib.ce_scan_rows_on

    def __call__(self, ref) -> int:
        return self._fn(self._threads(ref), self._name)

    def bce(self, ref) -> int:
        return self._bce(self._threads(ref), self._name)

    def scan(self, ref) -> int:
        return self._scan(self._threads(ref), self._name)

    @staticmethod
    def _threads(ref):
        args = ref._obj if hasattr(ref, "_obj") else ref.contents
        if args.n_threads <= 0:
            args.n_threads = default_threads()
        return ref


@functools.cache
def _kernel_entry(target: str = ""):
    """ce_softmax_rows on `target` ("": the best this CPU runs), or None when the library is not
    built or this CPU does not run that target."""
    lib = _library()
    if lib is None:
        return None
    if not target:
        lib.ce_select_target(None)  # the best this CPU runs
        return _Entry(lib, lib.ce_target().decode())
    return _Entry(lib, target) if lib.ce_target_runs(target.encode()) else None


def kernel():
    """The compiled entry point, or None (not built, CE_CHECK_FUSED=0, or CE_CHECK_TARGET names a
    target this CPU does not run)."""
    if os.environ.get("CE_CHECK_FUSED", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return _kernel_entry(os.environ.get(TARGET_ENV, "").strip().lower())


def target() -> str:
    """The target kernel() runs (avx512, avx2, sse2, neon, scalar), or "numpy" without it."""
    fn = kernel()
    return "numpy" if fn is None else fn.target


def row_scan(q: np.ndarray, sums: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray] | None:
    """Per row of the (R, C) array `q`: with `sums` its float64 sum in numpy's pairwise order
    (np.sum's bits; NaN when the row holds a NaN), its minimum and its maximum (NaN when the row
    holds a NaN and no +inf), in one pass on default_threads() threads. None without the
    compiled kernel, or when `q` is not C-contiguous float32 or float64 (its caller then works
    through numpy blocks)."""
    fn = kernel()
    if (fn is None or not isinstance(q, np.ndarray) or q.ndim != 2
            or q.dtype not in (np.float32, np.float64) or not q.flags.c_contiguous):
        return None
    R = q.shape[0]
    total, lo, hi = np.empty(R) if sums else None, np.empty(R), np.empty(R)
    args = _Args(n_rows=R, n_cols=q.shape[1], q=_ptr(q), q_is_f32=int(q.dtype == np.float32),
                 q_total=_ptr(total), row_min=_ptr(lo), row_max=_ptr(hi))  # the scan needs no work
    fn.scan(ctypes.byref(args))
    return total, lo, hi


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _readable(a: Any) -> bool:
    """True when `_as_kernel_rows` passes rows of `a` on as they are (no copy)."""
    return (isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float64)
            and a.flags.c_contiguous)


def _as_kernel_rows(a: Any) -> np.ndarray:
    """C-contiguous float32 or float64 rows (narrower floats widen exactly to float32; float16
    and the bits of `Bfloat16Rows` by ce_widen_f16 / ce_widen_bf16, on default_threads()
    threads)."""
    lib = _library()
    if isinstance(a, Bfloat16Rows):
        if lib is None:
            return np.ascontiguousarray(a[...])
        return _widened(lib.ce_widen_bf16, np.ascontiguousarray(a.bits, dtype=np.uint16))
    a = np.asarray(a)
    if a.dtype == np.float32 or a.dtype == np.float64:
        return np.ascontiguousarray(a)
    if a.dtype == np.float16 and lib is not None:
        return _widened(lib.ce_widen_f16, np.ascontiguousarray(a))
    exact32 = ((a.dtype.kind == "f" and a.dtype.itemsize <= 4) or a.dtype.kind == "b"
               or (a.dtype.kind in "iu" and a.dtype.itemsize <= 2))
    return np.ascontiguousarray(a, dtype=np.float32 if exact32 else np.float64)


def _widened(widen: Any, bits: np.ndarray) -> np.ndarray:
    """The float32 values of the 16-bit floats `bits` by `widen` (ce_widen_f16 / _bf16)."""
    out = np.empty(bits.shape, dtype=np.float32)
    widen(_ptr(bits), _ptr(out), bits.size, default_threads())
    return out


class _Plain:
    extended = False


_PLAIN = _Plain()  # a problem without training-code semantics


def _outputs(R: int, C: int, per_row: tuple[str, ...], grad: bool, floor: bool,
             cmp: RowStats | None) -> dict[str, np.ndarray]:
    """The kernel's output arrays for R rows of C entries (the comparison's with `cmp`)."""
    out = {name: np.empty(R) for name in per_row}
    if grad:
        out["out_ref"] = np.empty((R, C))
    if floor:
        out["out_floor"] = np.empty((R, C))
    if cmp is not None:
        out.update({name: np.empty(R) for name in ("ratio_max", "max_abs", "max_rel")})
        counts = ("mismatches", "nonfinite", *(("flushed",) if cmp.flush else ()))
        out.update({name: np.empty(R, dtype=np.int64) for name in counts})
    return out


def _tolerance(cmp: RowStats | None, floor_coef: float | None,
               lse_weight: float = 1.0) -> tuple[float | None, dict]:
    """floor_coef (the comparison's when comparing) and the rtol, abs_tol and lse_weight
    arguments (and the flush rule's, ce_args.flush_min)."""
    if cmp is None or cmp.tol is None:
        return floor_coef, {"rtol": 0.0, "abs_tol": 0.0, "lse_weight": lse_weight}
    tol = cmp.tol
    return tol.floor_coef, {"rtol": tol.rtol, "abs_tol": tol.atol + cmp.extra_atol + tol.tiny,
                            "lse_weight": tol.lse_weight, **(cmp.flush or {})}


class _Kernel:
    """Rows of one problem through the compiled kernel; subclasses set the inputs."""

    per_row: tuple[str, ...] = ()

    def __init__(self, fn, problem) -> None:
        self.fn = fn
        # weak: the problem holds its kernel, and a cycle between the two would keep both (and
        # the problem's arrays, maybe gigabytes) alive until the cyclic garbage collector ran,
        # which large numpy arrays do not prompt: checks in a loop would pile them up
        self._problem = weakref.ref(problem)
        C = problem.n_classes
        self.work = np.empty(4 * C + 8 + 5 * (C // 128 + 1))  # see ce_args.work, WORK_SIZE

    @property
    def problem(self) -> Any:
        problem = self._problem()
        assert problem is not None, "a kernel is used through its problem"
        return problem

    def _call(self, z, g, params: dict, out: dict) -> int:
        raise NotImplementedError

    def in_place(self, g_rows: np.ndarray | None, items: bool = False) -> bool:
        """True when a call reads every (R, C) input where it lies and forms no (R, C) array
        (then a chunk of any size costs no memory); `items`: the caller wants each chunk's
        per-element losses (sigmoid: two (R, C) float64 arrays)."""
        return False

    def _run(self, z, g, rows, params: dict, out: dict, cmp: RowStats | None) -> bool:
        """One call over the rows, the comparison folded into `cmp`: False when handed back."""
        if self._call(z, g, params, out):
            return False
        if cmp is not None:
            R, C = z.shape
            cmp.update_summary(int(rows[0]) if R else 0, R * C, out["ratio_max"], out["mismatches"],
                               out["nonfinite"], out["max_abs"], out["max_rel"],
                               lambda rs: self._open_rows(z, g, params, rs), g, out.get("flushed"))
        return True

    def _open_rows(self, z, g, params: dict, rows: list[int]) -> list[tuple]:
        """Rows `rows` again, entry by entry, in one call: each one's (ratio, ref, got,
        |got - ref|, tol)."""
        idx = np.asarray(rows, dtype=np.int64)
        C = z.shape[1]
        some = {k: v[idx] for k, v in params.items() if isinstance(v, np.ndarray)}
        detail = {name: np.empty((idx.size, C)) for name in ("out_ref", "out_tol", "out_ratio")}
        scratch = {name: np.empty(idx.size)
                   for name in (*self.per_row, "ratio_max", "max_abs", "max_rel")}
        counts = ("mismatches", "nonfinite", *(("flushed",) if "flush_min" in params else ()))
        scratch.update({name: np.empty(idx.size, dtype=np.int64) for name in counts})
        got = g[idx]
        self._call(z[idx], got, {**params, **some}, {**scratch, **detail})
        ref = detail["out_ref"]
        diff = got.astype(np.float64)
        diff -= ref
        np.abs(diff, out=diff)
        return [(detail["out_ratio"][i], ref[i], g[r], diff[i], detail["out_tol"][i])
                for i, r in enumerate(rows)]

    def _args(self, z, g, params: dict, out: dict) -> _Args:
        R, C = z.shape
        pointers = {k: _ptr(v) if isinstance(v, np.ndarray) else v for k, v in params.items()}
        return _Args(
            n_rows=R, n_cols=C, z=_ptr(z), z_is_f32=int(z.dtype == np.float32),
            g=_ptr(g), g_is_f32=int(g is not None and g.dtype == np.float32),
            scale=self.problem.grad_scale, work=_ptr(self.work),
            **pointers, **{name: _ptr(arr) for name, arr in out.items()},
        )


class FusedKernel(_Kernel):
    """One softmax problem's rows through the compiled kernel (index or probability targets;
    with z-loss, logit scale and sample weights, `semantic_rows`' formulas)."""

    per_row: tuple[str, ...] = ("loss", "row_max", "log1p_s1")

    def __init__(self, fn, problem) -> None:
        super().__init__(fn, problem)
        w = problem.weight
        self.w = None if w is None else np.ascontiguousarray(w, dtype=np.float64)
        self.w_sum = float(w.sum()) if w is not None else float(problem.n_classes)
        sem = getattr(problem, "sem", _PLAIN)
        self.sem: Any = sem if sem.extended else None  # models.semantics.Semantics
        if self.sem is not None:
            self.per_row = (*self.per_row, "total_w", "row_zabs", "row_qabs", "row_qsum")

    @classmethod
    def plan(cls, problem) -> FusedKernel | None:
        """The kernel for `problem` when it is built and serves it, else None."""
        fn = kernel()
        if fn is None or problem.nan_gradient or problem.n_classes == 0:
            return None
        # z-loss, softcap, logit scale and sample weights are served (semantic_rows'
        # formulas); vocabulary shards stay on numpy's extended path. `denominator` (a grad
        # scale) and smoothing form 'others' (another alpha, beta) are the plain formulas.
        sem: Any = getattr(problem, "sem", _PLAIN)
        if sem.extended and sem.vocab_offset is not None:
            return None
        return cls(fn, problem)

    def evaluate(self, z_rows, rows: np.ndarray, *, grad: bool = False,
                 floor_coef: float | None = None, cmp: RowStats | None = None,
                 g_rows=None, stream: bool = False, picks: np.ndarray | None = None,
                 perturb: tuple[np.ndarray, np.ndarray] | None = None,
                 lse_weight: float = 1.0,
                 steps: tuple[np.ndarray, np.ndarray] | None = None) -> ChunkEval | None:
        """SoftmaxCE.evaluate_rows through the kernel; with `cmp`, the user's gradient rows
        `g_rows` are compared on the way (`rows` consecutive). None when a row holds NaN or
        +inf or only -inf: the numpy kernel, which reports those, takes the rows. The (R, C)
        floor is written only when `floor_coef` is given; with `picks` the gradient and floor
        at those columns only, `perturb` = (cols, values) sets one entry of each row, and
        `steps` gives the losses of rows with one entry set (all three: see
        SoftmaxCE.evaluate_rows). (`stream`: as SigmoidKernel's; a softmax row has no
        per-element losses.)"""
        z = _as_kernel_rows(z_rows)
        g = _as_kernel_rows(g_rows) if cmp is not None else None
        want_floor = floor_coef is not None  # the comparison alone needs no floor written
        floor_coef, params = _tolerance(cmp, floor_coef, lse_weight)
        params.update(self._targets(rows), floor_coef=floor_coef or 0.0)
        if self.sem is not None:
            params.update(self._semantics(rows))
        if perturb is not None:
            params.update(pert_col=np.ascontiguousarray(perturb[0], dtype=np.int64),
                          pert_val=np.ascontiguousarray(perturb[1], dtype=np.float64))
        R, C = z.shape
        if steps is not None and perturb is None:
            step_cols = np.ascontiguousarray(steps[0], dtype=np.int64)
            params.update(n_steps=step_cols.shape[1], step_cols=step_cols,
                          step_vals=np.ascontiguousarray(steps[1], dtype=np.float64))
        if picks is None:
            out = _outputs(R, C, self.per_row, grad, want_floor, cmp)
        else:  # no (R, C) arrays: the picked entries only
            picks = np.ascontiguousarray(picks, dtype=np.int64)
            params.update(pick_cols=picks, n_picks=picks.shape[1])
            out = _outputs(R, C, self.per_row, False, False, cmp)
            out.update(pick_g=np.empty(picks.shape), pick_fl=np.empty(picks.shape))
        if "step_cols" in params:
            out["step_loss"] = np.empty(params["step_cols"].shape)
        if not self._run(z, g, rows, params, out, cmp):
            return None
        m, l1 = out["row_max"], out["log1p_s1"]
        Q = params["q_total"] if "q" in params else params["alpha"] + params["beta"] * self.w_sum
        pick_g, pick_fl = out.get("pick_g"), out.get("pick_fl") if want_floor else None
        if self.sem is None:
            return ChunkEval(loss=out["loss"], grad=out.get("out_ref"),
                             floor=out.get("out_floor"), lse=m + l1, total_weight=Q, row_max=m,
                             log1p_s1=l1, pick_grad=pick_g, pick_floor=pick_fl,
                             step_loss=out.get("step_loss"))
        return ChunkEval(loss=out["loss"], grad=out.get("out_ref"), floor=out.get("out_floor"),
                         lse=m + l1, total_weight=out["total_w"], row_max=m, log1p_s1=l1,
                         row_terms=self._row_terms(rows, params, Q, out), pick_grad=pick_g,
                         pick_floor=pick_fl, step_loss=out.get("step_loss"))

    def _semantics(self, rows: np.ndarray) -> dict:
        """The kernel's training-code arguments: logit scale, z-loss, softcap (0: none), the
        rows' sample weights."""
        sem = self.sem
        sw = sem.sample_weight
        return {"ext": 1, "x_scale": float(sem.logit_scale), "z_loss": float(sem.z_loss),
                "softcap": float(sem.softcap or 0.0),
                "s_w": None if sw is None else np.ascontiguousarray(sw[rows], dtype=np.float64)}

    def _row_terms(self, rows: np.ndarray, params: dict, Q: np.ndarray,
                   out: dict) -> np.ndarray:
        """ChunkEval.row_terms as semantic_rows makes them: (s, Q, max|q|, sum|q|, max|z|);
        the kernel's max|z|, and max|q|, sum|q| of probability targets."""
        s = self.sem.row_weight(rows)
        if "q" in params:
            qabs, qsum = out["row_qabs"], out["row_qsum"]
        else:
            alpha, beta = params["alpha"], params["beta"]
            w = np.abs(self.w) if self.w is not None else np.ones(1)
            qabs = np.abs(alpha) + np.abs(beta) * w.max()
            qsum = np.abs(alpha) + np.abs(beta) * (w.sum() if self.w is not None
                                                   else self.problem.n_classes)
        return np.stack([s, Q, qabs, qsum, out["row_zabs"]], axis=1)

    def in_place(self, g_rows: np.ndarray | None, items: bool = False) -> bool:
        """float32/float64 C-contiguous logits and gradient, and index targets or probability
        targets read in their own width (a row's losses are per row: `items` asks nothing)."""
        problem = self.problem
        probs = problem.probs
        if probs is not None and (problem.smoothing or problem.weight is not None
                                  or not _readable(probs)):
            return False
        return _readable(problem.z) and (g_rows is None or _readable(g_rows))

    def _targets(self, rows: np.ndarray) -> dict:
        """The kernel's target arguments: q and its row sums Q (numpy's pairwise sum, as the
        numpy kernel), or alpha, beta, ys; active rows. Probability targets without smoothing
        or class weights are q itself: read in their own width, their sums those the input
        check made (`q_sums`, the same bits), else made by the kernel."""
        problem = self.problem
        active = np.ascontiguousarray(problem.valid[rows], dtype=np.uint8)
        if problem.probs is not None and not problem.smoothing and problem.weight is None:
            q = _as_kernel_rows(take_rows(problem.probs, rows))
            q_sums = getattr(problem, "q_sums", None)  # made by the input check: not again
            if q_sums is not None:
                return {"q": q, "q_is_f32": int(q.dtype == np.float32), "q_sum_here": 0,
                        "q_total": np.ascontiguousarray(q_sums[rows]), "active": active}
            return {"q": q, "q_is_f32": int(q.dtype == np.float32), "q_sum_here": 1,
                    "q_total": np.empty(q.shape[0]), "active": active}
        alpha, beta, ys = problem.targets(rows)
        if beta is None:  # probability targets: alpha is the dense q
            q = np.ascontiguousarray(alpha, dtype=np.float64)
            return {"q": q, "q_total": q.sum(axis=1), "active": active}
        alpha = np.ascontiguousarray(alpha, dtype=np.float64)
        return {"alpha": alpha,
                "beta": np.ascontiguousarray(np.broadcast_to(beta, alpha.shape), dtype=np.float64),
                "ys": np.ascontiguousarray(ys, dtype=np.int64), "active": active}

    def _call(self, z, g, params: dict, out: dict) -> int:
        args = self._args(z, g, params, out)
        args.w, args.w_sum = _ptr(self.w), self.w_sum
        return int(self.fn(ctypes.byref(args)))


class SigmoidKernel(_Kernel):
    """One sigmoid BCE problem's rows through the compiled kernel (ce_bce_rows_on); with a
    logit scale or softcap on z = T(x), sigmoid_rows' transformed formulas (row_terms too)."""

    per_row: tuple[str, ...] = ("loss", "total_w")

    def __init__(self, fn, problem) -> None:
        super().__init__(fn, problem)
        pw = problem.pos_weight
        self.pw = None if pw is None else np.ascontiguousarray(pw, dtype=np.float64)
        sem = problem.sem
        # z = T(x) (logit scale, softcap): the item weights hold g1 |z|, row_terms the sums
        self.transform: dict | None = None
        if problem.transformed:
            self.transform = {"ext": 1, "x_scale": float(sem.logit_scale),
                              "softcap": float(sem.softcap or 0.0)}
            self.per_row = (*self.per_row, "row_mag", "row_g1")

    @classmethod
    def plan(cls, problem) -> SigmoidKernel | None:
        """The kernel for `problem` when it is built, else None (also for a pos_weight that
        varies along other axes than the last: the kernel reads K values)."""
        fn = kernel()
        pw = problem.pos_weight
        if fn is None or problem.n_classes == 0 or (pw is not None and pw.ndim > 1):
            return None
        return cls(fn, problem)

    def evaluate(self, z_rows, rows: np.ndarray, *, grad: bool = False,
                 floor_coef: float | None = None, cmp: RowStats | None = None,
                 g_rows=None, stream: bool = False) -> ChunkEval | None:
        """SigmoidBCE.evaluate_rows through the kernel; with `cmp`, the user's gradient rows
        `g_rows` are compared on the way. None when a row holds NaN or +inf: the numpy kernel,
        which reports those, takes the rows.

        (R, C) outputs are written only when asked for: the gradient and per-element losses
        with `grad`, the floor with `floor_coef`. The streaming pass (`stream`, or `cmp`) gets
        its per-element losses on demand (a second call on its rows, which nobody writes to); a
        loss-only call (no `grad`, no `cmp`: the finite differences, which perturb their row
        buffer in place between calls) gets none, and `per_element()` of it raises."""
        z = _as_kernel_rows(z_rows)
        g = _as_kernel_rows(g_rows) if cmp is not None else None
        want_floor = floor_coef is not None  # the comparison's own floor_coef writes no floor
        floor_coef, params = _tolerance(cmp, floor_coef)
        y, w = self._labels_weights(rows)
        params.update(y_bin=y, y_is_f32=int(y.dtype == np.float32), w_bin=w,
                      floor_coef=floor_coef or 0.0, **(self.transform or {}))
        R, C = z.shape
        out = _outputs(R, C, self.per_row, grad, want_floor, cmp)
        if grad and cmp is None:
            out.update(out_items=np.empty((R, C)), out_item_w=np.empty((R, C)))
        if not self._run(z, g, rows, params, out, cmp):
            return None
        terms = (None if self.transform is None
                 else np.stack([out["row_mag"], out["row_g1"]], axis=1))
        return ChunkEval(loss=out["loss"], grad=out.get("out_ref"), floor=out.get("out_floor"),
                         lse=np.zeros(R), total_weight=out["total_w"], items=out.get("out_items"),
                         item_weight=out.get("out_item_w"), row_terms=terms,
                         deferred=(lambda: self._items(z, params)) if stream or cmp is not None
                         else None)

    def in_place(self, g_rows: np.ndarray | None, items: bool = False) -> bool:
        """float32/float64 C-contiguous logits, labels and gradient, without element weights
        (weight, sample weights, label smoothing: float64 (R, C) arrays a call) or `items`."""
        problem = self.problem
        if (items or problem.smoothing or problem.sem.sample_weight is not None
                or problem.weight is not None):
            return False
        return (_readable(problem.z) and _readable(problem.targets)
                and (g_rows is None or _readable(g_rows)))

    def _labels_weights(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The labels and element weights the kernel reads: the problem's own (float32 labels
        stay float32); with label smoothing or sample weights, the smoothed labels y' and the
        weights w s as the numpy kernel forms them (SigmoidBCE.coefficients: the same bits)."""
        problem = self.problem
        if problem.smoothing or problem.sem.sample_weight is not None:
            y, w, _ = problem.coefficients(rows)
            return (np.ascontiguousarray(y, dtype=np.float64),
                    None if w is None else np.ascontiguousarray(w, dtype=np.float64))
        y = _as_kernel_rows(take_rows(problem.targets, rows))
        w = None if problem.weight is None else np.ascontiguousarray(
            take_rows(problem.weight, rows), dtype=np.float64)
        return y, w

    def _items(self, z, params: dict) -> tuple[np.ndarray, np.ndarray]:
        """The per-element losses and |coef w| of rows `z` (no gradient, no comparison)."""
        R, C = z.shape
        out = _outputs(R, C, self.per_row, False, False, None)
        out.update(out_items=np.empty((R, C)), out_item_w=np.empty((R, C)))
        self._call(z, None, params, out)
        return out["out_items"], out["out_item_w"]

    def _call(self, z, g, params: dict, out: dict) -> int:
        args = self._args(z, g, {k: v for k, v in params.items() if v is not None}, out)
        args.pos_w = _ptr(self.pw)
        return int(self.fn.bce(ctypes.byref(args)))
