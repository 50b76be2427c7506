"""The small trainable temporal head of the clip objectives (VTHCL, CSTP), and what they share.

A clip store holds, per clip, one vector per frame and per chosen ViT block ("level"):
tokens [B, T, L, D'] of a frozen image encoder. :class:`TemporalHead` turns them into one
vector per level: per level an input projection D' -> width, learned temporal position
embeddings [T, width], a pre-norm transformer encoder over the T frames, and the mean over
time -> [B, L, width]. Levels never mix inside the head; the objectives give each level its
own projection head (VTHCL's hierarchical contrast) or read the levels side by side (CSTP).

``embed`` of every clip model is the head's output flattened to [B, L * width]: the clip
representation that video-level evaluation (retrieval, kNN, linear probe) reads.

Size. Per level: D' * width + width (input projection) + T * width (positions), per layer
4 w^2 + 4 w (attention) + 2 r w^2 + (r + 1) w (feed-forward, ratio r = 2) + 4 w (two norms),
plus a final norm (2 w). For ViT-B features (D' = 768, T = 16) at width 256, depth 2 that is
0.20 M + 2 x 0.53 M = 1.26 M per level, 3.77 M for three levels; at width 128 it is 0.37 M per
level, 1.10 M for three (``parameter_count``; the tests pin the formula). A few hundred K per
level is the intended scale: ``width`` and ``depth`` are options of both objectives, and width
128 is the choice for small datasets (UCF101/HMDB51-sized pre-training). The default, width 256
and depth 2, leaves room above VTHCL's 128-d projections and CSTP's pair heads; at any of these
sizes the head is tiny next to the frozen 86 M-parameter ViT-B that made the features, cheap for
5 epochs over cached Kinetics clips, and still a real temporal model (attention across frames,
order through the position embeddings) rather than a mean-pool, which pace and tempo need.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .objective import Option
from .projection import ProjectionError

MLP_RATIO = 2  # feed-forward width / model width inside the temporal transformer
# What each level's input projection reads (``head_input``): "tokens" the frame vectors x_t as stored;
# "centred" x_t - mean_t(x) (the clip's static part, i.e. its appearance, removed); "diff" the
# consecutive differences x_t - x_{t-1} (0 at t = 0); "tokens+diff" x_t and x_t - x_{t-1} side by side.
HEAD_INPUTS = ("tokens", "centred", "diff", "tokens+diff")

HEAD_INPUT_OPTION = Option(
    "tokens", "What the temporal head reads per frame: the stored vectors ('tokens'), the vectors minus their "
    "clip mean ('centred': the static appearance removed, so the representation can only carry change), "
    "consecutive differences ('diff'), or vectors and differences side by side ('tokens+diff').",
    choices=HEAD_INPUTS)


def head_input(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Frame vectors [B, T, D'] -> what a level projects, [B, T, D'] ([B, T, 2 D'] for "tokens+diff")."""
    if mode == "tokens":
        return x
    if mode == "centred":
        return x - x.mean(dim=1, keepdim=True)
    diff = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
    if mode == "diff":
        return diff
    if mode == "tokens+diff":
        return torch.cat([x, diff], dim=-1)
    raise ValueError(f"unknown head input {mode!r}; expected one of {', '.join(HEAD_INPUTS)}")


def seeded_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Xavier-uniform weight matrices, zero biases, LayerNorm 1/0, drawn in parameter order from
    ``generator`` (never the global RNG). Position embeddings (``pos``) get N(0, 0.02^2)."""
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] == "pos":
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=generator)
            elif p.ndim >= 2:
                nn.init.xavier_uniform_(p, generator=generator)
            elif id(p) in norm_weights:
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
    return module


def mlp(dims: Sequence[int], norm: bool = False) -> nn.Sequential:
    """Linear layers of the given widths with GELU between them (and a LayerNorm before each GELU
    with ``norm``); no activation after the last one. Initialised by :func:`seeded_init_`."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(dims)):
        if i:
            layers += [nn.LayerNorm(a), nn.GELU()] if norm else [nn.GELU()]
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class _Level(nn.Module):
    """One level of the head: [B, T, D'] -> [B, width]."""

    def __init__(self, dim: int, frames: int, width: int, depth: int, heads: int, inputs: str):
        super().__init__()
        self.inputs = inputs
        self.proj = nn.Linear(2 * dim if inputs == "tokens+diff" else dim, width)
        self.pos = nn.Parameter(torch.zeros(frames, width))
        layer = nn.TransformerEncoderLayer(width, heads, MLP_RATIO * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.proj(head_input(x, self.inputs)) + self.pos).mean(dim=1)


