"""Every size, time and cost limit ce-check applies to what it reads, captures and computes.

One place for the numbers: the README's *Inputs* and *Exit codes* sections cite them, and the
code reads them from here (tests patch them here to exercise the limit without huge inputs).
A limit crossed is an input error (exit 2) naming the limit, never an out-of-memory crash.
"""

from __future__ import annotations

import math

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# .npy header (the dict after the magic and the length field); numpy itself refuses more than
# 10,000 bytes with allow_pickle=False, but only after reading all of it
MAX_NPY_HEADER_BYTES = 64 * KiB
# one array read out of an .npz member (decompressed; never more than its header declares)
MAX_DECOMPRESSED_BYTES = 4 * GiB
# bytes read from standard input or a named pipe (they cannot be memory-mapped)
MAX_STREAM_BYTES = 2 * GiB
# seconds a named pipe may stay silent (no writer, or a writer that writes nothing) before the
# read is given up
PIPE_IDLE_SECONDS = 60.0
# a batch manifest, and one line of it
MAX_MANIFEST_BYTES = 64 * MiB
MAX_MANIFEST_LINE_BYTES = 1 * MiB
# what `ce-check stress` keeps of an implementation's stdout and of its stderr (the tail)
MAX_CAPTURE_BYTES = 64 * KiB
# characters of a file's content, a name or a key a message may quote
MAX_QUOTED_CHARS = 40
# --fd full evaluates the loss 2*C times per row, each over C classes: N*2*C*C element
# evaluations (sigmoid BCE: 2 per element); about 6e7 per second on one core of a laptop
# (1x30,000 took 31 s)
FD_FULL_BUDGET = 2e9
FD_FULL_RATE = 6e7
# classes of the one sample `ce-check explain` derives: about 1.9 KB of memory per class, 2.8 KB
# with --steps (0.5 / 0.74 GB at 2^18 = 262,144, the largest vocabularies; 10^6 took 2.7 GB)
MAX_EXPLAIN_CLASSES = 1 << 18


def fd_full_cost(n_rows: int, n_classes: int, elementwise: bool = False) -> float:
    """Element evaluations `--fd full` needs: 2*C loss evaluations per row, C classes each; a
    loss that is a sum of per-element terms (sigmoid BCE), 2 per element."""
    return 2.0 * n_rows * float(n_classes) ** (1 if elementwise else 2)


def fd_full_refusal(shape: tuple[int, ...], class_axis: int = -1,
                    elementwise: bool = False) -> str | None:
    """Why `--fd full` is refused on logits of `shape` (None: within FD_FULL_BUDGET)."""
    if not -len(shape) <= class_axis < len(shape):
        return None  # no class axis there: the check itself says what is wrong
    n_classes = shape[class_axis]
    n_rows = math.prod(shape) // n_classes if n_classes else 0
    cost = fd_full_cost(n_rows, n_classes, elementwise)
    if cost <= FD_FULL_BUDGET:
        return None
    rule, instead = (("2*N*C", "`fd=sample` (O(samples))") if elementwise else
                     ("2*N*C^2", "`fd=directional` or `fd=sample` (each O(N*C))"))
    return (f"`fd=full` on logits of shape {tuple(shape)} needs {cost:.1e} element evaluations "
            f"({rule}; about {cost / FD_FULL_RATE:.0f} s), over the limit {FD_FULL_BUDGET:.0e}; "
            f"use {instead}")


def explain_classes_refusal(n_classes: int, source: str = "logits") -> str | None:
    """Why `ce-check explain` refuses a sample of `n_classes` (None: within MAX_EXPLAIN_CLASSES)."""
    if n_classes <= MAX_EXPLAIN_CLASSES:
        return None
    return (f"{source}: {n_classes} classes; explain derives one sample of at most "
            f"{MAX_EXPLAIN_CLASSES} classes (MAX_EXPLAIN_CLASSES, about 2 KB of memory per class); "
            "`ce-check grad` checks rows of any width")


def quoted(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` as a short, single-line, printable repr: at most `limit` characters of it."""
    cut = text if len(text) <= limit else text[:limit] + "…"
    return repr(cut.encode("utf-8", "replace").decode("utf-8", "replace"))


# what str.splitlines() breaks a line at, besides \n and \r, and the other C0/C1 controls
_BREAKS = {c: f"\\x{c:02x}" for c in [*range(0, 32), 127, *range(128, 160)]}
_BREAKS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """`text` with every control character and line separator escaped: one printable line."""
    return text.translate(_BREAKS)
