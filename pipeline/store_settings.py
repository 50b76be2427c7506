"""What determines a feature store's content: the settings of each layout and the arrays they declare."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from .backbones import ALL, FINAL_NORM_KEY, final_norm_record
from .clips import LABELS
from .quant import DTYPE as INT8
from .quant import SCALE_DTYPE, scale_name

TOKEN_ARRAYS = ("a", "b", "a_asy")  # the batch arrays of a views store
CLIP_ARRAYS = ("tokens", "labels")  # the batch arrays of a clips store
LAYOUT_ARRAYS = {"views": TOKEN_ARRAYS, "clips": CLIP_ARRAYS}
# bench/store_codecs.py: zstd-shuffle compresses float16 and int8 tokens best, zstd (bitshuffle) hardly int8;
# none stays the default, as every codec saving >5% decoded at under 0.66x raw chunks' rate per CPU second.
COMPRESSORS = ("none", "zstd", "lz4", "zstd-shuffle")
AUTOCAST_KEY = "autocast"
DTYPES = ("float16", "float32", INT8)


class ArraySpec(NamedTuple):
    """One per-view array of a layout: [views, videos, ...] chunked [1, chunk_videos, ...]."""

    shape: tuple
    chunks: tuple
    dtype: str
    fill_value: int
    dimension_names: tuple


@dataclass(frozen=True)
class StoreSettings:
    """Everything that determines a store's content; writers and readers must agree on all of it."""

    backbone: str
    weights: str
    weights_sha256: str
    image_size: int
    grid: int
    dim: int
    dtype: str
    views: int
    clip_gap: float
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    asy_ratio: float
    seed: int
    num_videos: int
    videos_sha256: str
    chunk_videos: int
    compressor: str
    final_norm: str = ALL  # the backbone's token rule; recorded only when not "all"
    autocast: str | None = None  # the effective --amp; None: the device's default, not recorded
    layout: ClassVar[str] = "views"  # not recorded: a store without ``layout`` is a views store

    def as_dict(self) -> dict:
        d = asdict(self)
        d["crop_scale"], d["crop_ratio"] = list(self.crop_scale), list(self.crop_ratio)
        del d[FINAL_NORM_KEY], d[AUTOCAST_KEY]
        return d | final_norm_record(self.final_norm) | autocast_record(self.autocast)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def num_blocks(self) -> int:
        return -(-self.num_videos // self.chunk_videos)

    def arrays(self) -> dict[str, ArraySpec]:
        spec = ArraySpec((self.views, self.num_videos, self.tokens, self.dim),
                         (1, self.chunk_videos, self.tokens, self.dim), self.dtype, 0,
                         ("view", "video", "token", "channel"))
        return with_scales(dict.fromkeys(TOKEN_ARRAYS, spec))


@dataclass(frozen=True)
class ClipStoreSettings:
    """The settings of a clips store (``layout: "clips"``); ``plan_params`` are recorded flat."""

    backbone: str
    weights: str
    weights_sha256: str
    image_size: int
    depth: int  # blocks of the backbone
    backbone_dim: int  # D, the token width
    plan: str
    plan_params: dict
    frames: int  # T
    levels: tuple[int, ...]  # 1-based block indices
    pooling: str
    dim: int  # D', the pooled width
    dtype: str
    views: int  # K, pairs per video
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    seed: int
    num_videos: int
    videos_sha256: str
    chunk_videos: int
    compressor: str
    final_norm: str = ALL  # the backbone's token rule; recorded only when not "all"
    autocast: str | None = None  # the effective --amp; None: the device's default, not recorded
    layout: ClassVar[str] = "clips"

    def as_dict(self) -> dict:
        d = {"layout": self.layout, **asdict(self)}
        params = json.loads(json.dumps(d.pop("plan_params")))  # tuples -> lists, as read back
        d["levels"], d["crop_scale"], d["crop_ratio"] = list(self.levels), list(self.crop_scale), list(self.crop_ratio)
        del d[FINAL_NORM_KEY], d[AUTOCAST_KEY]
        return {**d, **params, **final_norm_record(self.final_norm), **autocast_record(self.autocast)}

    @property
    def num_blocks(self) -> int:
        return -(-self.num_videos // self.chunk_videos)

    def arrays(self) -> dict[str, ArraySpec]:
        k, v, c, t, n = self.views, self.num_videos, self.chunk_videos, self.frames, len(self.levels)
        return with_scales({
            "tokens": ArraySpec((k, v, 2, t, n, self.dim), (1, c, 2, t, n, self.dim), self.dtype, 0,
                                ("view", "video", "clip", "frame", "level", "channel")),
            "labels": ArraySpec((k, v, len(LABELS)), (1, c, len(LABELS)), "int16", -1, ("view", "video", "label")),
        })


def autocast_record(autocast: str | None) -> dict:
    """The settings entry of an autocast: none for the device's default (None), else ``{"autocast": it}``."""
    return {} if autocast is None else {AUTOCAST_KEY: autocast}


def with_scales(arrays: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
    """``arrays`` and, for each int8 token array, its per-token scale array (trailing dimension 1)."""
    scales = {scale_name(name): spec._replace(shape=spec.shape[:-1] + (1,), chunks=spec.chunks[:-1] + (1,),
                                              dtype=np.dtype(SCALE_DTYPE).name)
              for name, spec in arrays.items() if spec.dtype == INT8}
    return arrays | scales


def videos_digest(videos: list[str]) -> str:
    """sha256 of the ordered video list: two stores of the same list have the same digest."""
    return hashlib.sha256("\n".join(videos).encode("utf-8")).hexdigest()
