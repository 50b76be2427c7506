"""Pooling of one frame's tokens into one vector: the class token, the patch mean, or both.

Shared by clip stores (stage one, ``Backbone.level_vectors``) and video-level evaluation
(``cosettle.eval.video.clip_features.pool_frames``, which adds CLIP's image embedding).
"""
from __future__ import annotations

import torch

POOLINGS = ("cls", "mean", "cls+mean")
NEEDS_CLASS_TOKEN = ("cls", "cls+mean")


def pooled_dim(dim: int, pooling: str) -> int:
    """D', the width of a pooled vector of D-wide tokens."""
    check_pooling(pooling)
    return 2 * dim if pooling == "cls+mean" else dim


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")


def pool_tokens(cls: torch.Tensor | None, patches: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per frame [..., D'] from the class token [..., D] and patch tokens [..., N, D].

    ``mean``: the mean of the patch tokens; ``cls``: the class token; ``cls+mean``: both
    concatenated, class token first. ``cls`` and ``cls+mean`` need a class token (not None).
    """
    if pooling == "mean":
        return patches.mean(dim=-2)
    if pooling in NEEDS_CLASS_TOKEN and cls is None:
        raise ValueError(f"pooling {pooling!r} needs a class token")
    if pooling == "cls":
        return cls
    if pooling == "cls+mean":
        return torch.cat([cls, patches.mean(dim=-2)], dim=-1)
    check_pooling(pooling)
    raise AssertionError("unreachable")
