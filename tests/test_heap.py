"""heap_reuse: large freed blocks come back from the heap instead of being page-faulted in again."""
from __future__ import annotations

import platform
import statistics
import subprocess
import sys

import pytest

from cosettle.core import heap

# Seven rounds of two timm ViT-B blocks on 16 images: each block's MLP hidden and its GELU are
# [16, 197, 3072] float32 (38.7 MB, over glibc's 32 MB mmap ceiling). Prints each round's page faults.
ROUNDS, BIG_BLOCKS = 7, 2 * 2
CHILD = f"""
import resource, sys, torch
from timm.models.vision_transformer import Block
from cosettle.core.heap import heap_reuse
if sys.argv[1] == "reuse":
    assert heap_reuse()
block, x = Block(768, 12).eval(), torch.ones(16, 197, 768)
with torch.no_grad():
    block(block(x))  # warm-up: the heap grows to the working set
    for _ in range({ROUNDS}):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block(block(x))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def median_faults(policy: str) -> int:
    """The median page faults of one round: a round that still grows the heap (one of the
    allocator's arenas reaching a new peak, now and then) does not move it."""
    run = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True, check=True)
    return statistics.median(int(n) for n in run.stdout.split())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_removes_the_page_faults_of_repeated_large_blocks():
    pages = BIG_BLOCKS * (16 * 197 * 3072 * 4) // 4096  # one round's big blocks
    assert median_faults("glibc") > 0.5 * pages  # most big blocks are mapped, faulted in and unmapped again
    assert median_faults("reuse") < 0.02 * pages  # the warm-up's heap serves the later rounds


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called off glibc"))
    assert heap.heap_reuse() is False
