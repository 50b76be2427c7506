"""The shared Zarr cache under concurrency: two processes creating and filling one cache at once,
a writer killed mid-fill, a cache of other settings, and the frame features cache on top of it."""
import multiprocessing as mp
import os
import queue as queue_module
import signal
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from cosettle.eval.zarr_cache import CacheError, ZarrCache

ATTR = "test_cache"
KEY = {"format": 1, "what": ("rows", 5)}
NAMES = ["a", "x/y/b", "x/y/c", "x/z/d"]
SHAPE = (4, 5)
CTX = mp.get_context("spawn")


def values(name: str) -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + zlib.crc32(name.encode()) % 97


def row_fill(name: str, delay: float = 0.0, calls: list | None = None):
    """A fill writing ``values(name)`` row by row, ``delay`` seconds per row."""
    def fill(array: zarr.Array) -> None:
        if calls is not None:
            calls.append(name)
        for i, row in enumerate(values(name)):
            array[i] = row
            time.sleep(delay)
    return fill


def put_all(cache: ZarrCache, barrier=None, delay: float = 0.0) -> list[str]:
    calls: list[str] = []
    for name in NAMES:
        if barrier is not None:
            barrier.wait(30)  # both writers reach each put together
        got = cache.put(name, SHAPE, "float32", row_fill(name, delay, calls), {"name": name}, chunks=(1, 5))
        np.testing.assert_array_equal(got[:], values(name))
    return calls


def report(queue, work) -> None:
    """Run ``work()`` in a child and send back ("ok", result) or ("error", traceback)."""
    try:
        queue.put(("ok", work()))
    except BaseException:  # noqa: BLE001 - any failure goes back to the test as text
        queue.put(("error", traceback.format_exc()))


def put_worker(path: str, barrier, queue) -> None:
    def work():
        barrier.wait(30)  # open (and so create) the new cache at the same moment
        return put_all(ZarrCache(Path(path), KEY, ATTR), barrier, delay=0.05)
    report(queue, work)


def killed_worker(path: str, started) -> None:
    cache = ZarrCache(Path(path), KEY, ATTR)

    def fill(array: zarr.Array) -> None:
        array[0] = 1
        started.set()
        time.sleep(120)  # killed here

    cache.put("v/killed", SHAPE, "float32", fill, {})


