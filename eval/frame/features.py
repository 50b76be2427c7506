"""Frame features for label propagation, cached per backbone in a Zarr v3 store.

One store holds the backbone features of one (backbone, weights, input sizing, normalisation):
``<dataset>/<video>`` is a float16 array [T, h, w, D] (one chunk per frame) whose attributes
name the frames it was computed from; the group attribute ``cosettle_eval_features`` records
the key and the environment. A projection is applied when the cached features are read, so
comparing many projections of one backbone computes the backbone features once.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from cosettle.core.provenance import environment, mismatches, now_utc
from cosettle.eval.frame.datasets import Video, read_frame
from cosettle.eval.frame.propagation import PropagationSettings, grid_size
from cosettle.pipeline.backbones import Backbone
from cosettle.pipeline.transforms import normalize, to_float

ATTR = "cosettle_eval_features"
FORMAT = 1
DEFAULT_DIR = Path("eval_cache")


class CacheError(Exception):
    """A features cache that cannot be used as asked; the message names the store."""


def cache_key(backbone: Backbone, settings: PropagationSettings) -> dict:
    """What decides the cached features: the backbone and its weights, input sizing and normalisation."""
    sizing = {"size": list(settings.size)} if settings.size else {"short_side": settings.short_side,
                                                                   "multiple": settings.multiple}
    return {
        "format": FORMAT, "backbone": backbone.name, "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256, "dim": backbone.dim, "depth": len(backbone.model.blocks),
        "patch_size": backbone.patch_size, "input": sizing, "mean": list(settings.mean), "std": list(settings.std),
        "resize": "bilinear, no antialiasing (cv2.INTER_LINEAR)", "dtype": "float16",
    }


def default_cache_path(key: dict) -> Path:
    """``eval_cache/<backbone>_<weights sha256[:12]>_<key digest[:12]>.zarr``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return DEFAULT_DIR / f"{key['backbone']}_{key['weights_sha256'][:12]}_{digest[:12]}.zarr"


def frames_fingerprint(frames: tuple[Path, ...]) -> str:
    """sha256 over the frame file names and sizes: a cheap check that a video is the one cached."""
    h = hashlib.sha256()
    for f in frames:
        h.update(f"{f.name}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()


class FeatureCache:
    """An open features cache (see the module docstring); created if ``path`` does not exist."""

    def __init__(self, path: Path, key: dict):
        self.path = Path(path)
        if self.path.exists():
            try:
                self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
            except Exception as e:
                raise CacheError(f"{self.path}: not a Zarr v3 features cache ({type(e).__name__}: {e})") from None
            meta = self.group.attrs.get(ATTR)
            if not isinstance(meta, dict) or "key" not in meta:
                raise CacheError(f"{self.path}: not a cosettle features cache ({ATTR} attributes missing)")
            diff = mismatches(key, meta["key"])
            if diff:
                raise CacheError(f"{self.path}: features cache made with other settings ({'; '.join(diff)}); "
                                 "use another --cache")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
            self.group.attrs[ATTR] = {"key": key, "environment": environment(), "created": now_utc()}
        self.key = key

    def get(self, name: str, video: Video) -> zarr.Array | None:
        """The complete cached features of ``video``, or None; an entry of other frames is an error."""
        array = self.group.get(name)
        if array is None or not array.attrs.get("complete"):
            return None
        found = array.attrs.get("frames_sha256")
        if found != frames_fingerprint(video.frames):
            raise CacheError(f"{self.path}: cached features of {name} were made from other frames "
                             f"than {video.frames[0].parent}; use another --cache")
        return array

    def create(self, name: str, video: Video, shape: tuple[int, ...], source_hw: tuple[int, int],
               input_hw: tuple[int, int]) -> zarr.Array:
        """A fresh (incomplete) entry; any unfinished one under that name is replaced."""
        array = self.group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype="float16", fill_value=0,
                                        compressors=None, overwrite=True,
                                        dimension_names=("frame", "row", "column", "channel"))
        array.attrs.update({"frames": [f.name for f in video.frames], "frames_sha256": frames_fingerprint(video.frames),
                            "source_hw": list(source_hw), "input_hw": list(input_hw), "complete": False})
        return array


class FeatureSource:
    """Per-frame features of evaluation videos: backbone features from the cache (computed on a
    miss), then the projection if one is given, on ``device``."""

    def __init__(self, backbone: Backbone, settings: PropagationSettings, cache: Path | None = None,
                 projection: torch.nn.Module | None = None, device: torch.device | str = "cpu", batch_size: int = 8):
        self.backbone = backbone
        self.settings = settings
        key = cache_key(backbone, settings)
        self.cache = FeatureCache(Path(cache) if cache is not None else default_cache_path(key), key)
        self.device = torch.device(device)
        self.projection = projection.to(self.device).eval() if projection is not None else None
        self.batch_size = batch_size

    @property
    def patch(self) -> int:
        return self.backbone.patch_size

    def backbone_features(self, dataset: str, video: Video) -> zarr.Array:
        """The cached backbone features [T, h, w, D] of a video, computed first if missing."""
        name = f"{dataset}/{video.name}"
        array = self.cache.get(name, video)
        if array is None:
            array = self._compute(name, video)
        return array

    def _compute(self, name: str, video: Video) -> zarr.Array:
        first = read_frame(video.frames[0])
        source_hw = first.shape[:2]
        input_hw = self.settings.input_size(*source_hw)
        h, w = grid_size(input_hw, self.patch)
        array = self.cache.create(name, video, (len(video.frames), h, w, self.backbone.dim), source_hw, input_hw)
        for lo in range(0, len(video.frames), self.batch_size):
            paths = video.frames[lo : lo + self.batch_size]
            frames = [read_frame(p) for p in paths]
            for p, f in zip(paths, frames):
                if f.shape[:2] != source_hw:
                    raise CacheError(f"{p}: frame is {f.shape[1]}x{f.shape[0]} but {video.frames[0].name} is "
                                     f"{source_hw[1]}x{source_hw[0]}")
            x = F.interpolate(to_float(np.stack(frames)), size=input_hw, mode="bilinear", align_corners=False,
                              antialias=False)
            x = normalize(x, self.settings.mean, self.settings.std).to(self.device)
            tokens = self.backbone.patch_features(x)
            array[lo : lo + len(paths)] = tokens.reshape(len(paths), h, w, -1).to(torch.float16).cpu().numpy()
        array.attrs["complete"] = True  # set last: an interrupted entry is recomputed next time
        return array

    def features(self, dataset: str, video: Video, num_frames: int | None = None) -> Iterator[torch.Tensor]:
        """Features [h, w, D] (float32, on the device) of the first ``num_frames`` frames, in order."""
        array = self.backbone_features(dataset, video)
        total = array.shape[0] if num_frames is None else num_frames
        for lo in range(0, total, self.batch_size):
            block = torch.from_numpy(array[lo : min(total, lo + self.batch_size)]).to(self.device).float()
            if self.projection is not None:
                with torch.no_grad():
                    block = self.projection(block)
            yield from block
