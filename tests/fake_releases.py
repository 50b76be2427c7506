"""Official release files of the ten backbones, written in each original repository's key layout
and container (tiny width, random values), with the reference each one should reproduce: a timm
model created directly and randomised, whose weights are written out by this module's own inverse
mapping (for CLIP: an OpenAI-layout module with its own forward pass, saved as TorchScript).
Positional embeddings that a release stores at another resolution (BLIP 384 px, DINOv2 ViT-B/14
518 px) are resized as the authors' code does and put into the reference."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

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
    """An official-format file and the patch tokens its backbone must produce (``final_norm``: its rule)."""

    path: Path
    reference: Callable[[torch.Tensor], torch.Tensor]
    ref: nn.Module | None = None
    arch: dict = field(default_factory=lambda: dict(TINY))
    final_norm: bool = True


def tokens_of(ref: nn.Module, prefix: int, norm: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Patch tokens of timm's ``forward_features`` (in eval mode), without its final norm if not ``norm``."""
    final = ref.norm if norm else nn.Identity()
    return lambda x: final(ref.blocks(ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))))[:, prefix:]


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


def write_ijepa(tmp: Path, final_norm: bool = False) -> Release:
    """Plain tokens (no asymmetric offset) skip the final norm for ijepa_vitb (the authors' rule)."""
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
    return Release(path, tokens_of(encoder, 0, final_norm), encoder, final_norm=final_norm)


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

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # [L, N, D]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


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
    "ijepa_vitb_norm": lambda tmp: write_ijepa(tmp, final_norm=True),
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
    "mae_vitb": (16, 14, 1), "ijepa_vitb": (16, 14, 0), "ijepa_vitb_norm": (16, 14, 0), "mocov3_vitb": (16, 14, 1),
    "clip_vitb": (16, 14, 1), "blip_vitb": (16, 14, 1), "dino_vitb": (16, 14, 1), "ibot_vitb": (16, 14, 1),
    "dinov2_vitb": (16, 14, 5), "dinov2_vitb14": (14, 16, 1),
}


def release(name: str, tmp: Path) -> Release:
    return WRITERS[name](tmp)