def results(procs, queue, timeout: float = 60) -> list:
    """The children's results; fails on a child's error, or on one that died without a word."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < len(procs):
        try:
            out.append(queue.get(timeout=1))
        except queue_module.Empty:
            assert time.monotonic() < deadline, "the child processes did not answer in time"
            assert not all(p.exitcode is not None for p in procs) or not queue.empty(), \
                f"child processes died: exit codes {[p.exitcode for p in procs]}"
    for p in procs:
        p.join(timeout)
    errors = [r for kind, r in out if kind == "error"]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs)
    return [r for _, r in out]


def entries(group: zarr.Group) -> dict:
    return {name: (node[:], node.dtype, node.chunks, dict(node.attrs))
            for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def assert_same(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for name, (data, dtype, chunks, attrs) in expected.items():
        np.testing.assert_array_equal(found[name][0], data)
        assert found[name][1:] == (dtype, chunks, attrs)


def test_two_processes_fill_one_new_cache_at_once(tmp_path):
    path = tmp_path / "cache.zarr"
    barrier, queue = CTX.Barrier(2), CTX.Queue()
    procs = [CTX.Process(target=put_worker, args=(str(path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    calls = results(procs, queue)
    assert calls == [NAMES, NAMES]  # both missed and filled every entry: the writes truly overlapped
    reference = ZarrCache(tmp_path / "reference.zarr", KEY, ATTR)
    put_all(reference)
    cache = ZarrCache(path, KEY, ATTR)
    assert_same(entries(cache.group), entries(reference.group))
    assert sorted(n for n, _ in cache.group.members(max_depth=None)) == ["a", "x", "x/y", "x/y/b", "x/y/c", "x/z",
                                                                         "x/z/d"]
    assert list((tmp_path / "cache.zarr.partial").iterdir()) == []  # the losers' arrays were dropped
    assert cache.group.attrs[ATTR]["key"] == {"format": 1, "what": ["rows", 5]}


def test_killed_writer_leaves_no_entry(tmp_path):
    path = tmp_path / "cache.zarr"
    started = CTX.Event()
    p = CTX.Process(target=killed_worker, args=(str(path), started))
    p.start()
    try:
        assert started.wait(60)
        cache = ZarrCache(path, KEY, ATTR)  # opened while the writer lives: its private work is kept
        assert cache.get("v/killed") is None
        assert len(list((tmp_path / "cache.zarr.partial").iterdir())) == 2  # <token>/ and <token>.lock
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert cache.get("v/killed") is None and "v" not in cache.group
    assert len(list((tmp_path / "cache.zarr.partial").iterdir())) == 2  # debris of the dead writer
    cache = ZarrCache(path, KEY, ATTR)  # the next open removes it
    assert list((tmp_path / "cache.zarr.partial").iterdir()) == []
    got = cache.put("v/killed", SHAPE, "float32", row_fill("v/killed"), {"n": 1})
    np.testing.assert_array_equal(got[:], values("v/killed"))
    np.testing.assert_array_equal(ZarrCache(path, KEY, ATTR).get("v/killed")[:], values("v/killed"))


def test_get_never_sees_an_unpublished_entry(tmp_path):
    cache = ZarrCache(tmp_path / "cache.zarr", KEY, ATTR)
    seen = []

    def fill(array: zarr.Array) -> None:
        array[:] = values("e")
        other = ZarrCache(cache.path, KEY, ATTR)  # another reader, opened mid-fill
        seen.extend([cache.get("d/e"), other.get("d/e"), [n for n, _ in other.group.members(max_depth=None)]])
        seen.append(sorted(p.suffix for p in (tmp_path / "cache.zarr.partial").iterdir()))

    got = cache.put("d/e", SHAPE, "float32", fill, {"k": "v"})
    assert seen == [None, None, [], ["", ".lock"]]  # nothing published; our private work survived the sweep
    assert dict(got.attrs) == {"k": "v"} and cache.get("d/e") is not None

    def failing(array: zarr.Array) -> None:
        array[0] = 1
        raise RuntimeError("fill failed")

    with pytest.raises(RuntimeError, match="fill failed"):
        cache.put("d/f", SHAPE, "float32", failing, {})
    assert cache.get("d/f") is None and list((tmp_path / "cache.zarr.partial").iterdir()) == []
    again = cache.put("d/e", SHAPE, "float32", row_fill("other"), {})  # published already: kept
    np.testing.assert_array_equal(again[:], values("e"))


def test_cache_of_other_settings_or_not_a_cache_is_refused(tmp_path):
    path = tmp_path / "cache.zarr"
    ZarrCache(path, KEY, ATTR)
    with pytest.raises(CacheError) as e:
        ZarrCache(path, {"format": 1, "what": ("rows", 6)}, ATTR)
    assert str(e.value) == (f"{path}: features cache made with other settings "
                            "(what: expected ['rows', 6], found ['rows', 5]); use another --cache")
    with pytest.raises(CacheError, match=f"^{tmp_path / 'plain'}: not a Zarr v3 group") as e:
        (tmp_path / "plain").mkdir()
        ZarrCache(tmp_path / "plain", KEY, ATTR)
    assert "\n" not in str(e.value)
    (tmp_path / "file").write_text("x\ny\n")
    with pytest.raises(CacheError, match=f"^{tmp_path / 'file'}: not a Zarr v3 group") as e:
        ZarrCache(tmp_path / "file", KEY, ATTR)
    assert "\n" not in str(e.value)
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w-", zarr_format=3)
    with pytest.raises(CacheError, match=f"^{tmp_path / 'bare.zarr'}: not a cosettle cache .*{ATTR}"):
        ZarrCache(tmp_path / "bare.zarr", KEY, ATTR)


# The frame features cache on top: two evaluations computing one backbone's features at once.

def features_worker(root: str, cache: str, barrier, queue, single: str | None = None) -> None:
    def work():
        import torch

        from cosettle.eval.frame.datasets import davis_videos
        from cosettle.eval.frame.features import FeatureSource
        from cosettle.eval.frame.propagation import preset
        from cosettle.pipeline.backbones import Backbone, load_backbone

        torch.set_num_threads(1)  # the same arithmetic in every process
        original, computed = Backbone.patch_features, []

        def slow(self, x):  # slow enough that the two processes overlap
            computed.append(x.shape[0])
            time.sleep(0.1)
            return original(self, x)

        Backbone.patch_features = slow
        backbone = load_backbone("dino_vitb", "random", arch={"embed_dim": 32, "depth": 1, "num_heads": 2,
                                                              "img_size": 64})
        settings = preset("dino", short_side=64, multiple=32)
        source = FeatureSource(backbone, settings, Path(cache), batch_size=2)
        barrier.wait(60)
        for video in davis_videos(Path(root)):
            source.backbone_features("davis/480p", video)
        shared = len(computed)
        if single is not None:  # the reference: one process alone on a new cache
            alone = FeatureSource(backbone, settings, Path(single), batch_size=2)
            for video in davis_videos(Path(root)):
                alone.backbone_features("davis/480p", video)
        return shared
    report(queue, work)


def test_two_feature_sources_fill_one_cache_at_once(tmp_path):
    shared, single = tmp_path / "shared.zarr", tmp_path / "single.zarr"
    barrier, queue = CTX.Barrier(3), CTX.Queue()  # the test joins in: the videos are written meanwhile
    procs = [CTX.Process(target=features_worker, args=(str(tmp_path / "DAVIS"), str(shared), barrier, queue, s))
             for s in (str(single), None)]
    for p in procs:
        p.start()
    from cosettle.eval.frame.features import CacheError as reexported
    from cosettle.eval.frame.synthetic import write_davis

    assert reexported is CacheError
    write_davis(tmp_path / "DAVIS", ["bear", "car"], frames=5, height=64, width=96, objects=2)
    barrier.wait(60)
    batches = results(procs, queue, timeout=120)
    assert min(batches) >= 3  # both processes ran the backbone on the same video (3 batches of 2 frames)
    groups = [zarr.open_group(str(c), mode="r", zarr_format=3) for c in (shared, single)]
    assert groups[0].attrs["cosettle_eval_features"]["key"] == groups[1].attrs["cosettle_eval_features"]["key"]
    found, expected = (entries(g) for g in groups)
    assert sorted(expected) == ["davis/480p/bear", "davis/480p/car"]
    assert_same(found, expected)
