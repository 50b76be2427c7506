"""heap_reuse: large freed blocks come back from the heap instead of being page-faulted in again."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from cosettle.core import heap

# Four rounds of two timm ViT-B blocks on 16 images: each block's MLP hidden and its GELU are
# [16, 197, 3072] float32 (38.7 MB, over glibc's 32 MB mmap ceiling). Prints their page faults.
ROUNDS, BIG_BLOCKS = 4, 2 * 2
CHILD = f"""
import resource, sys, torch
from timm.models.vision_transformer import Block
from cosettle.core.heap import heap_reuse
if sys.argv[1] == "reuse":
    assert heap_reuse()
block, x = Block(768, 12).eval(), torch.ones(16, 197, 768)
with torch.no_grad():
    block(block(x))  # warm-up: the heap grows to the working set
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({ROUNDS}):
        block(block(x))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(policy: str) -> int:
    run = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True, check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_removes_the_page_faults_of_repeated_large_blocks():
    pages = ROUNDS * BIG_BLOCKS * (16 * 197 * 3072 * 4) // 4096
    assert faults("glibc") > 0.5 * pages  # most big blocks are mapped, faulted in and unmapped again
    assert faults("reuse") < 0.15 * pages  # the warm-up's heap serves the later rounds (a block or two may still grow it)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called off glibc"))
    assert heap.heap_reuse() is False
