"""The optional compiled kernel; everything else is in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds and ce-check uses its numpy
kernel (ce_cli/kernels/compiled.py explains the difference). The kernel is built for
every target this compiler can (avx512, avx2, sse2 or neon, scalar) and picks one at run time.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ce_cli.kernels._fused",
            sources=["ce_cli/kernels/_fused.c"],
            # IEEE rounding of every operation: no -ffast-math, no contraction into FMA
            extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi", "-pthread"],
            extra_link_args=["-pthread"],
            depends=["ce_cli/kernels/_fused_row.h"],
            optional=True,
        )
    ]
)
