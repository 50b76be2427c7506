"""Clip features of whole videos for video-level evaluation (retrieval, kNN, linear probe, zero-shot).

Sampling: ``clips`` clips of ``frames`` frames, ``stride`` frames apart, spread uniformly over the
video (``clip_indices``). Every sampled frame is resized (short side ``resize``, torchvision's
Resize), centre-cropped to the backbone's training size and ImageNet-normalised (``clip_input``).

Pooling, per frame (``POOLINGS``): ``cls`` the class token, ``mean`` the mean of the patch tokens,
``cls+mean`` both concatenated, ``clip`` CLIP's image embedding of the class token (unit length
per frame, as CLIP's zero-shot scores are cosines). A trained projection (token-wise
[..., D] -> [..., D], e.g. Co-Settle's) is applied to every token, class token included, BEFORE
pooling: it was trained on tokens, so a pooled vector is the pool of projected tokens.

A clip's vector is the mean of its frames' pooled vectors; the cache stores these per-clip
vectors [clips, D'] per video (float32, entry ``<variant>/<dataset>/<video name>``) and a video's
vector is the mean over its clips. L2 normalisation is left to the metric functions.

A clip-level trained run (a module with ``embed``: the temporal head of VTHCL or CSTP) replaces
the mean over frames: each frame gives its pooled vectors at the protocol's ``levels`` (as in the
run's clip store, ``Backbone.level_vectors``) and the head maps a clip [frames, levels, D'] to its
vector.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from cosettle.core.errors import first_line
from cosettle.core.precision import autocast, resolve_amp
from cosettle.core.provenance import digest
from cosettle.eval.frame.analysis_report import clip_input
from cosettle.eval.video.datasets import ActionVideo
from cosettle.eval.zarr_cache import CacheError, ZarrCache
from cosettle.pipeline.backbones import Backbone, final_norm_record
from cosettle.pipeline.pooling import NEEDS_CLASS_TOKEN as TOKEN_NEEDS_CLS
from cosettle.pipeline.pooling import POOLINGS as TOKEN_POOLINGS
from cosettle.pipeline.pooling import pool_tokens, pooled_dim
from cosettle.pipeline.text_tower import ClipText, image_embedding, require_same_release
from cosettle.pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from cosettle.pipeline.videos import VideoError, open_video

POOLINGS = TOKEN_POOLINGS + ("clip",)  # cls, mean, cls+mean: cosettle.pipeline.pooling
NEEDS_CLASS_TOKEN = TOKEN_NEEDS_CLS + ("clip",)
ATTR = "cosettle_clip_features"
FORMAT = 2  # 2: the trained run names an entry's variant instead of keying the whole cache
DEFAULT_DIR = Path("eval_cache")


class UnreadableVideoWarning(UserWarning):
    """A video that could not be decoded was skipped (the caller records how many)."""


@dataclass(frozen=True)
class ClipProtocol:
    """How a video becomes clips: ``clips`` clips of ``frames`` frames ``stride`` apart, frames
    resized to short side ``resize`` before the centre crop, pooled per frame by ``pooling``."""

    clips: int = 10
    frames: int = 8
    stride: int = 4
    pooling: str = "cls"
    resize: int = 256
    levels: tuple[int, ...] = ()  # blocks pooled for a clip-level head; () = the last block only

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(int(b) for b in self.levels))
        for name in ("clips", "frames", "stride", "resize"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"clip protocol: {name} must be a positive integer, got {value!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"clip protocol: pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    @property
    def span(self) -> int:
        """Frames of the video one clip covers, first to last sampled frame included."""
        return (self.frames - 1) * self.stride + 1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"levels": list(self.levels)}


def clip_indices(num_frames: int, protocol: ClipProtocol) -> np.ndarray:
    """Frame indices [clips, frames] of a video of ``num_frames`` frames.

    Clip starts are ``linspace(0, num_frames - span, clips)`` rounded half up: the first clip
    starts at the first frame and, for ``clips > 1``, the last one ends at the last frame (a
    single clip starts at frame 0). A video shorter than a span has every clip start at frame 0
    and indices past its end clamped to its last frame (the clips are then identical and repeat
    the last frame); the source forwards each distinct frame once.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames!r}")
    last_start = max(int(num_frames) - protocol.span, 0)
    starts = np.floor(np.linspace(0, last_start, protocol.clips) + 0.5).astype(np.int64)
    indices = starts[:, None] + protocol.stride * np.arange(protocol.frames, dtype=np.int64)
    return np.minimum(indices, num_frames - 1)


def source_size(path: Path) -> int:
    """Bytes of a video file, or of all files of a frame folder: a cheap fingerprint of the source."""
    path = Path(path)
    if path.is_dir():
        with os.scandir(path) as it:
            return sum(e.stat().st_size for e in it if e.is_file())
    return path.stat().st_size


