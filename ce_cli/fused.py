"""The compiled fused pass (`_fused.c`): loss, gradient, error floor and comparison of a row
chunk in one sweep per row, loaded with ctypes.

`pip install .` compiles it when a C compiler is present; without one, the numpy kernel in
softmax_ce.py does the same work about 3x slower. It serves index targets (with weights,
ignore_index, label smoothing); probability targets, rows with -inf masks and the modes that need
the whole reference gradient use the numpy kernel. `CE_CHECK_FUSED=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import numpy as np

from ce_cli.compare import Comparison
from ce_cli.softmax_ce import ChunkEval, SoftmaxCE
from ce_cli.tolerance import Tolerance

_P = ctypes.c_void_p


class _Args(ctypes.Structure):
    """Mirror of `ce_args` in _fused.c."""

    _fields_ = [
        ("n_rows", ctypes.c_int64), ("n_cols", ctypes.c_int64),
        ("z", _P), ("z_is_f32", ctypes.c_int64), ("g", _P), ("g_is_f32", ctypes.c_int64),
        ("alpha", _P), ("beta", _P), ("ys", _P), ("active", _P), ("w", _P),
        ("w_sum", ctypes.c_double), ("scale", ctypes.c_double), ("rtol", ctypes.c_double),
        ("abs_tol", ctypes.c_double), ("floor_coef", ctypes.c_double),
        ("loss", _P), ("row_max", _P), ("log1p_s1", _P),
        ("ratio_max", _P), ("max_abs", _P), ("max_rel", _P), ("mismatches", _P), ("nonfinite", _P),
        ("out_ref", _P), ("out_tol", _P), ("out_ratio", _P), ("work", _P),
    ]


@functools.cache
def _kernel_entry():
    """ce_softmax_rows from the built library when this CPU runs it (AVX-512), else None."""
    here = Path(__file__).resolve().parent
    for suffix in EXTENSION_SUFFIXES:
        path = here / f"_fused{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
                if not lib.ce_supported():
                    return None
                fn = lib.ce_softmax_rows
            except (OSError, AttributeError):
                return None
            fn.argtypes = [ctypes.POINTER(_Args)]
            fn.restype = ctypes.c_int64
            return fn
    return None


def kernel():
    """The compiled entry point, or None (not built, no AVX-512, or CE_CHECK_FUSED=0)."""
    if os.environ.get("CE_CHECK_FUSED", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return _kernel_entry()


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _as_kernel_rows(a: np.ndarray) -> np.ndarray:
    """C-contiguous float32 or float64 rows (narrower floats widen exactly to float32)."""
    a = np.asarray(a)
    if a.dtype == np.float32 or a.dtype == np.float64:
        return np.ascontiguousarray(a)
    exact32 = a.dtype.kind == "f" and a.dtype.itemsize <= 4 or a.dtype.kind in "b" or (
        a.dtype.kind in "iu" and a.dtype.itemsize <= 2)
    return np.ascontiguousarray(a, dtype=np.float32 if exact32 else np.float64)


class FusedPass:
    """The streaming pass of `verify` for one softmax problem, through the compiled kernel."""

    def __init__(self, fn, problem: SoftmaxCE, grad_rows, tol: Tolerance | None, extra_atol: float):
        self.fn = fn
        self.problem = problem
        self.grad_rows = grad_rows
        self.tol = tol
        self.abs_tol = (tol.atol + extra_atol + tol.tiny) if tol is not None else 0.0
        w = problem.weight
        self.w = None if w is None else np.ascontiguousarray(w, dtype=np.float64)
        self.w_sum = float(w.sum()) if w is not None else float(problem.n_classes)
        C = problem.n_classes
        self.work = np.empty(C + 8 + 2 * (C // 128 + 1))  # see ce_args.work

    @classmethod
    def plan(cls, problem, grad_rows, grad_cmp: Comparison | None) -> FusedPass | None:
        """A fused pass when the kernel is built and serves this problem, else None."""
        fn = kernel()
        if (fn is None or not isinstance(problem, SoftmaxCE) or problem.probs is not None
                or problem.nan_gradient or problem.n_classes == 0):
            return None
        tol = grad_cmp.tol if grad_cmp is not None else None
        return cls(fn, problem, grad_rows, tol, grad_cmp.extra_atol if grad_cmp is not None else 0.0)

    def _call(self, z, g, alpha, beta, ys, active, outs: dict) -> int:
        R, C = z.shape
        tol = self.tol
        args = _Args(
            n_rows=R, n_cols=C, z=_ptr(z), z_is_f32=int(z.dtype == np.float32),
            g=_ptr(g), g_is_f32=int(g is not None and g.dtype == np.float32),
            alpha=_ptr(alpha), beta=_ptr(beta), ys=_ptr(ys), active=_ptr(active), w=_ptr(self.w),
            w_sum=self.w_sum, scale=self.problem.grad_scale,
            rtol=tol.rtol if tol else 0.0, abs_tol=self.abs_tol,
            floor_coef=tol.floor_coef if tol else 0.0, work=_ptr(self.work),
            **{name: _ptr(arr) for name, arr in outs.items()},
        )
        return int(self.fn(ctypes.byref(args)))

    def run(self, start: int, stop: int, cmp: Comparison | None) -> ChunkEval | None:
        """Rows [start, stop): their ChunkEval (no per-entry arrays), with `cmp` updated.
        None when a row holds a non-finite logit: the numpy kernel takes the chunk."""
        problem = self.problem
        rows = np.arange(start, stop)
        z = _as_kernel_rows(problem.z[start:stop])
        g = _as_kernel_rows(self.grad_rows[start:stop]) if cmp is not None else None
        alpha, beta, ys = problem.targets(rows)
        alpha = np.ascontiguousarray(alpha, dtype=np.float64)
        beta = np.ascontiguousarray(np.broadcast_to(beta, alpha.shape), dtype=np.float64)
        ys = np.ascontiguousarray(ys, dtype=np.int64)
        active = np.ascontiguousarray(problem.valid[rows], dtype=np.uint8)
        R = stop - start
        per_row = {name: np.empty(R) for name in ("loss", "row_max", "log1p_s1")}
        if cmp is not None:
            per_row.update({name: np.empty(R) for name in ("ratio_max", "max_abs", "max_rel")})
            per_row.update({name: np.empty(R, dtype=np.int64) for name in ("mismatches", "nonfinite")})
        if self._call(z, g, alpha, beta, ys, active, per_row):
            return None
        if cmp is not None:
            def open_row(r):
                C = z.shape[1]
                outs = {"out_ref": np.empty(C), "out_tol": np.empty(C), "out_ratio": np.empty(C)}
                scratch = {name: np.empty(1) for name in ("loss", "row_max", "log1p_s1", "ratio_max",
                                                           "max_abs", "max_rel")}
                scratch.update({name: np.empty(1, dtype=np.int64) for name in ("mismatches", "nonfinite")})
                sl = slice(r, r + 1)
                self._call(z[sl], g[sl], alpha[sl], beta[sl], ys[sl], active[sl], {**scratch, **outs})
                ref, got = outs["out_ref"], g[r]
                diff = np.abs(np.subtract(got, ref, dtype=np.float64))
                return outs["out_ratio"], ref, got, diff, outs["out_tol"]

            cmp.update_summary(start, R * z.shape[1], per_row["ratio_max"], per_row["mismatches"],
                               per_row["nonfinite"], per_row["max_abs"], per_row["max_rel"], open_row)
        m, l1 = per_row["row_max"], per_row["log1p_s1"]
        return ChunkEval(loss=per_row["loss"], grad=None, floor=None, lse=m + l1,
                         total_weight=alpha + beta * self.w_sum, row_max=m, log1p_s1=l1)
