"""Backbone loading: every official release layout, strict refusal of wrong files, positional embeddings.

Each release file is written here in the original repository's key layout and container (tiny width,
random values). The expected patch tokens come from a reference built in this file: a timm model
created directly and randomised, whose weights are written out by this file's own inverse mapping
(for CLIP: an OpenAI-layout module with its own forward pass, saved as TorchScript). Positional
embeddings that the release stores at another resolution (BLIP 384 px, DINOv2 ViT-B/14 518 px) are
resized here as the authors' code does and put into the reference.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from cosettle.pipeline.backbones import BACKBONES, load_backbone
from cosettle.pipeline.checkpoints import CheckpointError

TINY = dict(embed_dim=64, depth=2, num_heads=2)
D = TINY["embed_dim"]
TOL = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- helpers


def noise(g: torch.Generator, *shape: int) -> torch.Tensor:
    return 0.2 * torch.randn(shape, generator=g)


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every floating tensor of the module random: default inits (LayerNorm 1/0, LayerScale 1e-5)
    would hide mistakes in those weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(noise(g, *t.shape))
    return module.eval()


def timm_reference(timm_name: str, seed: int, img_size: int = 224, arch: dict = TINY, **opts) -> nn.Module:
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=img_size, **arch, **opts)
    return randomise(model, seed)


def images(size: tuple[int, int] = (224, 224), batch: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randn((batch, 3, *size), generator=torch.Generator().manual_seed(seed))


def block_keys(prefix: str, depth: int, layerscale: bool = False) -> list[str]:
    """Transformer-block parameter names shared by the DINO, iBOT, MAE, MoCo v3, BLIP, I-JEPA and
    DINOv2 code bases (and timm)."""
    parts = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    keys = [f"{prefix}{i}.{p}.{w}" for i in range(depth) for p in parts for w in ("weight", "bias")]
    if layerscale:
        keys += [f"{prefix}{i}.{ls}.gamma" for i in range(depth) for ls in ("ls1", "ls2")]
    return keys


def take_vit(sd: dict, depth: int, cls_token: bool = True, layerscale: bool = False) -> dict:
    """Pop the encoder tensors of ``sd`` under their names in the original repositories."""
    names = (["cls_token"] if cls_token else []) + ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    names += block_keys("blocks.", depth, layerscale) + ["norm.weight", "norm.bias"]
    return {k: sd.pop(k) for k in names}


def official_encoder(ref: nn.Module, depth: int = TINY["depth"], **kw) -> dict:
    """The reference timm model's weights in the original layout; fails if timm holds any other tensor."""
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    out = take_vit(sd, depth, **kw)
    assert not sd, f"reference has tensors outside the official layout: {sorted(sd)}"
    return out


