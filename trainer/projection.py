"""The trained projection P ("fusion net" of the release), applied to every patch token.

Variants (COSETTLE_METHOD.md section 1): ``linear`` = LN(tanh(W x + b)); ``mlp2`` =
LN(W2 tanh(W1 x + b1) + b2); ``mlp3`` = LN(W3 tanh(W2 tanh(W1 x + b1) + b2) + b3).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from cosettle.core.errors import first_line

FUSIONS = {"linear": 1, "mlp2": 2, "mlp3": 3}


class ProjectionError(Exception):
    """A projection that cannot be built or loaded; the message names the file and the problem."""


def build_projection(dim: int, fusion: str = "linear", seed: int = 0) -> nn.Sequential:
    """A freshly initialised projection [..., dim] -> [..., dim] (Xavier-uniform, zero bias, LN 1/0).

    Initialisation draws from its own seeded generator, so it never depends on global RNG state.
    """
    if fusion not in FUSIONS:
        raise ProjectionError(f"unknown fusion '{fusion}'; choose one of {', '.join(FUSIONS)}")
    layers: list[nn.Module] = []
    for i in range(FUSIONS[fusion]):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(dim, dim))
    if fusion == "linear":
        layers.append(nn.Tanh())  # only the single-layer variant squashes its last linear output
    layers.append(nn.LayerNorm(dim))
    net = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=gen)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict; raises ProjectionError naming the file when unreadable."""
    try:
        return load_file(str(path))
    except Exception as e:
        raise ProjectionError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def load_weights(projection: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a safetensors state dict strictly (``state``: the file's, already read); raises
    ProjectionError naming the file otherwise."""
    state = read_weights(path) if state is None else state
    try:
        projection.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ProjectionError(f"{path}: does not fit the projection ({first_line(e)})") from None
