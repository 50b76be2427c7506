"""``cosettle-train --compile``: the objective's forward (trainable module + loss) under torch.compile.

The loss function is compiled, not the module, so the module's ``state_dict`` (checkpoints, final
weights, resume) keeps its own keys. Whether torch.compile works here (Python version, a C++
compiler for CPU kernels, Triton for GPU ones) is checked once up front on a tiny function, so a
missing piece is a one-line error before training starts, never a silent eager fallback.
"""
from __future__ import annotations

import torch

from cosettle.core.errors import first_line

from .objective import Loss


class CompileError(Exception):
    """torch.compile cannot be used on this machine; the message says why in one line."""


def check_compile(device: torch.device) -> None:
    """Compile and run (forward and backward) a tiny function on ``device``; raise CompileError if that fails."""
    try:
        probe = torch.compile(lambda t: (torch.tanh(t) * 2).sum(), dynamic=False)
        t = torch.ones(4, device=device, requires_grad=True)
        probe(t).backward()
    except Exception as e:  # whatever the backend raises, the user needs the reason, not a traceback
        raise CompileError(f"--compile: torch.compile does not work on {device.type} here ({first_line(e)})") from None


def compile_loss(loss: Loss) -> Loss:
    """``loss`` compiled with torch.compile (graph breaks allowed: any objective may be compiled)."""
    return torch.compile(loss)
