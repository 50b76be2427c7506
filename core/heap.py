"""Keep freed memory in the process heap, so a forward pass does not page-fault its activations in again.

glibc's malloc serves every block over 32 MB (the ceiling of its adaptive threshold) with a fresh
``mmap`` and returns it with ``munmap`` when freed. A ViT-B/16 forward of 16 images allocates 24 such
blocks (the MLP's [16, 197, 3072] float32 hidden and its GELU), so every batch page-faults about
1 GB back in: 200-300k faults per batch (``bench/heap_policy.py``). With ``mmap`` off and no
trimming, freed blocks go back to the heap and the next batch reuses them. PyTorch's CPU tuning
guide answers the same problem with a preloaded jemalloc or tcmalloc; on glibc two ``mallopt``
calls do it. The cost: the process keeps its peak heap until it exits, which for a loop over
batches of one size is the memory it uses anyway.
"""
from __future__ import annotations

import ctypes
import platform

__all__ = ["heap_reuse"]

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only above 2 GB free at the heap's top


def heap_reuse() -> bool:
    """Serve large blocks from the heap and keep freed memory for reuse, process-wide.

    Returns False, changing nothing, where the C library is not glibc (macOS, musl): there the
    allocator's own policy stays."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