def linear(g: torch.Generator, prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict:
    out = {f"{prefix}.weight": noise(g, n_out, n_in)}
    if bias:
        out[f"{prefix}.bias"] = noise(g, n_out)
    return out


def batchnorm(g: torch.Generator, prefix: str, n: int, affine: bool = True) -> dict:
    out = {f"{prefix}.running_mean": noise(g, n), f"{prefix}.running_var": noise(g, n).abs(),
           f"{prefix}.num_batches_tracked": torch.tensor(1000)}
    if affine:
        out.update({f"{prefix}.weight": noise(g, n), f"{prefix}.bias": noise(g, n)})
    return out


def dino_style_head(g: torch.Generator, prefix: str, n_in: int, last_layers: tuple[str, ...] = ("last_layer",)) -> dict:
    """DINO / iBOT / DINOv2 projection head: mlp 0-2-4 (GELU between) and weight-normed last layers."""
    out = {**linear(g, f"{prefix}.mlp.0", n_in, 32), **linear(g, f"{prefix}.mlp.2", 32, 32),
           **linear(g, f"{prefix}.mlp.4", 32, 16)}
    for name in last_layers:
        out.update({f"{prefix}.{name}.weight_g": noise(g, 48, 1), f"{prefix}.{name}.weight_v": noise(g, 48, 16)})
    return out


def optimizer_state() -> dict:
    """A real optimizer state dict, as training checkpoints carry one."""
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.sum().backward()
    opt.step()
    return opt.state_dict()


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def cat_pos(prefix_pos: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """[1, P, D] prefix positions + [1, D, h, w] patch grid -> [1, P + h*w, D]."""
    return torch.cat([prefix_pos, grid.flatten(2).transpose(1, 2)], dim=1)


def as_grid(patch_pos: torch.Tensor) -> torch.Tensor:
    """[1, n*n, D] -> [1, D, n, n]."""
    n = int(round(patch_pos.shape[1] ** 0.5))
    return patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)


def set_pos(ref: nn.Module, pos: torch.Tensor) -> None:
    ref.pos_embed = nn.Parameter(pos, requires_grad=False)


# ---------------------------------------------------------------- release writers


@dataclass
class Release:
    """An official-format file and the patch tokens its backbone must produce."""

    path: Path
    reference: Callable[[torch.Tensor], torch.Tensor]
    ref: nn.Module | None = None
    arch: dict = field(default_factory=lambda: dict(TINY))


def tokens_of(ref: nn.Module, prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: ref.forward_features(x)[:, prefix:]


def write_dino(tmp: Path) -> Release:
    ref = timm_reference("vit_base_patch16_224", seed=1)
    path = tmp / "dino_vitbase16_pretrain.pth"
    torch.save(official_encoder(ref), path)
    return Release(path, tokens_of(ref, 1), ref)


def write_ibot(tmp: Path) -> Release:
    ref = timm_reference("vit_base_patch16_224", seed=2)
    g = torch.Generator().manual_seed(102)
    teacher = {**official_encoder(ref), **dino_style_head(g, "head", D, ("last_layer", "last_layer2"))}
    path = tmp / "checkpoint_teacher.pth"
    torch.save({"state_dict": teacher}, path)
    return Release(path, tokens_of(ref, 1), ref)


def write_mae(tmp: Path) -> Release:
    ref = timm_reference("vit_base_patch16_224", seed=3)
    g = torch.Generator().manual_seed(103)
    dd = 32  # decoder width
    decoder = {**linear(g, "decoder_embed", D, dd), "mask_token": noise(g, 1, 1, dd),
               "decoder_pos_embed": noise(g, 1, 197, dd), "decoder_norm.weight": noise(g, dd),
               "decoder_norm.bias": noise(g, dd), **linear(g, "decoder_pred", dd, 16 * 16 * 3)}
    decoder.update(prefixed("decoder_blocks.0.", randomise(Block(dd, 2), seed=1003).state_dict()))
    path = tmp / "mae_pretrain_vit_base.pth"
    torch.save({"model": {**official_encoder(ref), **decoder}}, path)
    return Release(path, tokens_of(ref, 1), ref)


def moco_mlp(g: torch.Generator, prefix: str, dims: list[int], last_bn: bool) -> dict:
    """MoCo v3 _build_mlp: Linear(no bias) [BN, ReLU] ... Linear [BN without affine]."""
    out, idx = {}, 0
    for layer, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        out.update(linear(g, f"{prefix}.{idx}", n_in, n_out, bias=False))
        if layer < len(dims) - 2:
            out.update(batchnorm(g, f"{prefix}.{idx + 1}", n_out))
            idx += 3
        elif last_bn:
            out.update(batchnorm(g, f"{prefix}.{idx + 1}", n_out, affine=False))
    return out


def write_mocov3(tmp: Path) -> Release:
    momentum = timm_reference("vit_base_patch16_224", seed=4)
    base = timm_reference("vit_base_patch16_224", seed=44)  # differs, so taking it instead would show
    g = torch.Generator().manual_seed(104)
    sd = {}
    for name, enc in (("base_encoder", base), ("momentum_encoder", momentum)):
        sd.update(prefixed(f"module.{name}.", {**official_encoder(enc), **moco_mlp(g, "head", [D, 32, 32, 16], True)}))
    sd.update(prefixed("module.", moco_mlp(g, "predictor", [16, 32, 16], False)))
    path = tmp / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": optimizer_state(),
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 0}}, path)
    return Release(path, tokens_of(momentum, 1), momentum)