class TemporalHead(nn.Module):
    """Clip tokens [B, T, L, D'] -> per-level clip vectors [B, L, width] (see the module docstring).

    ``levels`` is the store's list of block indices (or just their number). Initialised from its
    own generator seeded with ``seed``, so two heads of one seed are equal whatever ran before.
    """

    def __init__(self, dim: int, frames: int, levels: int | Sequence[int], width: int = 256, depth: int = 2,
                 heads: int = 4, seed: int = 0, inputs: str = "tokens"):
        super().__init__()
        num_levels = levels if isinstance(levels, int) else len(levels)
        if num_levels < 1 or frames < 1 or dim < 1:
            raise ProjectionError(f"temporal head: needs dim, frames and levels >= 1, got {dim}, {frames}, {num_levels}")
        if width % heads:
            raise ProjectionError(f"temporal head: width {width} is not a multiple of its {heads} "
                                  "attention heads")
        if inputs not in HEAD_INPUTS:
            raise ProjectionError(f"temporal head: unknown input {inputs!r}; expected one of {', '.join(HEAD_INPUTS)}")
        self.dim, self.frames, self.num_levels, self.width = dim, frames, num_levels, width
        self.levels = nn.ModuleList(_Level(dim, frames, width, depth, heads, inputs) for _ in range(num_levels))
        seeded_init_(self, torch.Generator().manual_seed(seed))

    @property
    def out_dim(self) -> int:
        """Size of ``embed``'s vectors: levels x width."""
        return self.num_levels * self.width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        expected = (self.frames, self.num_levels, self.dim)
        if tokens.ndim != 4 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"temporal head: expects tokens [B, {', '.join(map(str, expected))}], "
                             f"got {list(tokens.shape)}")
        tokens = tokens.float()  # stores hold fp16; the head runs in fp32 (autocast lowers it where it applies)
        return torch.stack([level(tokens[:, :, i]) for i, level in enumerate(self.levels)], dim=1)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, L, D'] -> [B, L * width]: the per-level outputs, concatenated."""
        return self.forward(tokens).flatten(1)


def parameter_count(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# -- what the clip objectives share ------------------------------------------------------------

def clip_settings(settings: dict, objective: str, plan: str) -> tuple[int, int, list[int]]:
    """(D', T, levels) of a clip store made for ``plan``; refuses other stores with a one-line reason."""
    missing = [k for k in ("dim", "frames", "levels", "plan") if k not in settings]
    if missing:
        raise ProjectionError(f"objective '{objective}' trains on clip stores; this store's settings lack "
                              f"{', '.join(missing)} (a views store? extract clips with the '{plan}' plan)")
    if settings["plan"] != plan:
        raise ProjectionError(f"objective '{objective}' needs a clip store of the '{plan}' plan, "
                              f"this one was made with '{settings['plan']}'")
    levels = list(settings["levels"])
    if not levels:
        raise ProjectionError(f"objective '{objective}': the clip store names no levels")
    return int(settings["dim"]), int(settings["frames"]), [int(b) for b in levels]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A momentum (EMA) copy of ``module``: same values, own storage, requires_grad False."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """EMA step of ``target`` towards ``online``: theta_t <- m theta_t + (1 - m) theta_o."""
    for po, pt in zip(online.parameters(), target.parameters(), strict=True):
        pt.mul_(momentum).add_(po.detach().to(pt.dtype), alpha=1.0 - momentum)


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself, under a DistributedDataParallel wrapper or not."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def split_pair(tokens: torch.Tensor) -> torch.Tensor:
    """Batch tokens [B, 2, T, L, D'] -> [2B, T, L, D'] (all first clips, then all second clips)."""
    if tokens.ndim != 5 or tokens.shape[1] != 2:
        raise ValueError(f"clip objectives expect tokens [B, 2, T, L, D'], got {list(tokens.shape)}")
    return tokens.transpose(0, 1).flatten(0, 1)
