"""The feature store: a Zarr v3 group of cached backbone tokens, self-describing and shard-safe.

Layout of ``NAME.zarr`` (V videos, K views per video, T tokens of dim D, blocks of C videos):

- ``a``, ``b``, ``a_asy``: [K, V, T, D] tokens of frame a, frame b, and frame a with the asymmetric
  positional embedding; chunks [1, C, T, D], so epoch e reads view e mod K as whole chunks and the
  writer of video block c owns every chunk it writes (no two processes share a chunk).
- ``valid``: [V] bool, False for a video that was skipped (its token rows stay zero).
- ``done``: [number of blocks] uint8, one chunk per element: block c's completeness flag, set last,
  after its tokens and its manifest part, by the only process that writes block c.
- ``videos``: [V] relative video paths, in row order.
- group attributes ``cosettle_store``: format version, the settings every writer must share,
  environment versions, creation time, and ``complete`` once every block is done.

The settings include the backbone's token rule (``final_norm``, ``cosettle.pipeline.backbones``) when
it is not ``"all"``; a store without it was made with every token normalised (as every store was
before rules existed), so stores of ``"all"`` backbones read and compare as they always did. A store
made with another rule than its backbone's registered one (an ``ijepa_vitb`` store made before its
"asy-only" rule) is refused: ``create_or_open`` (resume, join) compares the rules explicitly, and
``open_store`` (training) refuses it, so it is never mixed with tokens of the current rule.

The settings record the forward pass's autocast (``autocast``: none, bf16 or fp16, the effective
``--amp``) only when it is not what ``--amp auto`` gives on the device that made it (bf16 on CUDA,
float32 on CPU), which is what every store was made with before the option existed: those keep
their settings, and a store without ``autocast`` is resumed or joined only by a run with that default.

Beside it, ``NAME.manifest/part-BLOCK.parquet``: one row per (video, view) with what was sampled.

That is the ``views`` layout (settings without a ``layout`` key). A ``clips`` store (settings
``layout: "clips"``, ``ClipStoreSettings``) has the same ``valid``, ``done``, ``videos``, blocks and
manifest parts, and instead of ``a``, ``b``, ``a_asy``: ``tokens`` [K, V, 2, T, L, D'] (K pairs, two
clips of T frames, L levels of pooled D'-wide vectors), chunks [1, C, 2, T, L, D'], and ``labels``
[K, V, 6] int16 (``clips.LABELS``), chunks [1, C, 6]. ``FeatureStore.batch_arrays`` names the arrays
of a layout that a training batch carries.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from cosettle.core.provenance import environment, mismatches, now_utc

from .backbones import ALL, BACKBONES, FINAL_NORM_KEY, final_norm_record
from .clips import LABELS

FORMAT = 1
ATTR = "cosettle_store"
TOKEN_ARRAYS = ("a", "b", "a_asy")  # the batch arrays of a views store
CLIP_ARRAYS = ("tokens", "labels")  # the batch arrays of a clips store
LAYOUT_ARRAYS = {"views": TOKEN_ARRAYS, "clips": CLIP_ARRAYS}
COMPRESSORS = ("none", "zstd", "lz4")
AUTOCAST_KEY = "autocast"


class ArraySpec(NamedTuple):
    """One per-view array of a layout: [views, videos, ...] chunked [1, chunk_videos, ...]."""

    shape: tuple
    chunks: tuple
    dtype: str
    fill_value: int
    dimension_names: tuple


class StoreError(Exception):
    """A store that cannot be used as asked; the message names the store and the problem."""


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
        return dict.fromkeys(TOKEN_ARRAYS, spec)


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
        return {
            "tokens": ArraySpec((k, v, 2, t, n, self.dim), (1, c, 2, t, n, self.dim), self.dtype, 0,
                                ("view", "video", "clip", "frame", "level", "channel")),
            "labels": ArraySpec((k, v, len(LABELS)), (1, c, len(LABELS)), "int16", -1, ("view", "video", "label")),
        }


def autocast_record(autocast: str | None) -> dict:
    """The settings entry of an autocast: none for the device's default (None), else ``{"autocast": it}``."""
    return {} if autocast is None else {AUTOCAST_KEY: autocast}


