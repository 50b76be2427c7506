"""Pixel transforms: from decoded uint8 frames to normalised backbone input."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .views import View

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Per-channel (x - mean) / std on [N, 3, H, W]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def squash(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, size, size] in [0, 1], resized ignoring the aspect (bilinear)."""
    return F.interpolate(to_float(frames), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def crop_resize(x: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The (top, left, h, w) box of [N, 3, S, S] resized to size x size (antialiased bicubic)."""
    top, left, h, w = box
    return F.interpolate(x[:, :, top : top + h, left : left + w], size=(size, size), mode="bicubic",
                         align_corners=False, antialias=True)


def apply_view(pair: np.ndarray, view: View, size: int) -> torch.Tensor:
    """Frames a and b (uint8 [2, H, W, 3]) -> normalised [2, 3, size, size] as the release does.

    Squash to size x size (bilinear), one shared crop resized back with antialiased bicubic,
    one shared horizontal flip, ImageNet normalisation.
    """
    x = crop_resize(squash(pair, size), (view.crop_top, view.crop_left, view.crop_h, view.crop_w), size)
    if view.flip:
        x = x.flip(-1)
    return normalize(x)


def apply_clip(squashed: torch.Tensor, box: tuple[int, int, int, int], rotation_deg: int, size: int) -> torch.Tensor:
    """A clip's squashed frames [T, 3, size, size] -> normalised backbone input [T, 3, size, size]:
    the crop box resized back (antialiased bicubic), rotated counter-clockwise by ``rotation_deg``
    (a multiple of 90; ``torch.rot90`` over (H, W)), ImageNet normalisation."""
    if rotation_deg % 90:
        raise ValueError(f"rotations are multiples of 90 degrees, got {rotation_deg}")
    x = crop_resize(squashed, box, size)
    return normalize(torch.rot90(x, rotation_deg // 90 % 4, dims=(-2, -1)))
