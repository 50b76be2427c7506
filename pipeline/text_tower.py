"""The CLIP text tower: the language side of zero-shot evaluation and of the concepts objective.

It lives in the pipeline layer so that the trainer (concept vectors) and eval (zero-shot
classification; ``cosettle.eval.video.text.zeroshot_scores``) share one loader.

The text tower comes from the same OpenAI TorchScript release file (``ViT-B-16.pt``) that the
``clip_vitb`` backbone reads its image tower from. The file is opened with ``torch.jit.load`` from
a local path only (its ``state_dict``; no pickle is unpickled) and rebuilt as an open_clip ``CLIP``
with ``open_clip.model.build_model_from_openai_state_dict``; text is tokenised with open_clip's
bundled BPE tokenizer (``open_clip.tokenizer.SimpleTokenizer``). No model name is ever passed to
open_clip, so no pretrained weights, config or tokenizer can be downloaded.

Joint space: text = EOT feature of ln_final @ text_projection; image = ln_post(CLS) @ visual.proj.
The project's ``Backbone`` runs timm's CLIP ViT, whose final ``norm`` *is* OpenAI's ``ln_post``
(timm maps ``ln_post`` -> ``norm``), and returns patch tokens after that norm with the CLS token
dropped; the projection ``proj`` is not in the backbone (its ``head.`` is dropped). So the image
side feeds the CLS token taken after the final norm (``model.forward_features(x)[:, 0]``) to
``image_embedding`` with ``after_final_norm=True`` (the default), which applies only ``proj``.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosettle.core.errors import first_line
from cosettle.core.provenance import sha256_file
from cosettle.pipeline.backbones import get_spec

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a video of a person {}.",
    "a photo of a person {}.",
    "a video of a person doing {}.",
    "a person is {}.",
    "a video of {}.",
    "a demonstration of a person {}.",
    "an example of a person {}.",
    "human action of {}.",
)

# Keys every OpenAI CLIP archive has for its text tower (clip/model.py layout).
TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
             "text_projection", "transformer.resblocks.0.attn.in_proj_weight")
# Scalars the OpenAI JIT model stores next to the weights; not parameters of open_clip's CLIP.
META_KEYS = ("input_resolution", "context_length", "vocab_size")

TEXT_BACKBONES = frozenset({"clip_vitb"})
# Backbones whose release has a text encoder this module cannot load, with the reason ({} = purpose).
_UNSUPPORTED = {
    "blip_vitb": "blip_vitb is not supported for {} yet: BLIP's retrieval checkpoint has a BERT "
                 "text encoder with its own tokenizer, which is not covered",
}


class TextTowerError(Exception):
    """No usable text tower: a file that is not a CLIP archive, or a backbone without one."""


def require_text_tower(backbone_name: str, purpose: str = "zero-shot") -> None:
    """Raise ``TextTowerError`` (one line) unless ``backbone_name`` has a text tower we can load;
    ``purpose`` names what needs it in the message ("zero-shot", "the concepts objective")."""
    get_spec(backbone_name)  # unknown names: the registry's KeyError listing the known ones
    if backbone_name in TEXT_BACKBONES:
        return
    if backbone_name in _UNSUPPORTED:
        raise TextTowerError(_UNSUPPORTED[backbone_name].format(purpose))
    raise TextTowerError(f"{backbone_name} has no text encoder; {purpose} needs a CLIP backbone")


def readable_class_name(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup', 'brush_hair' -> 'brush hair' (UCF101 / HMDB51)."""
    text = name.replace("_", " ")
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text)  # camel hump
    text = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", " ", text)  # end of an acronym: 'SVMTest'
    return " ".join(text.lower().split())


@lru_cache(maxsize=1)
def _tokenizer():
    """open_clip's CLIP BPE tokenizer; its vocabulary ships inside the package (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _build_open_clip(sd: dict[str, torch.Tensor]) -> nn.Module:
    """open_clip ``CLIP`` for an OpenAI state dict, in float32 with the file's exact values."""
    from open_clip.model import build_model_from_openai_state_dict

    # open_clip infers the architecture from the shapes but rounds the weights through fp16;
    # reloading into the float32 model keeps an fp32 file exact (the release is fp16 anyway).
    model = build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None).float()
    model.load_state_dict({k: v for k, v in sd.items() if k not in META_KEYS}, strict=True)
    return model.eval().requires_grad_(False)


