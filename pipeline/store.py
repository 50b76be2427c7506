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

The settings include the backbone's token rule (``final_norm``) only when it is not ``"all"``, so
older stores of ``"all"`` backbones stay valid; a store made with another rule than its backbone's
current one is refused by ``create_or_open`` (resume, join) and ``open_store`` (training).

The settings record the forward pass's autocast (``autocast``, the effective ``--amp``) only when it
is not what ``--amp auto`` gives on the device (bf16 on CUDA, float32 on CPU), as every store was made
before the option existed; a store without it is resumed or joined only with that default.

Beside it, ``NAME.manifest/part-BLOCK.parquet``: one row per (video, view) with what was sampled.

That is the ``views`` layout (settings without a ``layout`` key). A ``clips`` store (settings
``layout: "clips"``, ``ClipStoreSettings``) has the same ``valid``, ``done``, ``videos``, blocks and
manifest parts, and instead of ``a``, ``b``, ``a_asy``: ``tokens`` [K, V, 2, T, L, D'] (K pairs, two
clips of T frames, L levels of pooled D'-wide vectors), chunks [1, C, 2, T, L, D'], and ``labels``
[K, V, 6] int16 (``clips.LABELS``), chunks [1, C, 6]. ``FeatureStore.batch_arrays`` names the arrays
of a layout that a training batch carries.

A store of ``dtype: "int8"`` (either layout) holds each token array as int8 codes, and beside it
``NAME_scale``: float32 per-token scales, the token array's shape and chunks with a trailing 1
(``quant``). The store quantises in ``write_block`` and decodes in ``read``, which every reader uses.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from cosettle.core.atomic import naming_failures, write_atomic
from cosettle.core.errors import first_line
from cosettle.core.provenance import environment, mismatches, now_utc

from .backbones import ALL, BACKBONES, FINAL_NORM_KEY
from .chunk_reads import DamagedChunk, read_rows
from .quant import dequantize, quantize, scale_name
from .store_settings import AUTOCAST_KEY, COMPRESSORS, LAYOUT_ARRAYS, ClipStoreSettings, StoreSettings

FORMAT = 1
ATTR = "cosettle_store"
class StoreError(Exception):
    """A store that cannot be used as asked; the message names the store and the problem."""


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


def manifest_dir(path: Path) -> Path:
    """``NAME.manifest`` beside the store ``NAME.zarr``."""
    return Path(path).with_suffix(".manifest")


