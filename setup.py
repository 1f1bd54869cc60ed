"""The optional compiled kernel; everything else is in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds and ce-check uses its numpy
kernel (ce_cli/kernels/compiled.py explains the difference). The kernel is built for
every target this compiler can (avx512, avx2, sse2 or neon, scalar) and picks one at run time.
Each target is a translation unit of its own (ce_cli/kernels/_fused_<target>.c, the row kernel
in _fused_row.h); ParallelBuildExt compiles them at the same time, as many as there are cores,
then links them with the dispatch (_fused.c) into one shared object. Without debug information
(`-g0`: the same machine code, a quarter less compile time) unless CFLAGS asks for it
(`CFLAGS=-g pip install -e .`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "ce_cli/kernels/"
# IEEE rounding of every operation: no -ffast-math, no contraction into FMA
COMPILE_ARGS = ["-O3", "-ffp-contract=off", "-Wno-psabi", "-pthread"]
if not any(flag.startswith("-g") for flag in os.environ.get("CFLAGS", "").split()):
    COMPILE_ARGS.append("-g0")  # after Python's own CFLAGS, which hold -g


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ParallelBuildExt(build_ext):
    """build_ext compiling an extension's sources concurrently (one compiler process per source,
    `build_ext --parallel N` or one per core), in the order given: the longest first."""

    def build_extension(self, ext: Extension) -> None:
        compile_serial = self.compiler.compile
        workers = self.parallel  # build_ext --parallel N; True or unset: one per core
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            workers = _cores()

        def compile_parallel(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources)))) as pool:
                parts = [pool.submit(compile_serial, [src], *args, **kwargs) for src in sources]
                return [obj for part in parts for obj in part.result()]

        self.compiler.compile = compile_parallel
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_serial


setup(
    cmdclass={"build_ext": ParallelBuildExt},
    ext_modules=[
        Extension(
            "ce_cli.kernels._fused",
            # the longest to compile first (they start in this order)
            sources=[
                KERNELS + "_fused_avx512.c",
                KERNELS + "_fused_avx2.c",
                KERNELS + "_fused_base.c",
                KERNELS + "_fused_scalar.c",
                KERNELS + "_fused.c",
            ],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=["-pthread"],
            depends=[KERNELS + "_fused.h", KERNELS + "_fused_row.h"],
            optional=True,
        )
    ],
)
