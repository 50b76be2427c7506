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


def apply_view(pair: np.ndarray, view: View, size: int) -> torch.Tensor:
    """Frames a and b (uint8 [2, H, W, 3]) -> normalised [2, 3, size, size] as the release does.

    Squash to size x size (bilinear), one shared crop resized back with antialiased bicubic,
    one shared horizontal flip, ImageNet normalisation.
    """
    x = F.interpolate(to_float(pair), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x[:, :, view.crop_top : view.crop_top + view.crop_h, view.crop_left : view.crop_left + view.crop_w]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    if view.flip:
        x = x.flip(-1)
    return normalize(x)