def write_ijepa(tmp: Path) -> Release:
    opts = dict(class_token=False, global_pool="avg", fc_norm=False)
    encoder = timm_reference("vit_base_patch16_224", seed=5, **opts)
    target = timm_reference("vit_base_patch16_224", seed=55, **opts)
    g = torch.Generator().manual_seed(105)
    dp = 32  # predictor width
    predictor = {**linear(g, "predictor_embed", D, dp), "mask_token": noise(g, 1, 1, dp),
                 "predictor_pos_embed": noise(g, 1, 196, dp), **linear(g, "predictor_proj", dp, D),
                 "predictor_norm.weight": noise(g, dp), "predictor_norm.bias": noise(g, dp)}
    path = tmp / "IN1K-vit.b.16-ep300.pth.tar"
    torch.save({"encoder": prefixed("module.", official_encoder(encoder, cls_token=False)),
                "predictor": prefixed("module.", predictor),
                "target_encoder": prefixed("module.", official_encoder(target, cls_token=False)),
                "opt": optimizer_state(), "scaler": None, "epoch": 300, "loss": 0.0123,
                "batch_size": 128, "world_size": 16, "lr": 0.001}, path)
    return Release(path, tokens_of(encoder, 0), encoder)


def write_blip(tmp: Path) -> Release:
    ref = timm_reference("vit_base_patch16_224", seed=6)
    momentum = timm_reference("vit_base_patch16_224", seed=66)
    g = torch.Generator().manual_seed(106)
    visual = official_encoder(ref)
    visual["pos_embed"] = noise(g, 1, 1 + 24 * 24, D)  # the retrieval checkpoint is 384 px
    momentum_visual = official_encoder(momentum)
    momentum_visual["pos_embed"] = noise(g, 1, 1 + 24 * 24, D)
    # BLIP's own interpolate_pos_embed: bicubic to the new grid, align_corners=False, no antialias
    grid14 = F.interpolate(as_grid(visual["pos_embed"][:, 1:]), size=(14, 14), mode="bicubic",
                           align_corners=False, antialias=False)
    set_pos(ref, cat_pos(visual["pos_embed"][:, :1], grid14))
    text = {}
    for enc in ("text_encoder", "text_encoder_m"):
        text.update({f"{enc}.embeddings.word_embeddings.weight": noise(g, 30, 32),
                     f"{enc}.embeddings.position_embeddings.weight": noise(g, 8, 32),
                     f"{enc}.embeddings.LayerNorm.weight": noise(g, 32),
                     f"{enc}.embeddings.LayerNorm.bias": noise(g, 32),
                     **linear(g, f"{enc}.encoder.layer.0.attention.self.query", 32, 32),
                     **linear(g, f"{enc}.encoder.layer.0.crossattention.self.key", D, 32)})
    model = {**prefixed("visual_encoder.", visual), **prefixed("visual_encoder_m.", momentum_visual), **text,
             **linear(g, "vision_proj", D, 16), **linear(g, "vision_proj_m", D, 16),
             **linear(g, "text_proj", 32, 16), **linear(g, "text_proj_m", 32, 16), **linear(g, "itm_head", 32, 2),
             "image_queue": noise(g, 16, 8), "text_queue": noise(g, 16, 8),
             "idx_queue": torch.full((1, 8), -100), "ptr_queue": torch.zeros(1, dtype=torch.long),
             "temp": torch.tensor(0.07)}
    path = tmp / "model_base_retrieval_coco.pth"
    torch.save({"model": model, "config": {"image_size": 384, "vit": "base", "queue_size": 8}, "epoch": 5}, path)
    return Release(path, tokens_of(ref, 1), ref)


