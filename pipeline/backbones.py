"""The registry of frozen backbones and their patch-token forward pass.

Every backbone is a timm VisionTransformer plus a ``CheckpointFormat`` saying how its official
release file maps onto it. Adding one is a single ``register(BackboneSpec(...))``.

Token rule (``BackboneSpec.final_norm``): which token sets go through the backbone's final norm.

- ``"all"`` (the default): every token set is normalised: A, B and A_asy of a views store, the
  evaluation features (``tokens``, ``patch_features``) and every pooled level (``level_vectors``).
- ``"asy-only"``: only the asymmetric branch (``patch_features`` with ``asy_offset``: A_asy) is
  normalised; A, B, the evaluation features and every pooled level are the last (or given) block's
  tokens without the final norm. This is the Co-Settle authors' I-JEPA code (models/ijepa/deit.py):
  ``forward_encoder`` returns the blocks' output unnormalised, ``forward_encoder_asy`` normalises it.
  The authors never pool intermediate levels; ``level_vectors`` follows the non-asymmetric path (no
  norm) so that its last level stays the pooled ``tokens``.

``ijepa_vitb`` follows ``"asy-only"`` (the published I-JEPA row); ``ijepa_vitb_norm`` is the same
release with ``"all"``. The rule is provenance: stores record it in their settings and evaluation
caches in their key (``final_norm``; absent means ``"all"``, so records of ``"all"`` backbones are
unchanged), and a store or cache made with another rule is refused, never mixed.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cosettle.core.provenance import sha256_file

from .checkpoints import CheckpointError, CheckpointFormat, load_strict, read_state_dict
from .pooling import NEEDS_CLASS_TOKEN, check_pooling, pool_tokens
from .views import asy_grid_size

RANDOM = "random"
ALL = "all"  # every token set after the final norm
ASY_ONLY = "asy-only"  # only A_asy after the final norm (the authors' I-JEPA forward_encoder[_asy])
FINAL_NORM_RULES = (ALL, ASY_ONLY)
FINAL_NORM_KEY = "final_norm"  # the settings / cache-key entry; recorded only when not "all"


def final_norm_record(rule: str) -> dict:
    """What provenance records of a token rule: ``{}`` for ``"all"`` (a record without the key was
    made with every token normalised, as all were before rules existed), else ``{"final_norm": rule}``."""
    if rule not in FINAL_NORM_RULES:
        raise ValueError(f"unknown final-norm rule {rule!r}; choose one of {', '.join(FINAL_NORM_RULES)}")
    return {} if rule == ALL else {FINAL_NORM_KEY: rule}


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone: the timm architecture, its options, and its release's checkpoint format."""

    name: str
    timm_name: str
    checkpoint: CheckpointFormat
    model_kwargs: dict = field(default_factory=dict)
    image_size: int = 224
    description: str = ""
    final_norm: str = ALL  # the token rule (module docstring): "all" or "asy-only"


