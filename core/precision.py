"""The autocast of a backbone's forward pass: ``--amp auto|none|bf16|fp16``, resolved per device.

``auto`` is bf16 on CUDA and none (float32) elsewhere, what every command did before the option
existed. ``bf16`` on a CPU needs native bf16 instructions; a choice the device cannot run is
refused (ValueError, one line), never silently replaced by float32.
"""
from __future__ import annotations

import platform

import torch

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16 or AMX; elsewhere oneDNN's own
    check). Native is not always faster than float32: ``bench/extract_overhead.py`` measures it."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_amp(amp: str, device: torch.device) -> str:
    """The effective autocast ("none", "bf16" or "fp16") of the choice ``amp`` on ``device``."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown --amp {amp!r}; choose one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp == "none" or device.type == "cuda":
        return amp
    if device.type == "cpu" and amp == "bf16":
        if not cpu_bf16_supported():
            raise ValueError("--amp bf16: this CPU has no native bf16 instructions (AVX512-BF16 or AMX), "
                             "bf16 would be emulated; use --amp none")
        return amp
    raise ValueError(f"--amp {amp}: not available on {device.type} (CUDA: bf16 or fp16; CPU: bf16); use --amp none")


def recorded_amp(amp: str, device: torch.device) -> str | None:
    """What settings record of an effective choice: None (nothing) when it is what ``auto`` gives on
    ``device``, as every store was made before the option existed, so their settings stay as they were."""
    return None if amp == resolve_amp("auto", device) else amp


def autocast(amp: str, device: torch.device) -> torch.autocast:
    """The autocast context of an effective choice (from ``resolve_amp``); disabled for "none"."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "none")
