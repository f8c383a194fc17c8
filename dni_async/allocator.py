"""Keep the memory a stage frees in the process, instead of glibc handing it back to the kernel every step.

glibc's malloc serves a large block (above its mmap threshold, 128 KiB to start)
with a fresh ``mmap`` and returns it with ``munmap`` when freed; the top of a heap
that grows past the trim threshold is given back as well. A training step frees
and allocates the same megabyte tensors again and again, so each step touches
fresh pages: thousands of page faults a step. A stage process has a receiving
thread, whose arena is trimmed the same way, and it is worse there: in
``tests/test_allocator.py``'s loop, from under 400 to over 5,000 faults a step on average
(glibc raises its thresholds at moments that depend on the threads' timing),
~9,000 with its starting thresholds held, and none with this setting but in the
few steps where the process's peak still grows; the stages computed up to a
third slower than alone (figures in docs/operations.md, Memory).

:func:`keep_freed_memory` fixes both thresholds (``mallopt``), so blocks up to
:data:`MMAP_THRESHOLD` come from the heap and up to :data:`TRIM_THRESHOLD` of
freed memory stays mapped for the next step. The cost is memory: the process
keeps its peak rather than shrinking between steps. ``--system-malloc`` leaves
glibc as it is; on a C library other than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory", "set_malloc"]

MMAP_THRESHOLD = 256 << 20
"""Blocks smaller than this come from the heap, not from their own ``mmap``."""
TRIM_THRESHOLD = 512 << 20
"""Freed memory at a heap's top that stays mapped."""
_FALLBACK_MMAP_THRESHOLD = 32 << 20
"""The most that every glibc accepts (half its 64 MiB per-thread heap)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def keep_freed_memory() -> str:
    """Fix glibc's mmap and trim thresholds in this process (see the module's doc); what was done, in words.

    Returns ``"unchanged (...)"`` where the C library is not glibc or refuses the settings.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"unchanged (C library {platform.libc_ver()[0] or platform.system()}, not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_threshold = MMAP_THRESHOLD
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        mmap_threshold = _FALLBACK_MMAP_THRESHOLD
        if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
            return "unchanged (glibc refused M_MMAP_THRESHOLD)"
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)  # any size is accepted
    return f"freed memory kept (glibc mmap threshold {mmap_threshold >> 20} MiB, trim threshold " \
           f"{TRIM_THRESHOLD >> 20} MiB)"


def set_malloc(system_malloc: bool) -> str:
    """What every stage process and every measurement of one does first: :func:`keep_freed_memory`, unless
    ``--system-malloc``; what was done, in words (the stage file's ``malloc``)."""
    return "glibc's defaults (--system-malloc)" if system_malloc else keep_freed_memory()
