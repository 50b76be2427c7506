"""Frame features for label propagation, cached per backbone in a Zarr v3 store.

One store holds the backbone features of one (backbone, weights, input sizing, normalisation):
``<dataset>/<video>`` is a float16 array [T, h, w, D] (one chunk per frame) whose attributes
name the frames it was computed from; the group attribute ``cosettle_eval_features`` records
the key and the environment. Entries are computed privately and published whole
(``cosettle.eval.zarr_cache``), so evaluations of one backbone may fill one cache at once.

The backbone runs in float32 unless ``amp`` (``--amp``, ``cosettle.core.precision``) asks for an
autocast; the key records it only then, so caches made before the option keep their key.

A trained projection is applied once per frame: its features are an entry of their own,
``run-<digest of the module's class and weights>/<dataset>/<video>`` (float32 [T, h, w, D'],
exactly what projecting the backbone entry on read gives), computed from the backbone entry on
first use. So comparing many projections of one backbone computes the backbone features once,
and evaluating one projection several times projects each frame once.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from cosettle.core.precision import autocast, resolve_amp
from cosettle.eval.frame.datasets import Video, read_frame
from cosettle.eval.frame.propagation import PropagationSettings, grid_size
from cosettle.eval.zarr_cache import CacheError, ZarrCache
from cosettle.pipeline.backbones import Backbone, final_norm_record
from cosettle.pipeline.transforms import normalize, to_float
from cosettle.trainer.release_format import state_digest

ATTR = "cosettle_eval_features"
FORMAT = 2  # 2: entries published whole by rename (1 marked them "complete" in place)
DEFAULT_DIR = Path("eval_cache")
# CacheError (defined in cosettle.eval.zarr_cache) stays importable from here: the CLI imports it from this module


def cache_key(backbone: Backbone, settings: PropagationSettings, amp: str = "none") -> dict:
    """What decides the cached features: the backbone and its weights, its token rule (``final_norm``,
    only when not "all": caches of "all" backbones keep their key), input sizing, normalisation and
    the effective autocast ``amp`` (only when not "none", for the same reason)."""
    sizing = {"size": list(settings.size)} if settings.size else {"short_side": settings.short_side,
                                                                   "multiple": settings.multiple}
    return {
        "format": FORMAT, "backbone": backbone.name, "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256, "dim": backbone.dim, "depth": len(backbone.model.blocks),
        "patch_size": backbone.patch_size, "input": sizing, "mean": list(settings.mean), "std": list(settings.std),
        "resize": "bilinear, no antialiasing (cv2.INTER_LINEAR)", "dtype": "float16",
        **final_norm_record(backbone.final_norm), **({"autocast": amp} if amp != "none" else {}),
    }


def projection_variant(projection: torch.nn.Module) -> str:
    """The entries' top folder of a projection: ``run-`` + the digest of its class and weights."""
    kind = f"{type(projection).__module__}.{type(projection).__qualname__}"
    return "run-" + hashlib.sha256(f"{kind}\n{state_digest(projection.state_dict())}".encode()).hexdigest()[:16]


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
        self.store = ZarrCache(path, key, ATTR)
        self.path, self.key, self.group = self.store.path, key, self.store.group

    def get(self, name: str, video: Video) -> zarr.Array | None:
        """The cached features of ``video``, or None; an entry of other frames is an error."""
        array = self.store.get(name)
        return None if array is None else self._checked(name, video, array)

    def put(self, name: str, video: Video, shape: tuple[int, ...], source_hw: tuple[int, int],
            input_hw: tuple[int, int], fill: Callable[[zarr.Array], None], dtype: str = "float16") -> zarr.Array:
        """Features written by ``fill`` into a private array, then published (or those another
        process published first)."""
        attrs = {"frames": [f.name for f in video.frames], "frames_sha256": frames_fingerprint(video.frames),
                 "source_hw": list(source_hw), "input_hw": list(input_hw)}
        array = self.store.put(name, shape, dtype, fill, attrs, chunks=(1, *shape[1:]))
        return self._checked(name, video, array)  # another process may have cached other frames

    def _checked(self, name: str, video: Video, array: zarr.Array) -> zarr.Array:
        if array.attrs.get("frames_sha256") != frames_fingerprint(video.frames):
            raise CacheError(f"{self.path}: cached features of {name} were made from other frames "
                             f"than {video.frames[0].parent}; use another --cache")
        return array


class FeatureSource:
    """Per-frame features of evaluation videos, on ``device``: backbone features from the cache
    (computed on a miss, under the ``amp`` autocast), or a projection's, cached as their own entry."""

    def __init__(self, backbone: Backbone, settings: PropagationSettings, cache: Path | None = None,
                 projection: torch.nn.Module | None = None, device: torch.device | str = "cpu", batch_size: int = 8,
                 amp: str = "none"):
        self.backbone = backbone
        self.settings = settings
        self.device = torch.device(device)
        self.amp = resolve_amp(amp, self.device)
        key = cache_key(backbone, settings, self.amp)
        self.cache = FeatureCache(Path(cache) if cache is not None else default_cache_path(key), key)
        self.projection = projection.to(self.device).eval() if projection is not None else None
        self.variant = projection_variant(self.projection) if projection is not None else None
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

        def fill(array: zarr.Array) -> None:
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
                with torch.no_grad(), autocast(self.amp, self.device):
                    tokens = self.backbone.patch_features(x)
                array[lo : lo + len(paths)] = tokens.reshape(len(paths), h, w, -1).to(torch.float16).cpu().numpy()

        shape = (len(video.frames), h, w, self.backbone.dim)
        return self.cache.put(name, video, shape, source_hw, input_hw, fill)

    def projected_features(self, dataset: str, video: Video) -> zarr.Array:
        """The projection's features [T, h, w, D'] (float32) of a video, projected once from the
        cached backbone features on a miss."""
        name = f"{self.variant}/{dataset}/{video.name}"
        array = self.cache.get(name, video)
        if array is not None:
            return array
        source = self.backbone_features(dataset, video)
        with torch.no_grad():
            width = self.projection(torch.zeros(1, source.shape[-1], device=self.device)).shape[-1]

        def fill(out: zarr.Array) -> None:
            for lo in range(0, source.shape[0], self.batch_size):
                block = torch.from_numpy(self.cache.store.read(source, lo, lo + self.batch_size)).to(self.device).float()
                with torch.no_grad():
                    out[lo : lo + len(block)] = self.projection(block).float().cpu().numpy()

        return self.cache.put(name, video, (*source.shape[:-1], width), tuple(source.attrs["source_hw"]),
                              tuple(source.attrs["input_hw"]), fill, dtype="float32")

    def features(self, dataset: str, video: Video, num_frames: int | None = None) -> Iterator[torch.Tensor]:
        """Features [h, w, D] (the projection's [h, w, D'] if one is given; float32, on the device) of
        the first ``num_frames`` frames, in order."""
        if self.projection is None:
            array = self.backbone_features(dataset, video)
        else:
            array = self.projected_features(dataset, video)
        total = array.shape[0] if num_frames is None else num_frames
        for lo in range(0, total, self.batch_size):
            yield from torch.from_numpy(self.cache.store.read(array, lo, min(total, lo + self.batch_size))).to(self.device).float()
