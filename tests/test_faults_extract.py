"""cosettle-extract under faults: killed at random points and resumed, a full disk, a damaged
manifest part."""
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from fault_harness import assert_one_line_error, assert_same_arrays, assert_same_manifest, copy_store, run, run_killed

from cosettle.pipeline.synthetic import moving_scene, write_frame_folder

SEEDS = (0, 1, 2)
TINY = json.dumps(dict(embed_dim=32, depth=1, num_heads=2))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for i in range(6):
        write_frame_folder(root / f"clip{i}", moving_scene(6 + i, 48, 64, 1, seed=i)[0])
    return root


def args(videos: Path, out: Path, *extra) -> list:
    """Six videos in six blocks of one; --resume also starts a fresh store, so every run of a
    test has the same command line."""
    return ["--backbone", "dino_vitb", "--weights", "random", "--arch", TINY, "--videos", videos, "--out", out,
            "--views", 2, "--chunk-videos", 1, "--batch-size", 8, "--workers", 0, "--device", "cpu", "--resume", *extra]


@pytest.fixture(scope="module")
def uninterrupted(videos, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("full") / "s.zarr"
    result = run("extract", args(videos, out), out.with_suffix(".log"))
    assert result.code == 0, result.stderr
    return out, result.wall


def assert_same_store(got: Path, want: Path) -> None:
    assert_same_arrays(got, want)
    assert_same_manifest(got, want)
    assert zarr.open_group(str(got), mode="r").attrs["cosettle_store"]["complete"]


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_at_a_random_point_then_resumed_equals_an_uninterrupted_run(videos, uninterrupted, tmp_path, seed):
    want, wall = uninterrupted
    out = tmp_path / "s.zarr"
    run_killed("extract", args(videos, out), tmp_path / "killed", wall, seed, [out, out.with_suffix(".manifest")])
    result = run("extract", args(videos, out), tmp_path / "resumed")
    assert result.code == 0, result.stderr
    assert_same_store(out, want)


def test_full_disk_is_one_line_naming_the_array_and_keeps_finished_blocks(videos, uninterrupted, tmp_path):
    """Shard 0 of 2 finishes blocks 0, 2, 4; the rest, under an 8 kB file-size limit, cannot
    write a 12.5 kB chunk of tokens."""
    want, _ = uninterrupted
    out = tmp_path / "s.zarr"
    assert run("extract", args(videos, out, "--shard", "0/2"), tmp_path / "shard").code == 0
    result = run("extract", args(videos, out), tmp_path / "full", fsize=8000)
    assert_one_line_error(result, f"{out / 'a'}: cannot write", "File too large")
    done = zarr.open_group(str(out), mode="r")["done"][:]
    assert done.tolist() == [1, 0, 1, 0, 1, 0]
    for name in ("a", "b", "a_asy"):  # the finished blocks are intact
        got, expect = (zarr.open_group(str(s), mode="r")[name][:, ::2] for s in (out, want))
        np.testing.assert_array_equal(got, expect, err_msg=name)
    result = run("extract", args(videos, out), tmp_path / "resumed")
    assert result.code == 0, result.stderr
    assert_same_store(out, want)


def test_damaged_manifest_part_is_one_line_naming_it_and_deleting_it_redoes_its_block(videos, uninterrupted, tmp_path):
    want, _ = uninterrupted
    out = tmp_path / "s.zarr"
    copy_store(want, out)
    part = out.with_suffix(".manifest") / "part-000003.parquet"
    part.write_bytes(b"\x00garbage" * 64)
    line = assert_one_line_error(run("extract", args(videos, out), tmp_path / "resume"), str(part), "block 3")
    assert "damaged manifest part" in line
    result = run("train", ["--features", out, "--out", tmp_path / "run", "--device", "cpu"], tmp_path / "train")
    assert_one_line_error(result, f"{part}: damaged manifest part")
    part.unlink()
    result = run("extract", args(videos, out), tmp_path / "redo")
    assert result.code == 0, result.stderr
    assert_same_store(out, want)