BACKBONES: dict[str, BackboneSpec] = {}
_INIT_LOCK = threading.Lock()  # seeding the global torch RNG must not interleave across threads


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to ``BACKBONES``; a name registered twice is an error."""
    if spec.name in BACKBONES:
        raise ValueError(f"backbone '{spec.name}' is registered twice")
    if spec.final_norm not in FINAL_NORM_RULES:
        raise ValueError(f"backbone '{spec.name}': unknown final_norm {spec.final_norm!r}; "
                         f"choose one of {', '.join(FINAL_NORM_RULES)}")
    BACKBONES[spec.name] = spec
    return spec


register(BackboneSpec(
    "mae_vitb", "vit_base_patch16_224.mae",
    CheckpointFormat(container="model", drop=("decoder", "mask_token")),
    description="MAE ViT-B/16 (mae_pretrain_vit_base.pth)",
))
register(BackboneSpec(
    "ijepa_vitb", "vit_base_patch16_224",
    CheckpointFormat(container="encoder", keep_prefix="module."),
    model_kwargs=dict(class_token=False, global_pool="avg", fc_norm=False),
    description="I-JEPA ViT-B/16 (encoder of the training checkpoint); A, B and evaluation tokens "
                "without the final norm, A_asy with it, as the Co-Settle authors' code",
    final_norm=ASY_ONLY,
))
register(BackboneSpec(
    "ijepa_vitb_norm", "vit_base_patch16_224",
    CheckpointFormat(container="encoder", keep_prefix="module."),
    model_kwargs=dict(class_token=False, global_pool="avg", fc_norm=False),
    description="I-JEPA ViT-B/16 (encoder of the training checkpoint); every token after the final norm",
))
register(BackboneSpec(
    "mocov3_vitb", "vit_base_patch16_224",
    CheckpointFormat(container="state_dict", keep_prefix="module.momentum_encoder.", drop=("head.",)),
    description="MoCo v3 ViT-B/16, momentum encoder (vit-b-300ep.pth.tar)",
))
register(BackboneSpec(
    "clip_vitb", "vit_base_patch16_clip_quickgelu_224.openai",
    CheckpointFormat(torchscript=True, timm_filter=True, drop=("head.",)),
    description="OpenAI CLIP ViT-B/16 image tower (ViT-B-16.pt, TorchScript)",
))
register(BackboneSpec(
    "blip_vitb", "vit_base_patch16_224",
    CheckpointFormat(container="model", keep_prefix="visual_encoder.", timm_filter=True,
                     filter_kwargs=dict(antialias=False)),
    description="BLIP ViT-B/16 visual encoder (model_base_retrieval_coco.pth, 384 px)",
))
register(BackboneSpec(
    "dino_vitb", "vit_base_patch16_224.dino",
    CheckpointFormat(),
    description="DINO ViT-B/16 (dino_vitbase16_pretrain.pth)",
))
register(BackboneSpec(
    "ibot_vitb", "vit_base_patch16_224",
    CheckpointFormat(container="state_dict", drop=("head.",)),
    description="iBOT ViT-B/16 teacher (checkpoint_teacher.pth)",
))
register(BackboneSpec(
    "dinov2_vitb", "vit_base_patch16_224",
    CheckpointFormat(container="teacher", keep_prefix="backbone.", rename=((r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),),
                     timm_filter=True),
    model_kwargs=dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),
    description="DINOv2 ViT-B/16 with 4 registers, the Co-Settle authors' ImageNet run (training checkpoint)",
))
register(BackboneSpec(
    "dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m",
    CheckpointFormat(dinov2_pos_resize=True, timm_filter=True),
    description="DINOv2 ViT-B/14 official release (dinov2_vitb14_pretrain.pth)",
))


class Backbone(torch.nn.Module):
    """A frozen ViT returning last-block patch tokens (prefix tokens dropped; after the final norm as
    its spec's token rule says, see the module docstring), with ``tokens`` its class token, and with
    ``level_vectors`` pooled vectors of several blocks."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, weights: str, weights_sha256: str):
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.patch_size = model.patch_embed.patch_size[0]
        self.grid = model.patch_embed.grid_size[0]
        self.dim = model.embed_dim
        self.num_prefix = model.num_prefix_tokens
        self._asy_cache: dict = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    @property
    def final_norm(self) -> str:
        """The token rule: "all" or "asy-only" (module docstring)."""
        return self.spec.final_norm

    @property
    def norm_plain(self) -> bool:
        """Whether tokens without the asymmetric embedding (A, B, evaluation features, pooled levels)
        go through the final norm; A_asy always does."""
        return self.spec.final_norm == ALL

    def _patch_pos_grid(self) -> torch.Tensor:
        """The positional embedding of the patch tokens as [1, D, g, g]."""
        pos = self.model.pos_embed
        if not self.model.no_embed_class:
            pos = pos[:, self.num_prefix :]
        g = self.grid
        return pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)

    def patch_pos(self, h: int, w: int) -> torch.Tensor:
        """Patch positional embedding [1, h*w, D] for an h x w grid (bicubic when resized)."""
        grid = self._patch_pos_grid()
        if (h, w) != (self.grid, self.grid):
            grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(grid.dtype)
        return grid.flatten(2).transpose(1, 2)

    def asy_patch_pos(self, offsets: torch.Tensor, asy_ratio: float) -> torch.Tensor:
        """Asymmetric positional embedding [B, g*g, D]: the g x g window at each (oy, ox) of the
        embedding grid enlarged bicubically to S x S, S = int((1 + asy_ratio) * g).

        g is the training-size grid (224 px): for dinov2_vitb14 the 16 x 16 grid its 37 x 37
        release positions were resized to, not the native 37 x 37 grid the authors' code would
        enlarge (a deliberate choice; dinov2_vitb14 is not in the paper)."""
        s = asy_grid_size(self.grid, asy_ratio)
        key = (s, self.model.pos_embed.device, self.model.pos_embed.dtype)
        if key not in self._asy_cache:
            big = F.interpolate(self._patch_pos_grid().float(), size=(s, s), mode="bicubic", align_corners=False)
            self._asy_cache = {key: big.to(self.model.pos_embed.dtype)[0]}
        big = self._asy_cache[key]
        g = self.grid
        offsets = offsets.tolist()
        if any(not (0 <= oy <= s - g and 0 <= ox <= s - g) for oy, ox in offsets):
            raise ValueError(f"asymmetric offsets must lie in [0, {s - g}], got {offsets}")
        windows = [big[:, oy : oy + g, ox : ox + g] for oy, ox in offsets]
        return torch.stack(windows).flatten(2).transpose(1, 2)

    def _patch_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """The (h, w) patch grid of images [B, 3, H, W]; H, W must be multiples of the patch."""
        hh, ww = images.shape[-2:]
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
        return hh // p, ww // p

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(class token [B, D], patch tokens [B, h*w, D]) of normalised images from one forward pass,
        both after the final norm unless the token rule is "asy-only"; the class token is None for a
        backbone without one (ijepa_vitb). The patch tokens are exactly ``patch_features(images)``."""
        x = self._forward(images, self.patch_pos(*self._patch_grid(images)), norm=self.norm_plain)
        cls = x[:, 0] if self.model.cls_token is not None else None  # timm puts the class token first
        return cls, x[:, self.num_prefix :]

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor, asy_offset=None, asy_ratio: float = 10.0) -> torch.Tensor:
        """Patch tokens [B, h*w, D] of normalised images [B, 3, H, W] (H, W multiples of the patch).

        ``asy_offset``: None for the standard embedding, one (oy, ox) for the whole batch, or a
        [B, 2] tensor of per-image offsets for the asymmetric window (training-size input only).
        Without an offset (A, B, evaluation features) the final norm follows the token rule; with
        one (A_asy) the tokens are always after the final norm.
        """
        if asy_offset is None:
            return self.tokens(images)[1]
        h, w = self._patch_grid(images)
        if (h, w) != (self.grid, self.grid):
            hh, ww = images.shape[-2:]
            raise ValueError(f"the asymmetric embedding needs {self.image_size}px input, got {hh}x{ww}")
        offsets = torch.as_tensor(asy_offset).reshape(-1, 2)
        if offsets.shape[0] == 1:
            offsets = offsets.expand(images.shape[0], 2)
        return self._forward(images, self.asy_patch_pos(offsets, asy_ratio), norm=True)[:, self.num_prefix :]

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.model.blocks)

    def check_levels(self, levels) -> tuple[int, ...]:
        """``levels`` as a tuple of 1-based block indices, increasing and within 1..depth."""
        levels = tuple(int(v) for v in levels)
        if not levels or any(b <= a for a, b in zip(levels, levels[1:])) or not 1 <= levels[0] <= levels[-1] <= self.depth:
            raise ValueError(f"levels {list(levels)}: need increasing block indices within 1..{self.depth} "
                             f"({self.name} has {self.depth} blocks)")
        return levels

    def check_pooling(self, pooling: str) -> None:
        """Refuse a pooling this backbone cannot do (cls, cls+mean without a class token)."""
        check_pooling(pooling)
        if pooling in NEEDS_CLASS_TOKEN and self.model.cls_token is None:
            raise ValueError(f"{self.name} has no class token; pooling {pooling!r} needs one (use 'mean')")

    @torch.no_grad()
    def level_vectors(self, images: torch.Tensor, levels, pooling: str) -> torch.Tensor:
        """Pooled vectors [B, L, D'] (float32) of normalised images [B, 3, H, W] at several depths.

        ``levels``: 1-based block indices; the tokens after each of those blocks go through the
        backbone's final norm as the last block's do in ``tokens`` (so not for the "asy-only" rule)
        and are pooled per image by ``pooling`` (``cosettle.pipeline.pooling``). One forward pass,
        stopped after the deepest level; the last level ``depth`` gives exactly the pooled
        ``tokens(images)``.
        """
        levels = self.check_levels(levels)
        self.check_pooling(pooling)
        m = self.model
        x = self._embed(images, self.patch_pos(*self._patch_grid(images)))
        out = []
        for i, block in enumerate(m.blocks[: levels[-1]], start=1):
            x = block(x)
            if i in levels:
                y = (m.norm(x) if self.norm_plain else x).float()  # pooled in float32, also under autocast
                cls = y[:, 0] if m.cls_token is not None else None
                out.append(pool_tokens(cls, y[:, self.num_prefix :], pooling))
        return torch.stack(out, dim=1)

    def _forward(self, images: torch.Tensor, patch_pos: torch.Tensor, norm: bool) -> torch.Tensor:
        """All tokens [B, prefix + h*w, D] of the last block, after the final norm if ``norm``,
        patch positions given."""
        x = self.model.blocks(self._embed(images, patch_pos))
        return self.model.norm(x) if norm else x

    def _embed(self, images: torch.Tensor, patch_pos: torch.Tensor) -> torch.Tensor:
        """The input of the first block [B, prefix + h*w, D], patch positions given."""
        m = self.model
        x = m.patch_embed(images)  # [B, h, w, D] with dynamic_img_size
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + patch_pos.to(x.dtype)
        prefix = []
        if m.cls_token is not None:
            prefix.append(m.cls_token.expand(x.shape[0], -1, -1))
        if m.reg_token is not None:
            prefix.append(m.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            prefix = torch.cat(prefix, dim=1)
            if not m.no_embed_class:
                prefix = prefix + m.pos_embed[:, : self.num_prefix]
            x = torch.cat([prefix, x], dim=1)
        return m.norm_pre(x)


def create_model(name: str, arch: dict | None = None, meta: bool = False) -> torch.nn.Module:
    """The timm model of a registered backbone, randomly initialised (seed 0) and not loaded.

    ``arch`` overrides architecture options (e.g. a tiny depth/width for tests). ``meta``: build it
    on the meta device instead, without storage and without any initialisation (timm's
    ``weight_init="skip"``), for weights that are loaded right after (``load_strict`` adopts them).
    """
    import timm

    spec = get_spec(name)
    kwargs = dict(spec.model_kwargs, num_classes=0, img_size=spec.image_size, dynamic_img_size=True)
    kwargs.update(arch or {})
    if meta:
        with torch.device("meta"):
            return timm.create_model(spec.timm_name, pretrained=False, **dict(kwargs, weight_init="skip"))
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs)


def _outside_state_dict(model: torch.nn.Module) -> set[str]:
    """Parameters and buffers that no state dict can set (non-persistent buffers): a model built on
    the meta device would keep them without values."""
    names = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()}
    return names - set(model.state_dict())


def get_spec(name: str) -> BackboneSpec:
    """The registered spec of ``name``; KeyError listing the known names otherwise."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone '{name}'; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def load_backbone(name: str, weights: str | Path, device: str | torch.device = "cpu", arch: dict | None = None) -> Backbone:
    """A frozen backbone with its official weights loaded strictly.

    ``weights`` is the release file (the model is then built on the meta device and takes the file's
    tensors, so nothing is initialised only to be overwritten), or ``"random"`` for the seed-0 random
    initialisation (the only way to get random weights; it is recorded as such).
    """
    spec = get_spec(name)
    if str(weights) == RANDOM:
        model = create_model(name, arch)
        label, digest = RANDOM, RANDOM
    else:
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such weights file (pass --weights random for random weights)")
        # The file is hashed while it is parsed (hashlib and file reads release the GIL): the
        # start-up is one pass over it, not two in turn.
        with ThreadPoolExecutor(max_workers=1) as pool:
            digest = pool.submit(sha256_file, path)
            # Built on the meta device: no random initialisation of weights the file replaces right after.
            model = create_model(name, arch, meta=True)
            if _outside_state_dict(model):  # a tensor the file cannot set: build it for real, as before
                model = create_model(name, arch)
            load_strict(model, read_state_dict(path, spec.checkpoint, model), path, name)
            label, digest = path.name, digest.result()
    return Backbone(spec, model, label, digest).to(device)