def write_dinov2_reg(tmp: Path, chunked: bool) -> Release:
    """The authors' DINOv2 ViT-B/16 with 4 registers: teacher_checkpoint.pth of a training run."""
    arch = dict(TINY, depth=4) if chunked else dict(TINY)  # 4 blocks in 2 chunks: chunk index != block index
    ref = timm_reference("vit_base_patch16_224", seed=8, arch=arch, reg_tokens=4, no_embed_class=True,
                         init_values=1e-5)
    g = torch.Generator().manual_seed(108)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    # DINOv2 adds pos_embed[:, 0] to the class token and gives registers no position; timm's
    # no_embed_class model holds that sum as its class token.
    cls_pos = noise(g, 1, 1, D)
    backbone = {"cls_token": sd.pop("cls_token") - cls_pos, "register_tokens": sd.pop("reg_token"),
                "mask_token": noise(g, 1, D)}
    encoder = take_vit(sd, arch["depth"], cls_token=False, layerscale=True)
    assert not sd, sorted(sd)
    backbone["pos_embed"] = torch.cat([cls_pos, encoder.pop("pos_embed")], dim=1)
    if chunked:  # BlockChunk i holds Identity padding, so block b sits at blocks.<chunk>.<b>
        encoder = {(f"blocks.{int(k.split('.')[1]) // 2}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
                   for k, v in encoder.items()}
    teacher = {**prefixed("backbone.", {**backbone, **encoder}), **dino_style_head(g, "dino_head", D),
               **dino_style_head(g, "ibot_head", D)}
    path = tmp / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    return Release(path, tokens_of(ref, 5), ref, arch)


def write_dinov2_vitb14(tmp: Path) -> Release:
    """Official dinov2_vitb14_pretrain.pth: raw state dict at 518 px (37 x 37 positions)."""
    ref = timm_reference("vit_base_patch14_dinov2", seed=9)
    g = torch.Generator().manual_seed(109)
    sd = official_encoder(ref, layerscale=True)
    sd["pos_embed"] = noise(g, 1, 1 + 37 * 37, D)
    sd["mask_token"] = noise(g, 1, D)
    # DINOv2 interpolate_pos_encoding for a 224 px input: 16 patches a side, scale factor
    # (16 + 0.1) / 37, bicubic, no antialias
    scale = (16 + 0.1) / 37
    grid16 = F.interpolate(as_grid(sd["pos_embed"][:, 1:]), scale_factor=(scale, scale), mode="bicubic",
                           antialias=False)
    assert grid16.shape[-2:] == (16, 16)
    set_pos(ref, cat_pos(sd["pos_embed"][:, :1], grid16))
    path = tmp / "dinov2_vitb14_pretrain.pth"
    torch.save(sd, path)
    return Release(path, tokens_of(ref, 1), ref)


# OpenAI CLIP (clip/model.py layout), with its own forward pass as the reference.


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [L, N, D]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, patch: int, grid: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens after ln_post (OpenAI applies ln_post to the class token only; the project's
        convention is the final norm on every token)."""
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x)[:, 1:]


class CLIP(nn.Module):
    def __init__(self, patch: int = 16, grid: int = 14):
        super().__init__()
        self.visual = VisionTransformer(D, TINY["depth"], TINY["num_heads"], patch, grid, 16)
        self.transformer = Transformer(32, 1, 2)
        self.token_embedding = nn.Embedding(10, 32)
        self.positional_embedding = nn.Parameter(torch.zeros(5, 32))
        self.ln_final = nn.LayerNorm(32)
        self.text_projection = nn.Parameter(torch.zeros(32, 16))
        self.logit_scale = nn.Parameter(torch.zeros([]))
        for name, value in (("input_resolution", patch * grid), ("context_length", 5), ("vocab_size", 10)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def write_clip(tmp: Path, patch: int = 16, grid: int = 14) -> Release:
    model = randomise(CLIP(patch, grid), seed=10)
    path = tmp / f"ViT-B-{patch}.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return Release(path, model.visual)


WRITERS: dict[str, Callable[[Path], Release]] = {
    "mae_vitb": write_mae,
    "ijepa_vitb": write_ijepa,
    "mocov3_vitb": write_mocov3,
    "clip_vitb": write_clip,
    "blip_vitb": write_blip,
    "dino_vitb": write_dino,
    "ibot_vitb": write_ibot,
    "dinov2_vitb": lambda tmp: write_dinov2_reg(tmp, chunked=False),
    "dinov2_vitb14": write_dinov2_vitb14,
}

# (patch size, native grid side, prefix tokens) of each release
GEOMETRY = {
    "mae_vitb": (16, 14, 1), "ijepa_vitb": (16, 14, 0), "mocov3_vitb": (16, 14, 1), "clip_vitb": (16, 14, 1),
    "blip_vitb": (16, 14, 1), "dino_vitb": (16, 14, 1), "ibot_vitb": (16, 14, 1), "dinov2_vitb": (16, 14, 5),
    "dinov2_vitb14": (14, 16, 1),
}


def release(name: str, tmp: Path) -> Release:
    return WRITERS[name](tmp)


@pytest.fixture(scope="module")
def shared_release(tmp_path_factory) -> Callable[[str], Release]:
    """Releases written once per module, for tests that only read them."""
    cache: dict[str, Release] = {}

    def get(name: str) -> Release:
        if name not in cache:
            cache[name] = release(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


# ---------------------------------------------------------------- 1. official releases


def test_every_registered_backbone_has_a_release_test():
    assert set(BACKBONES) == set(WRITERS)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_official_release_gives_reference_patch_tokens(name, tmp_path):
    rel = release(name, tmp_path)
    bb = load_backbone(name, rel.path, arch=rel.arch)
    patch, grid, prefix = GEOMETRY[name]
    assert (bb.patch_size, bb.grid, bb.num_prefix, bb.dim, bb.image_size) == (patch, grid, prefix, D, patch * grid)
    assert bb.weights == rel.path.name
    assert bb.weights_sha256 == hashlib.sha256(rel.path.read_bytes()).hexdigest()
    x = images((bb.image_size, bb.image_size))
    with torch.no_grad():
        expected = rel.reference(x)
    got = bb.patch_features(x)
    assert got.shape == (2, grid * grid, D)
    torch.testing.assert_close(got, expected, **TOL)


def test_dinov2_block_chunked_checkpoint(tmp_path):
    rel = write_dinov2_reg(tmp_path, chunked=True)
    assert any(k.startswith("backbone.blocks.1.3.") for k in torch.load(rel.path, weights_only=True)["teacher"])
    x = images()
    with torch.no_grad():
        expected = rel.reference(x)
    torch.testing.assert_close(load_backbone("dinov2_vitb", rel.path, arch=rel.arch).patch_features(x), expected, **TOL)


def test_random_weights_are_recorded_as_random():
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    assert (bb.weights, bb.weights_sha256) == ("random", "random")


# ---------------------------------------------------------------- 2. strict loading


def assert_refused(name: str, path: Path, *fragments: str, arch: dict = TINY) -> str:
    with pytest.raises(CheckpointError) as info:
        load_backbone(name, path, arch=arch)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@pytest.mark.parametrize("file_of, given_to, fragments", [
    ("dino_vitb", "mocov3_vitb", ["'state_dict'", "cls_token"]),
    ("mocov3_vitb", "ibot_vitb", ["missing", "unexpected", "module.base_encoder."]),
    ("blip_vitb", "mae_vitb", ["missing", "blocks.0.attn.qkv.weight", "unexpected", "image_queue"]),
    ("dinov2_vitb14", "dino_vitb", ["unexpected", "mask_token", "wrong shapes", "patch_embed.proj.weight"]),
    ("mocov3_vitb", "dino_vitb", ["not a mapping of names to tensors"]),
    ("mae_vitb", "blip_vitb", ["visual_encoder."]),
    ("dinov2_vitb", "ijepa_vitb", ["'encoder'"]),
    ("dino_vitb", "clip_vitb", ["TorchScript"]),
    ("clip_vitb", "dino_vitb", ["weights-only"]),
    ("dino_vitb", "dinov2_vitb14", ["patch size (16, 16)"]),
])
def test_wrong_release_is_refused(file_of, given_to, fragments, tmp_path):
    assert_refused(given_to, release(file_of, tmp_path).path, *fragments)


# the entry holding the weights in each release that is not a raw state dict
CONTAINER = {"mae_vitb": "model", "ijepa_vitb": "encoder", "mocov3_vitb": "state_dict", "blip_vitb": "model",
             "ibot_vitb": "state_dict", "dinov2_vitb": "teacher"}


def edited_release(name: str, tmp: Path, edit: Callable[[dict], object]) -> Path:
    """A release file whose weight mapping went through ``edit`` (in place)."""
    path = release(name, tmp).path
    obj = torch.load(path, weights_only=True)
    edit(obj[CONTAINER[name]] if name in CONTAINER else obj)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name, key, shown", [
    ("dino_vitb", "blocks.1.mlp.fc2.bias", "blocks.1.mlp.fc2.bias"),
    ("mocov3_vitb", "module.momentum_encoder.norm.weight", "norm.weight"),
    ("blip_vitb", "visual_encoder.blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.bias"),
    ("dinov2_vitb", "backbone.blocks.0.ls2.gamma", "blocks.0.ls2.gamma"),
    ("dinov2_vitb14", "blocks.1.ls1.gamma", "blocks.1.ls1.gamma"),
])
def test_missing_key_is_named(name, key, shown, tmp_path):
    assert_refused(name, edited_release(name, tmp_path, lambda w: w.pop(key)), f"missing 1 keys: {shown}")


def test_missing_key_in_torchscript_release_is_named(tmp_path):
    model = randomise(CLIP(), seed=10)
    del model.visual.ln_post.bias
    model.visual.ln_post.register_parameter("bias", None)
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    assert_refused("clip_vitb", path, "missing 1 keys: norm.bias")


@pytest.mark.parametrize("name", ["dino_vitb", "ibot_vitb", "dinov2_vitb"])
def test_extra_key_is_named(name, tmp_path):
    key = ("backbone." if name == "dinov2_vitb" else "") + "blocks.0.attn.q_norm.weight"
    path = edited_release(name, tmp_path, lambda w: w.update({key: torch.ones(32)}))
    assert_refused(name, path, "unexpected 1 keys: blocks.0.attn.q_norm.weight")


@pytest.mark.parametrize("name, key, shown", [
    ("dino_vitb", "norm.weight", "norm.weight (65,) vs (64,)"),
    ("ijepa_vitb", "module.blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc1.bias (65,) vs (256,)"),
])
def test_wrong_shape_is_named(name, key, shown, tmp_path):
    path = edited_release(name, tmp_path, lambda w: w.update({key: torch.zeros(65)}))
    assert_refused(name, path, "wrong shapes", shown)


def clip_b32(tmp: Path) -> Path:
    """OpenAI ViT-B-32.pt: ViT-B/16's widths and depth with 32 px patches."""
    return write_clip(tmp, patch=32, grid=7).path


def dinov2_reg_patch14(tmp: Path) -> Path:
    """A DINOv2 ViT-B/14 training checkpoint in place of the authors' ViT-B/16 run."""
    kernel14 = {"backbone.patch_embed.proj.weight": torch.zeros(D, 3, 14, 14)}
    return edited_release("dinov2_vitb", tmp, lambda w: w.update(kernel14))


def dinov2_vitb14_reg4(tmp: Path) -> Path:
    """Official dinov2_vitb14_reg4_pretrain.pth in place of dinov2_vitb14_pretrain.pth."""
    return edited_release("dinov2_vitb14", tmp, lambda w: w.update({"register_tokens": torch.zeros(1, 4, D)}))


def blip_non_square_positions(tmp: Path) -> Path:
    key = "visual_encoder.pos_embed"
    return edited_release("blip_vitb", tmp, lambda w: w.update({key: w[key][:, :-3]}))


@pytest.mark.parametrize("name, make, fragments", [
    ("clip_vitb", clip_b32, ["visual.conv1.weight has patch size (32, 32)"]),
    ("dinov2_vitb", dinov2_reg_patch14, ["patch_embed.proj.weight has patch size (14, 14)"]),
    ("dinov2_vitb14", dinov2_vitb14_reg4, ["cannot convert"]),
    ("blip_vitb", blip_non_square_positions, ["cannot convert"]),
])
def test_files_timm_would_resample_or_choke_on_are_refused(name, make, fragments, tmp_path):
    """timm's checkpoint filter resamples foreign patch kernels silently and fails with bare shape
    errors on foreign position grids; both must surface as a CheckpointError naming the file."""
    assert_refused(name, make(tmp_path), *fragments)


@pytest.mark.parametrize("name, fragment", [("dino_vitb", "weights-only"), ("clip_vitb", "TorchScript")])
def test_garbage_file_is_refused(name, fragment, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(os.urandom(4096))
    assert_refused(name, path, fragment)


def test_missing_file_is_refused(tmp_path):
    assert_refused("dino_vitb", tmp_path / "nowhere.pth", "no such weights file")


class MkdirOnUnpickle:
    """Unpickling this object runs os.mkdir: what a malicious checkpoint would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


@pytest.mark.parametrize("payload", ["namespace", "code"])
def test_pickled_objects_are_refused_unexecuted(payload, tmp_path):
    rel = write_mae(tmp_path)
    obj = torch.load(rel.path, weights_only=True)
    marker = tmp_path / "executed"
    obj["args"] = argparse.Namespace(lr=1e-3) if payload == "namespace" else MkdirOnUnpickle(marker)
    torch.save(obj, rel.path)
    assert_refused("mae_vitb", rel.path, "weights-only")
    assert not marker.exists()


# ---------------------------------------------------------------- 3. asymmetric positional window

# (backbone, positions before the patch positions in pos_embed)
ASY_CASES = [("dino_vitb", 1), ("dinov2_vitb", 0), ("ijepa_vitb", 0)]


def with_patch_pos(ref: nn.Module, pos_prefix: int, grid: torch.Tensor) -> nn.Module:
    """A copy of ``ref`` whose patch positional embedding is ``grid`` [1, D, h, w]."""
    out = copy.deepcopy(ref)
    if tuple(grid.shape[-2:]) != tuple(out.patch_embed.grid_size):
        out.set_input_size(img_size=(grid.shape[-2] * out.patch_embed.patch_size[0],
                                     grid.shape[-1] * out.patch_embed.patch_size[1]))
    set_pos(out, cat_pos(ref.pos_embed[:, :pos_prefix], grid))
    return out


def asy_expected(rel: Release, pos_prefix: int, prefix: int, x: torch.Tensor, offsets, ratio: float) -> torch.Tensor:
    """Per image: the 14 x 14 window at (oy, ox) of the patch grid resized bicubically to S x S."""
    s = int((1 + ratio) * 14)
    big = F.interpolate(as_grid(rel.ref.pos_embed[:, pos_prefix:]), size=(s, s), mode="bicubic", align_corners=False)
    outs = []
    for img, (oy, ox) in zip(x, offsets):
        model = with_patch_pos(rel.ref, pos_prefix, big[..., oy:oy + 14, ox:ox + 14])
        with torch.no_grad():
            outs.append(model.forward_features(img[None])[:, prefix:])
    return torch.cat(outs)


@pytest.mark.parametrize("name, pos_prefix", ASY_CASES)
@pytest.mark.parametrize("ratio, offset", [(10.0, (0, 0)), (10.0, (140, 140)), (10.0, (0, 140)), (10.0, (37, 91)),
                                           (0.5, (7, 7)), (0.5, (3, 5))])
def test_asymmetric_window_single_offset(name, pos_prefix, ratio, offset, shared_release):
    rel = shared_release(name)
    bb = load_backbone(name, rel.path, arch=rel.arch)
    x = images()
    expected = asy_expected(rel, pos_prefix, GEOMETRY[name][2], x, [offset] * 2, ratio)
    torch.testing.assert_close(bb.patch_features(x, asy_offset=offset, asy_ratio=ratio), expected, **TOL)


@pytest.mark.parametrize("name, pos_prefix", ASY_CASES)
def test_asymmetric_window_per_sample_offsets(name, pos_prefix, shared_release):
    rel = shared_release(name)
    bb = load_backbone(name, rel.path, arch=rel.arch)
    x = images(batch=3)
    offsets = torch.tensor([[0, 140], [140, 0], [12, 77]])
    got = bb.patch_features(x, asy_offset=offsets)
    one_by_one = torch.cat([bb.patch_features(x[i:i + 1], asy_offset=tuple(o.tolist())) for i, o in enumerate(offsets)])
    torch.testing.assert_close(got, one_by_one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, asy_expected(rel, pos_prefix, GEOMETRY[name][2], x, offsets.tolist(), 10.0), **TOL)


@pytest.mark.parametrize("offset, ratio", [((-1, 0), 10.0), ((0, 141), 10.0), ((141, 3), 10.0), ((8, 0), 0.5)])
def test_asymmetric_offset_out_of_range_raises(offset, ratio):
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    with pytest.raises(ValueError, match="offsets"):
        bb.patch_features(images(), asy_offset=offset, asy_ratio=ratio)
    with pytest.raises(ValueError, match="offsets"):
        bb.patch_features(images(), asy_offset=torch.tensor([[0, 0], list(offset)]), asy_ratio=ratio)


def test_asymmetric_window_needs_training_size():
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    with pytest.raises(ValueError, match="224"):
        bb.patch_features(images((448, 448)), asy_offset=(0, 0))


# ---------------------------------------------------------------- 4. other input sizes


@pytest.mark.parametrize("name, pos_prefix", ASY_CASES + [("dinov2_vitb14", 1)])
@pytest.mark.parametrize("scale", [(2, 2), (1, 2), (0.5, 1)])
def test_other_sizes_interpolate_positions_bicubically(name, pos_prefix, scale, shared_release):
    """Plain bicubic resize of the native grid (align_corners=False, no antialias) to h x w."""
    rel = shared_release(name)
    bb = load_backbone(name, rel.path, arch=rel.arch)
    patch, grid, prefix = GEOMETRY[name]
    h, w = int(grid * scale[0]), int(grid * scale[1])
    pos = F.interpolate(as_grid(rel.ref.pos_embed[:, pos_prefix:]), size=(h, w), mode="bicubic", align_corners=False)
    x = images((h * patch, w * patch))
    with torch.no_grad():
        expected = with_patch_pos(rel.ref, pos_prefix, pos).forward_features(x)[:, prefix:]
    got = bb.patch_features(x)
    assert got.shape == (2, h * w, D)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("size", [(225, 224), (224, 232), (100, 100)])
def test_size_not_multiple_of_patch_raises(size):
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb.patch_features(images(size))
