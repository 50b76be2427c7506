"""cosettle-eval (DAVIS label propagation) under faults: killed at random points and rerun, a full
disk, and two evaluations of one backbone writing one results folder and one cache at once."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fault_harness import TIMING_KEYS, arrays, assert_one_line_error, assert_same_arrays, finish, run, run_killed, start

from cosettle.eval.frame.synthetic import write_davis

SEEDS = (0, 1, 2)
TINY = json.dumps(dict(embed_dim=64, depth=2, num_heads=2))
RESULTS = ("summary.json", "per_object.csv", "per_sequence.csv")


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    """Two sequences in the val split; the split "first" holds only the first."""
    root = tmp_path_factory.mktemp("DAVIS")
    write_davis(root, ["bear", "car"], frames=5, height=64, width=96, objects=2)
    (root / "ImageSets" / "2017" / "first.txt").write_text("bear\n")
    return root


def args(root: Path, out: Path, cache: Path, *extra) -> list:
    return ["davis", "--root", root, "--backbone", "dino_vitb", "--weights", "random", "--arch", TINY,
            "--short-side", 64, "--multiple", 32, "--batch-size", 3, "--device", "cpu", "--cache", cache,
            "--out", out, *extra]


@pytest.fixture(scope="module")
def uninterrupted(davis_root, tmp_path_factory) -> tuple[Path, Path, float]:
    base = tmp_path_factory.mktemp("full")
    result = run("eval", args(davis_root, base / "out", base / "cache.zarr"), base / "log")
    assert result.code == 0, result.stderr
    return base / "out", base / "cache.zarr", result.wall


def assert_same_results(out: Path, cache: Path, want: Path, want_cache: Path) -> None:
    """Equal results files, predicted masks (byte for byte), cache entries, and run.json apart
    from ``TIMING_KEYS`` and the cache's path."""
    for name in RESULTS:
        assert (out / name).read_text() == (want / name).read_text(), name
    preds = sorted(p.relative_to(want) for p in (want / "predictions").rglob("*.png"))
    assert sorted(p.relative_to(out) for p in (out / "predictions").rglob("*.png")) == preds
    for p in preds:
        assert (out / p).read_bytes() == (want / p).read_bytes(), p
    record, expected = (json.loads((o / "run.json").read_text()) for o in (out, want))
    assert record.pop("cache") == str(cache.resolve()) and expected.pop("cache") == str(want_cache.resolve())
    assert {k: v for k, v in record.items() if k not in TIMING_KEYS} == {
        k: v for k, v in expected.items() if k not in TIMING_KEYS}
    assert_same_arrays(cache, want_cache)


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_at_a_random_point_then_rerun_equals_an_uninterrupted_run(davis_root, uninterrupted, tmp_path, seed):
    want, want_cache, wall = uninterrupted
    out, cache = tmp_path / "out", tmp_path / "cache.zarr"
    run_killed("eval", args(davis_root, out, cache), tmp_path / "killed", wall, seed, [out, cache])
    result = run("eval", args(davis_root, out, cache), tmp_path / "rerun")
    assert result.code == 0, result.stderr
    assert_same_results(out, cache, want, want_cache)
    assert not list((tmp_path / "cache.zarr.partial").glob("*"))  # the killed writer's debris was swept


def test_full_disk_is_one_line_naming_the_entry_and_keeps_finished_entries(davis_root, uninterrupted, tmp_path):
    """bear's features are cached by a first evaluation; car's 3 kB chunks of features cannot be
    written under a 2 kB file-size limit."""
    want, want_cache, _ = uninterrupted
    out, cache = tmp_path / "out", tmp_path / "cache.zarr"
    assert run("eval", args(davis_root, tmp_path / "first", cache, "--split", "first"), tmp_path / "first").code == 0
    result = run("eval", args(davis_root, out, cache), tmp_path / "full", fsize=2000)
    assert_one_line_error(result, f"{cache / 'davis' / '480p' / 'car'}: cannot write", "File too large")
    kept, expected = arrays(cache), arrays(want_cache)
    assert sorted(kept) == ["davis/480p/bear"]
    np.testing.assert_array_equal(kept["davis/480p/bear"][:], expected["davis/480p/bear"][:])
    result = run("eval", args(davis_root, out, cache), tmp_path / "rerun")
    assert result.code == 0, result.stderr
    assert_same_results(out, cache, want, want_cache)


def test_two_evaluations_at_once_give_the_result_of_one(davis_root, uninterrupted, tmp_path):
    """Both compute, both publish: every file is written aside and renamed, so each reads whole
    files, and the one cache entry per video that wins is identical to the other's."""
    want, want_cache, _ = uninterrupted
    out, cache = tmp_path / "out", tmp_path / "cache.zarr"
    procs = [start("eval", args(davis_root, out, cache), tmp_path / f"e{i}") for i in range(2)]
    now = time.perf_counter()
    for i, proc in enumerate(procs):
        result = finish(proc, tmp_path / f"e{i}", now)
        assert result.code == 0, result.stderr
    assert_same_results(out, cache, want, want_cache)


def test_truncated_cache_chunk_is_one_line_naming_it_and_deleting_its_entry_recomputes_it(davis_root, uninterrupted,
                                                                                         tmp_path):
    want, want_cache, _ = uninterrupted
    out, cache = tmp_path / "out", tmp_path / "cache.zarr"
    shutil.copytree(want_cache, cache)
    entry = cache / "davis" / "480p" / "car"
    chunk = entry / "c" / "3" / "0" / "0" / "0"  # frame 3's features
    chunk.write_bytes(chunk.read_bytes()[:100])
    line = assert_one_line_error(run("eval", args(davis_root, out, cache), tmp_path / "damaged"), str(chunk))
    assert "damaged cache chunk" in line and f"delete {entry} to compute it again" in line
    shutil.rmtree(entry)
    result = run("eval", args(davis_root, out, cache), tmp_path / "rerun")
    assert result.code == 0, result.stderr
    assert_same_results(out, cache, want, want_cache)