def _codecs(name: str):
    if name == "none":
        return None
    if name in ("zstd", "lz4"):
        return zarr.codecs.BloscCodec(cname=name, clevel=3, shuffle="bitshuffle")
    if name == "zstd-shuffle":
        return zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
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
        self._arrays: dict[str, zarr.Array] = {}
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
        if name not in self._arrays:  # opening reads the array's metadata: once per store, not per chunk
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def read(self, name: str, view: int, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of batch array ``name`` at ``view`` as readers use them: the int8 tokens of an
        int8 store decoded to float32 (``quant.dequantize``), every other array as stored."""
        values = self._read_rows(name, view, lo, hi)
        if values.dtype != np.int8:
            return values
        return dequantize(values, self._read_rows(scale_name(name), view, lo, hi))

    def _read_rows(self, name: str, view: int, lo: int, hi: int) -> np.ndarray:
        try:
            return read_rows(self.array(name), (view,), lo, hi)
        except DamagedChunk as d:
            where = self.path / name / d.key if d.key else self.path / name
            raise StoreError(f"{where}: damaged chunk, cannot be read ({first_line(d.error)}); "
                             "extract the store again") from None

    def write_block(self, block: int, tokens: dict[str, np.ndarray], valid: np.ndarray, manifest: pa.Table) -> None:
        """Write one block's ``batch_arrays`` [K, rows, ...] (float tokens, quantised here for an int8
        store), validity and manifest, then mark it done."""
        lo, hi = self.block_rows(block)
        for name in self.batch_arrays:
            with naming_failures(self.path / name):  # zarr writes each chunk aside and renames it
                if self.array(name).dtype == np.int8:
                    codes, scales = quantize(tokens[name])
                    self.array(scale_name(name))[:, lo:hi] = scales
                    self.array(name)[:, lo:hi] = codes
                else:
                    self.array(name)[:, lo:hi] = tokens[name]
        with naming_failures(self.path / "valid"):
            self.group["valid"][lo:hi] = valid
        manifest_dir(self.path).mkdir(exist_ok=True)
        write_atomic(self.manifest_part(block), lambda tmp: pq.write_table(manifest, tmp))
        with naming_failures(self.path / "done"):
            self.group["done"][block] = 1

    def mark_complete_if_done(self) -> bool:
        """Record ``complete`` in the attributes once every block is done (idempotent)."""
        if not self.complete:
            return False
        if not self.meta.get("complete"):
            self.meta = dict(self.meta, complete=True, completed=now_utc())
            self.group.attrs[ATTR] = self.meta
        return True

    def manifest_part(self, block: int) -> Path:
        return manifest_dir(self.path) / f"part-{block:06d}.parquet"

    def finished_blocks(self) -> np.ndarray:
        """Blocks done and with their manifest part (one whose part was deleted is done again)."""
        return self.done() & np.array([self.manifest_part(c).is_file() for c in range(self.num_blocks)], dtype=bool)

    def check_manifest(self, missing_ok: bool = False) -> None:
        """Raise unless the manifest part of every done block reads with its videos x views rows
        (the parts' footers only); ``missing_ok``: a missing part is left to be done again."""
        for block in np.flatnonzero(self.done()).tolist():
            part, (lo, hi) = self.manifest_part(block), self.block_rows(block)
            if not part.is_file():
                if missing_ok:
                    continue
                raise StoreError(f"{part}: the manifest part of finished block {block} is missing; run "
                                 "cosettle-extract --resume to extract the block again")
            try:
                rows = pq.read_metadata(part).num_rows
            except (OSError, ValueError) as e:  # pyarrow: ArrowIOError (OSError), ArrowInvalid (ValueError)
                raise StoreError(f"{part}: damaged manifest part of block {block} ({first_line(e)}); delete it and "
                                 f"run cosettle-extract --resume to extract the block again") from None
            if rows != (hi - lo) * self.settings["views"]:
                raise StoreError(f"{part}: {rows} manifest rows, block {block} has {(hi - lo) * self.settings['views']} "
                                 "(videos x views); delete it and run cosettle-extract --resume")

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


def _initialise(path: Path | zarr.abc.store.Store, settings: StoreSettings | ClipStoreSettings,
                videos: list[str]) -> None:
    """Create a fresh store at ``path`` (which must not exist), or in a Zarr store object."""
    s = settings
    g = zarr.open_group(path, mode="w-", zarr_format=3)
    for name, spec in s.arrays().items():
        g.create_array(name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=spec.fill_value,
                       compressors=_codecs(s.compressor), dimension_names=spec.dimension_names)
    g.create_array("valid", shape=(s.num_videos,), chunks=(s.chunk_videos,), dtype=bool, fill_value=False)
    g.create_array("done", shape=(s.num_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
    g.create_array("videos", shape=(s.num_videos,), chunks=(s.num_videos,), dtype=str)[:] = np.array(videos)
    g.attrs[ATTR] = {"format": FORMAT, "settings": s.as_dict(), "environment": environment(),
                     "created": now_utc(), "complete": False}


def declared_arrays(settings: StoreSettings | ClipStoreSettings, videos: list[str]) -> tuple[dict[str, zarr.Array], int]:
    """Every array a fresh store of ``settings`` declares, and the bytes written at creation (metadata,
    attributes, the video list), from a copy made in memory: nothing touches the disk."""
    contents: dict = {}
    _initialise(zarr.storage.MemoryStore(contents), settings, videos)
    group = zarr.open_group(zarr.storage.MemoryStore(contents), mode="r", zarr_format=3)
    return dict(group.arrays()), sum(len(buffer) for buffer in contents.values())


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
    store.check_manifest(missing_ok=True)
    return store


def open_store(path: Path) -> FeatureStore:
    """Open a finished store for reading; refuses an incomplete one, and one made with another token
    rule than its backbone's registered one (its tokens are not what the backbone now gives)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such feature store")
    store = FeatureStore(path, mode="r")
    store.check_complete()
    store.check_manifest()
    wrong = rule_mismatch(store)
    if wrong:
        raise StoreError(f"{path}: made with other settings ({wrong}, {store.settings['backbone']}'s token rule); "
                         "extract it again with --overwrite")
    return store