def token_rule(settings: dict) -> str:
    """The token rule a store was made with: its ``final_norm``, ``"all"`` when none is recorded."""
    return settings.get(FINAL_NORM_KEY, ALL)


def rule_mismatch(store: FeatureStore) -> str | None:
    """'final_norm: expected R, found S' when ``store`` was made with another token rule than its
    backbone's registered one (None for a match or an unregistered backbone, e.g. synthetic)."""
    spec = BACKBONES.get(store.settings.get("backbone"))
    found = token_rule(store.settings)
    if spec is None or found == spec.final_norm:
        return None
    return f"{FINAL_NORM_KEY}: expected {spec.final_norm!r}, found {found!r}"


def videos_digest(videos: list[str]) -> str:
    """sha256 of the ordered video list: two stores of the same list have the same digest."""
    return hashlib.sha256("\n".join(videos).encode("utf-8")).hexdigest()


def manifest_dir(path: Path) -> Path:
    """``NAME.manifest`` beside the store ``NAME.zarr``."""
    return Path(path).with_suffix(".manifest")


def _codecs(name: str):
    if name == "none":
        return None
    if name in ("zstd", "lz4"):
        return zarr.codecs.BloscCodec(cname=name, clevel=3, shuffle="bitshuffle")
    raise StoreError(f"unknown compressor '{name}'; choose one of {', '.join(COMPRESSORS)}")


