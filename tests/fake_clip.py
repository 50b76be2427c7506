"""A fake OpenAI CLIP release WITH its text tower (``ViT-B-16.pt``), for zero-shot tests.

An OpenAI-layout module (clip/model.py names, tiny width, real 49408-token vocabulary and 77-token
context so open_clip's tokenizer fits) with random weights, scripted and saved. Its own exported
``encode_text`` / ``encode_image`` are OpenAI's forward pass: the reference the project's text
tower (open_clip rebuilt) and image side (timm backbone + ``proj``) must reproduce. The
transformer blocks are those of ``fake_releases``; the ``clip_vitb`` backbone reads its vision
tower with ``arch=BACKBONE_ARCH`` (224 px input).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from fake_releases import Transformer, randomise

WIDTH, EMBED, CTX, VOCAB = 64, 32, 77, 49408  # width 64: open_clip infers heads = width // 64
PATCH, GRID = 16, 14
BACKBONE_ARCH = dict(embed_dim=WIDTH, depth=1, num_heads=1)  # the vision tower, for load_backbone("clip_vitb")


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(WIDTH))
        self.positional_embedding = nn.Parameter(torch.zeros(GRID * GRID + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, 1, 1)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.zeros(WIDTH, EMBED))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """OpenAI's encode_image: ln_post on the class token, then proj."""
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class ImageOnlyCLIP(nn.Module):
    """An OpenAI archive with its text tower stripped."""

    def __init__(self):
        super().__init__()
        self.visual = VisionTransformer()
        self.logit_scale = nn.Parameter(torch.zeros([]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


class CLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = VisionTransformer()
        self.transformer = Transformer(WIDTH, 2, 1)
        self.token_embedding = nn.Embedding(VOCAB, WIDTH)
        self.positional_embedding = nn.Parameter(torch.zeros(CTX, WIDTH))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.zeros(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.zeros([]))
        for name, value in (("input_resolution", PATCH * GRID), ("context_length", CTX), ("vocab_size", VOCAB)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    @torch.jit.export
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    @torch.jit.export
    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """OpenAI's encode_text: causal transformer, ln_final, EOT (argmax id) feature @ projection."""
        x = self.token_embedding(text) + self.positional_embedding
        # causal mask built here: OpenAI keeps it as a plain attribute, outside the state dict
        mask = torch.full((text.shape[1], text.shape[1]), float("-inf")).triu(1)
        x = self.transformer(x.permute(1, 0, 2), mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def fake_clip(seed: int) -> CLIP:
    """Random OpenAI-layout CLIP. LayerNorm gains near 1 and soft attention (small q, k) make the EOT
    token average over the caption's words; otherwise it attends to one token and all texts ~ coincide."""
    model = randomise(CLIP(), seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.add_(1.0)
            elif name.endswith("in_proj_weight"):
                p[: 2 * p.shape[1]].mul_(0.3)  # the q and k rows
    return model


FP16_SUFFIXES = ("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias",
                 "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


def to_fp16_like_openai(model: nn.Module) -> nn.Module:
    """OpenAI's convert_weights: conv, linear, attention and the two projections in fp16."""
    for name, p in model.named_parameters():
        if name.endswith(FP16_SUFFIXES) or name in ("text_projection", "visual.proj"):
            p.data = p.data.half()
    return model


def save_script(model: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def write_release(path: Path, seed: int = 3) -> Path:
    """A fake ``ViT-B-16.pt`` with a text tower at ``path``."""
    return save_script(fake_clip(seed), path)


def write_mismatched_release(path: Path, seed: int = 3, proj_width: int = EMBED + 16) -> Path:
    """A doctored release whose image projection ``visual.proj`` maps into ``proj_width`` dimensions
    while ``text_projection`` maps into ``EMBED``: towers that cannot share a joint space."""
    model = fake_clip(seed)
    g = torch.Generator().manual_seed(seed)
    model.visual.proj = nn.Parameter(0.02 * torch.randn(WIDTH, proj_width, generator=g))
    return save_script(model, path)