class ClipText:
    """The text tower and image projection of one OpenAI CLIP file, in open_clip's ``CLIP``."""

    def __init__(self, model: nn.Module, weights: Path, weights_sha256: str, batch_size: int = 256):
        self.model = model
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.batch_size = batch_size

    @property
    def context_length(self) -> int:
        return int(self.model.positional_embedding.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def device(self) -> torch.device:
        return self.model.text_projection.device

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature exp(logit_scale), for softmax over cosine scores."""
        return float(self.model.logit_scale.exp())

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] (SOT ... EOT, zero padded, truncated to the context)."""
        return _tokenizer()(list(texts), context_length=self.context_length)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, E] (float32, on the model's device)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        tokens = self.tokenize(texts).to(self.device)
        out = [self.model.encode_text(tokens[i : i + self.batch_size], normalize=True)
               for i in range(0, len(tokens), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                         readable: bool = True) -> torch.Tensor:
        """Zero-shot classifier [C, E]: per class, fill every template, normalise each embedding,
        average, renormalise. ``readable`` first maps dataset names through ``readable_class_name``."""
        if not class_names or not templates:
            raise ValueError("class_embeddings needs at least one class name and one template")
        names = [readable_class_name(c) if readable else c for c in class_names]
        texts = [t.format(n) for n in names for t in templates]
        emb = self.encode(texts).reshape(len(names), len(templates), -1)
        return F.normalize(emb.mean(dim=1), dim=-1)

    def image_projection(self) -> tuple[nn.LayerNorm, torch.Tensor]:
        """(ln_post, proj [D, E]): image embedding = ln_post(CLS before ln_post) @ proj."""
        return self.model.visual.ln_post, self.model.visual.proj

    def to(self, device: str | torch.device) -> "ClipText":
        self.model.to(device)
        return self


def load_clip_text(weights: str | Path, device: str | torch.device = "cpu") -> ClipText:
    """The text tower of a local OpenAI CLIP TorchScript file (``ViT-B-16.pt``); never downloads."""
    path = Path(weights)
    if not path.is_file():
        raise TextTowerError(f"{path}: no such CLIP weights file")
    try:
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:
        raise TextTowerError(f"{path}: not a CLIP TorchScript archive ({first_line(e)})") from None
    missing = [k for k in TEXT_KEYS if k not in sd]
    if missing:
        raise TextTowerError(f"{path}: no CLIP text tower in the archive (missing {', '.join(missing)})")
    if "visual.proj" not in sd or "visual.ln_post.weight" not in sd:
        raise TextTowerError(f"{path}: not a CLIP ViT archive (no visual.proj / visual.ln_post)")
    text_dim, image_dim = sd["text_projection"].shape[-1], sd["visual.proj"].shape[-1]
    if sd["text_projection"].ndim != 2 or sd["visual.proj"].ndim != 2 or text_dim != image_dim:
        raise TextTowerError(f"{path}: text tower does not match the image tower (text_projection "
                             f"{tuple(sd['text_projection'].shape)}, visual.proj {tuple(sd['visual.proj'].shape)}: "
                             "their output widths must be equal)")
    vocab = len(_tokenizer().encoder)
    if sd["token_embedding.weight"].shape[0] != vocab:
        raise TextTowerError(f"{path}: text vocabulary of {sd['token_embedding.weight'].shape[0]} tokens, "
                             f"the CLIP BPE tokenizer needs {vocab}")
    try:
        model = _build_open_clip(sd)
    except Exception as e:  # shapes open_clip cannot map (e.g. a width not a multiple of 64 heads)
        raise TextTowerError(f"{path}: not an OpenAI CLIP layout ({first_line(e)})") from None
    return ClipText(model, path, sha256_file(path)).to(device)


@torch.no_grad()
def image_embedding(cls_tokens: torch.Tensor, clip_text: ClipText, after_final_norm: bool = True,
                    normalize: bool = True) -> torch.Tensor:
    """Map backbone CLS tokens [..., D] into CLIP's joint space [..., E].

    ``after_final_norm=True``: the CLS token after the backbone's final norm (timm ``norm`` ==
    OpenAI ``ln_post`` for clip_vitb), so only ``proj`` is applied. ``False``: the raw last-block
    CLS token, ``ln_post`` is applied first.
    """
    ln_post, proj = clip_text.image_projection()
    if cls_tokens.shape[-1] != proj.shape[0]:
        raise ValueError(f"CLS tokens of width {cls_tokens.shape[-1]}, the CLIP projection takes {proj.shape[0]}")
    x = cls_tokens.to(device=proj.device, dtype=proj.dtype)
    if not after_final_norm:
        x = ln_post(x)
    x = x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def require_same_release(backbone_weights_sha256: str, clip_text: ClipText) -> None:
    """Refuse a text tower from another file than the image tower: their joint spaces differ.
    ``backbone_weights_sha256`` is ``Backbone.weights_sha256`` (the file the image tower was read from)."""
    if backbone_weights_sha256 != clip_text.weights_sha256:
        raise TextTowerError(f"{clip_text.weights}: text tower sha256 {clip_text.weights_sha256[:12]} differs "
                             f"from the backbone's weights {backbone_weights_sha256[:12]}")
