"""Keep glibc from returning chunk buffers to the kernel after every chunk.

The streaming pass allocates and frees ~1 MB float64 buffers per row chunk. In the main thread
glibc serves those with mmap or trims them off the heap top on free, so every chunk page-faults
its buffers back in: 275k minor faults and ~2x the run time on a 4096 x 32000 batch. Raising the
mmap and trim thresholds keeps the buffers in the heap (process memory stays at the chunk size).
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # glibc's ceiling for this setting on 64-bit
TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_chunk_buffers() -> bool:
    """Apply once per process; True when glibc accepted it (False elsewhere: musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc on Linux; find_library costs 10 ms of start-up
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
