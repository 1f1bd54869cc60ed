"""Input files memory-mapped read-only, on 2 MB pages where the operating system can.

A 4 KB page of a mapped file costs ~0.3 us to map on first touch and again to unmap at exit:
~75 ms a GB, as much as a quarter of a 4096x32000 check. A file whose page cache holds 2 MB
folios (Linux) is mapped 2 MB at a time instead (~4 ms a GB). Files just written hold such
folios; files read back from disk through a mapping get them only when the mapping is advised
MADV_HUGEPAGE, which this does (docs/performance.md).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np


def map_file(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int,
             fortran: bool = False) -> np.memmap:
    """The array of `dtype` and `shape` at byte `offset` of the file `path`, mapped read-only."""
    arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                    order="F" if fortran else "C")
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    mapping = getattr(arr, "_mmap", None)  # numpy's mmap object of the file
    if advice is not None and isinstance(mapping, mmap.mmap):
        try:
            mapping.madvise(advice)
        except OSError:  # a kernel built without transparent huge pages: 4 KB pages, as before
            pass
    return arr
