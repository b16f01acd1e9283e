"""Keep freed host memory in the process on CPU runs (Linux/glibc).

A training step allocates and frees the same [tokens, d_sae] tensors every step. By
default glibc serves blocks of 128 KiB and up with fresh `mmap`s and gives freed heap
memory back to the kernel, so every step page-faults its large tensors in again: on
CPU that makes element-wise work (activations, masks, penalties) several times slower
than its arithmetic. Raising the mmap and trim thresholds keeps those pages mapped and
reused. GPU runs are unaffected (PyTorch's CUDA caching allocator already reuses memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**30


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to reuse freed blocks instead of returning them; True if it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