def project_tokens(cls: torch.Tensor | None, patches: torch.Tensor,
                   projection: torch.nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The projection applied token-wise to the class token [B, D] and patch tokens [B, N, D]."""
    if projection is None:
        return cls, patches
    return (projection(cls) if cls is not None else None), projection(patches)


def pool_frames(cls: torch.Tensor | None, patches: torch.Tensor, pooling: str,
                clip_text: ClipText | None = None) -> torch.Tensor:
    """One vector per frame [B, D'] from its (projected) class token and patch tokens: ``clip`` here,
    ``cls``, ``mean`` and ``cls+mean`` by ``cosettle.pipeline.pooling.pool_tokens``."""
    if pooling in TOKEN_POOLINGS:
        return pool_tokens(cls, patches, pooling)
    if pooling == "clip":
        if cls is None:
            raise ValueError(f"pooling {pooling!r} needs a class token")
        if clip_text is None:
            raise ValueError("pooling 'clip' needs the CLIP text tower (clip_text)")
        return image_embedding(cls, clip_text).to(cls.device)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")


def precision(amp: str) -> str:
    """The backbone's compute precision under an effective autocast (``cosettle.core.precision``), as
    keys record it: "float32", "bf16-autocast" (``--amp auto`` on CUDA) or "fp16-autocast"."""
    return "float32" if amp == "none" else f"{amp}-autocast"


def cache_key(backbone: Backbone, protocol: ClipProtocol, clip_text: ClipText | None, device: torch.device,
              amp: str = "auto") -> dict:
    """Everything that decides the cached clip vectors but the trained run (which names an entry's
    variant, so the frozen backbone and its trained runs share one cache). The backbone's token rule
    (``final_norm``) is in it only when not "all", so caches of "all" backbones keep their key."""
    return {
        "format": FORMAT, "backbone": backbone.name, "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256, "dim": backbone.dim, "depth": len(backbone.model.blocks),
        "patch_size": backbone.patch_size, "crop": backbone.image_size,
        "protocol": protocol.as_dict(),
        "text_weights_sha256": clip_text.weights_sha256 if protocol.pooling == "clip" else "none",
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "resize": "bilinear, antialias (torchvision Resize) + centre crop"},
        "precision": precision(resolve_amp(amp, device)), "dtype": "float32",
        **final_norm_record(backbone.final_norm),
    }


def variant_name(projection_info: dict | None) -> str:
    """The cache entries' top folder: ``frozen``, or ``run-`` + the trained weights' digest (the whole
    provenance record's digest for a module without a weights file)."""
    if projection_info is None:
        return "frozen"
    return "run-" + (projection_info.get("run_weights_sha256") or digest(projection_info))[:16]


def default_cache_path(key: dict) -> Path:
    """``eval_cache/<backbone>_<weights sha256[:12]>_clips_<key digest[:12]>.zarr``."""
    return DEFAULT_DIR / f"{key['backbone']}_{key['weights_sha256'][:12]}_clips_{digest(key)[:12]}.zarr"


class ClipFeatureSource:
    """Per-clip and per-video vectors of action videos, cached (see the module docstring).

    ``cache``: the Zarr store, or None for ``default_cache_path``. ``projection`` and
    ``projection_info`` (its provenance, e.g. from ``open_run``) come together: the info keys the
    cache. ``clip_text`` is needed for pooling ``clip`` and must come from the backbone's release.
    The backbone (and projection, text tower) are moved to ``device``; it runs under the ``amp``
    autocast (``--amp``; auto: bf16 on CUDA, float32 elsewhere), which the key records.
    """

    def __init__(self, backbone: Backbone, protocol: ClipProtocol, cache: Path | None = None,
                 projection: torch.nn.Module | None = None, projection_info: dict | None = None,
                 device: torch.device | str = "cpu", batch_size: int = 64, clip_text: ClipText | None = None,
                 amp: str = "auto"):
        if protocol.pooling in NEEDS_CLASS_TOKEN and backbone.model.cls_token is None:
            raise ValueError(f"{backbone.name} has no class token; pooling {protocol.pooling!r} needs one (use 'mean')")
        if (projection is None) != (projection_info is None):
            raise ValueError("projection and projection_info come together: the info names the cache entries")
        if protocol.pooling == "clip":
            if clip_text is None:
                raise ValueError(f"pooling 'clip' needs the CLIP text tower of {backbone.name}'s weights (clip_text)")
            require_same_release(backbone.weights_sha256, clip_text)
        if protocol.resize < backbone.image_size:
            raise ValueError(f"resize {protocol.resize} is smaller than {backbone.name}'s {backbone.image_size}px crop")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.amp = resolve_amp(amp, self.device)
        self.backbone = backbone.to(self.device)
        self.protocol = protocol
        module = projection.to(self.device).eval() if projection is not None else None
        # A clip-level head maps whole clips; anything else is a token-wise projection.
        self.head = module if hasattr(module, "embed") else None
        self.projection = None if self.head is not None else module
        if self.head is not None and not protocol.levels:
            raise ValueError("a clip-level head needs the protocol's levels (those of its clip store)")
        self.projection_info = projection_info
        self.clip_text = clip_text.to(self.device) if clip_text is not None else None
        self.batch_size = batch_size
        self.key = cache_key(backbone, protocol, clip_text, self.device, self.amp)
        self.variant = variant_name(projection_info)
        self.cache_path = Path(cache) if cache is not None else default_cache_path(self.key)
        self.cache = ZarrCache(self.cache_path, self.key, ATTR)

    def record(self) -> dict:
        """What results should record of these features."""
        return {"backbone": self.backbone.name, "weights": self.backbone.weights,
                "weights_sha256": self.backbone.weights_sha256, "projection": self.projection_info,
                "protocol": self.protocol.as_dict(), "precision": self.key["precision"],
                "text_weights_sha256": self.key["text_weights_sha256"], "cache": str(self.cache_path)}

    @property
    def vector_dim(self) -> int:
        """D', the width of a clip vector (the projection's output width may differ from D)."""
        if self.head is not None:  # the objective's model has ``embed``, not the head's ``out_dim``
            clip = torch.zeros(1, self.protocol.frames, len(self.protocol.levels),
                               pooled_dim(self.backbone.dim, self.protocol.pooling), device=self.device)
            with torch.no_grad():
                return int(self.head.embed(clip).shape[-1])
        zeros = torch.zeros(1, 1, self.backbone.dim, device=self.device)
        with torch.no_grad():
            cls, patches = project_tokens(zeros[:, 0], zeros, self.projection)
            return int(pool_frames(cls, patches, self.protocol.pooling, self.clip_text).shape[-1])

    def video_vectors(self, dataset: str, videos: list[ActionVideo]) -> tuple[np.ndarray, list[str]]:
        """Video vectors [V, D'] (mean over clips, float32) of the readable videos in order, and
        the names of the unreadable ones, skipped with a one-line UnreadableVideoWarning each."""
        rows, unreadable = [], []
        for video in tqdm(videos, desc=f"{dataset} clip features", unit="video", disable=None):
            try:
                rows.append(self.clip_vectors(dataset, video).mean(axis=0))
            except VideoError as e:
                warnings.warn(f"{first_line(e)}; video skipped", UnreadableVideoWarning, stacklevel=2)
                unreadable.append(video.name)
        if not rows:
            return np.zeros((0, self.vector_dim), np.float32), unreadable
        return np.stack(rows).astype(np.float32, copy=False), unreadable

    def clip_vectors(self, dataset: str, video: ActionVideo) -> np.ndarray:
        """Per-clip vectors [clips, D'] of one video, from the cache or computed and cached.

        Raises VideoError for a video that cannot be read, CacheError for a cached entry made from
        another source file (its size differs)."""
        name = f"{self.variant}/{dataset}/{video.name}"
        try:
            size = source_size(video.path)
        except OSError as e:
            raise VideoError(f"{video.path}: cannot read ({e.strerror or e})") from None
        array = self.cache.get(name)
        if array is None:
            array = self._compute(name, video, size)
        elif array.attrs.get("source_size") != size:
            raise CacheError(f"{self.cache_path}: cached clip features of {video.name} were made from a "
                             f"{array.attrs.get('source_size')}-byte source, {video.path} has {size} bytes; "
                             "use another cache")
        return np.asarray(self.cache.read(array), dtype=np.float32)

    def _compute(self, name: str, video: ActionVideo, size: int) -> zarr.Array:
        reader = open_video(video.path)
        indices = clip_indices(len(reader), self.protocol)
        # Overlapping or clamped clips share frames: decode and forward each frame once.
        unique, inverse = np.unique(indices, return_inverse=True)
        per_frame = self.frame_vectors(reader.get(unique.tolist()))
        clips = per_frame[torch.from_numpy(inverse.reshape(indices.shape)).to(per_frame.device)]
        with torch.no_grad():
            vectors = (self.head.embed(clips) if self.head is not None else clips.mean(dim=1)).float().cpu().numpy()
        attrs = {"frame_indices": indices.tolist(), "num_frames": len(reader), "source_size": size,
                 "source": video.path.name}

        def fill(array: zarr.Array) -> None:
            array[...] = vectors

        return self.cache.put(name, vectors.shape, "float32", fill, attrs, chunks=vectors.shape)

    def frame_vectors(self, frames: np.ndarray) -> torch.Tensor:
        """Pooled vectors [T, D'] (float32, on the device) of uint8 frames [T, H, W, 3]; [T, L, D']
        at the protocol's levels for a clip-level head."""
        out = []
        for lo in range(0, len(frames), self.batch_size):
            x = clip_input(frames[lo : lo + self.batch_size], self.backbone.image_size, self.protocol.resize)
            out.append(self._pool(x.to(self.device, non_blocking=True)))
        return torch.cat(out)

    @torch.no_grad()
    def _pool(self, images: torch.Tensor) -> torch.Tensor:
        # Only the backbone runs under the autocast; projection and pooling stay float32.
        with autocast(self.amp, self.device):
            if self.head is not None:
                return self.backbone.level_vectors(images, self.protocol.levels, self.protocol.pooling).float()
            cls, patches = self.backbone.tokens(images)
        cls = cls.float() if cls is not None else None
        cls, patches = project_tokens(cls, patches.float(), self.projection)
        return pool_frames(cls, patches, self.protocol.pooling, self.clip_text).float()