class FeatureStore:
    """An open feature store (see the module docstring for the layout)."""

    def __init__(self, path: Path, mode: str = "r"):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode=mode, zarr_format=3)
        except Exception as e:
            raise StoreError(f"{self.path}: not a Zarr v3 feature store ({type(e).__name__}: {e})") from None
        meta = self.group.attrs.get(ATTR)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{self.path}: not a cosettle feature store (format {FORMAT} attributes missing)")
        self.meta = meta
        self.settings = meta["settings"]
        self.layout = self.settings.get("layout", "views")
        if self.layout not in LAYOUT_ARRAYS:
            raise StoreError(f"{self.path}: unknown store layout {self.layout!r} (this cosettle reads "
                             f"{', '.join(LAYOUT_ARRAYS)})")

    @property
    def batch_arrays(self) -> tuple[str, ...]:
        """The arrays a training batch carries: ("a", "b", "a_asy") or ("tokens", "labels")."""
        return LAYOUT_ARRAYS[self.layout]

    @property
    def num_blocks(self) -> int:
        return -(-self.settings["num_videos"] // self.settings["chunk_videos"])

    def block_rows(self, block: int) -> tuple[int, int]:
        """Video rows [lo, hi) of a block."""
        c = self.settings["chunk_videos"]
        return block * c, min((block + 1) * c, self.settings["num_videos"])

    def done(self) -> np.ndarray:
        return self.group["done"][:].astype(bool)

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def videos(self) -> list[str]:
        return [str(v) for v in self.group["videos"][:]]

    def valid(self) -> np.ndarray:
        return self.group["valid"][:]

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def write_block(self, block: int, tokens: dict[str, np.ndarray], valid: np.ndarray, manifest: pa.Table) -> None:
        """Write one block's ``batch_arrays`` [K, rows, ...], validity and manifest, then mark it done."""
        lo, hi = self.block_rows(block)
        for name in self.batch_arrays:
            self.group[name][:, lo:hi] = tokens[name]
        self.group["valid"][lo:hi] = valid
        mdir = manifest_dir(self.path)
        mdir.mkdir(exist_ok=True)
        part = mdir / f"part-{block:06d}.parquet"
        tmp = part.with_suffix(f".tmp-{uuid.uuid4().hex}")
        pq.write_table(manifest, tmp)
        os.replace(tmp, part)  # a reader never sees half a part
        self.group["done"][block] = 1

    def mark_complete_if_done(self) -> bool:
        """Record ``complete`` in the attributes once every block is done (idempotent)."""
        if not self.complete:
            return False
        if not self.meta.get("complete"):
            self.meta = dict(self.meta, complete=True, completed=now_utc())
            self.group.attrs[ATTR] = self.meta
        return True

    def manifest(self) -> pa.Table:
        """The whole manifest (one row per video and view), in row order."""
        files = sorted(manifest_dir(self.path).glob("part-*.parquet"))
        if not files:
            raise StoreError(f"{manifest_dir(self.path)}: no manifest parts")
        return pa.concat_tables([pq.read_table(f) for f in files]).sort_by([("video_index", "ascending"), ("view", "ascending")])

    def check_complete(self) -> None:
        """Raise unless every block is done."""
        done = self.done()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise StoreError(
                f"{self.path}: incomplete store, {len(missing)} of {len(done)} blocks missing "
                f"(first: {missing[:5].tolist()}); finish it with cosettle-extract --resume"
            )


def _initialise(path: Path, settings: StoreSettings | ClipStoreSettings, videos: list[str]) -> None:
    """Create a fresh store at ``path`` (which must not exist)."""
    s = settings
    g = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for name, spec in s.arrays().items():
        g.create_array(name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=spec.fill_value,
                       compressors=_codecs(s.compressor), dimension_names=spec.dimension_names)
    g.create_array("valid", shape=(s.num_videos,), chunks=(s.chunk_videos,), dtype=bool, fill_value=False)
    g.create_array("done", shape=(s.num_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
    g.create_array("videos", shape=(s.num_videos,), chunks=(s.num_videos,), dtype=str)[:] = np.array(videos)
    g.attrs[ATTR] = {"format": FORMAT, "settings": s.as_dict(), "environment": environment(),
                     "created": now_utc(), "complete": False}


def create_or_open(path: Path, settings: StoreSettings | ClipStoreSettings, videos: list[str], *, resume: bool,
                   overwrite: bool, join: bool, default_autocast: str = "none") -> FeatureStore:
    """Open the store a writer fills, creating it atomically if it does not exist.

    ``join`` (sharded runs) and ``resume`` accept an existing store with identical settings; a
    complete store is only replaced with ``overwrite``; any settings difference is an error. A store
    without ``autocast`` was made with ``default_autocast`` (that of ``--amp auto`` on this device).
    """
    path = Path(path)
    if overwrite and path.exists():
        shutil.rmtree(path)
        shutil.rmtree(manifest_dir(path), ignore_errors=True)
    if not path.exists():
        # Build aside and rename: concurrent shards race here, and exactly one rename wins.
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        _initialise(tmp, settings, videos)
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp)
            if not path.exists():
                raise
        else:
            return FeatureStore(path, mode="r+")
        join = True  # another shard created it first
    store = FeatureStore(path, mode="r+")
    if store.layout != settings.layout:
        raise StoreError(f"{path}: a {store.layout} store, this run writes a {settings.layout} store; "
                         "use another path or --overwrite")
    # the token rule explicitly on both sides: a missing ``final_norm`` is "all", whichever side lacks it
    # and the autocast: a missing one is the device's default
    rule = {FINAL_NORM_KEY: settings.final_norm, AUTOCAST_KEY: settings.autocast or default_autocast}
    found = {FINAL_NORM_KEY: token_rule(store.settings),
             AUTOCAST_KEY: store.settings.get(AUTOCAST_KEY, default_autocast)}
    diff = mismatches(settings.as_dict() | rule, store.settings | found)
    if diff:
        raise StoreError(f"{path}: made with other settings ({'; '.join(diff)}); use another path or --overwrite")
    if store.complete:
        if not (resume or join):
            raise StoreError(f"{path}: store is complete; pass --overwrite to rebuild it")
    elif not (resume or join):
        raise StoreError(f"{path}: an unfinished store exists; pass --resume to continue it or --overwrite")
    return store


def open_store(path: Path) -> FeatureStore:
    """Open a finished store for reading; refuses an incomplete one, and one made with another token
    rule than its backbone's registered one (its tokens are not what the backbone now gives)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such feature store")
    store = FeatureStore(path, mode="r")
    store.check_complete()
    wrong = rule_mismatch(store)
    if wrong:
        raise StoreError(f"{path}: made with other settings ({wrong}, {store.settings['backbone']}'s token rule); "
                         "extract it again with --overwrite")
    return store
