"""cosettle-train under faults: killed at random points and resumed, a damaged store, a full disk."""
import shutil
from pathlib import Path

import pytest
from fault_harness import assert_one_line_error, assert_same_run, run, run_killed

from cosettle.trainer.synthetic import write_synthetic_store

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    write_synthetic_store(path, num_videos=24, views=2, grid=4, dim=16, chunk_videos=6, invalid=(5,))
    return path


def args(store: Path, out: Path, *extra) -> list:
    """A run of 2 epochs x 5 steps, checkpointed every 2 steps; --resume also starts a fresh run,
    so every run of a test has the same command line (and the same config.json)."""
    return ["--features", store, "--out", out, "--epochs", 2, "--batch-size", 4, "--blr", 2.0, "--device", "cpu",
            "--shuffle-chunks", 2, "--io-threads", 1, "--checkpoint-every", 2, "--resume", *extra]


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("full") / "run"
    result = run("train", args(store, out), out.with_suffix(".log"))
    assert result.code == 0, result.stderr
    return out, result.wall


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_at_a_random_point_then_resumed_equals_an_uninterrupted_run(store, uninterrupted, tmp_path, seed):
    want, wall = uninterrupted
    out = tmp_path / "run"
    run_killed("train", args(store, out), tmp_path / "killed", wall, seed)
    result = run("train", args(store, out), tmp_path / "resumed")
    assert result.code == 0, result.stderr
    assert_same_run(out, want)


def test_truncated_chunk_is_one_line_naming_it_and_keeps_finished_epochs(store, uninterrupted, tmp_path):
    want, _ = uninterrupted
    damaged = tmp_path / "s.zarr"
    shutil.copytree(store, damaged)
    shutil.copytree(store.with_suffix(".manifest"), damaged.with_suffix(".manifest"))
    chunk = damaged / "b" / "c" / "1" / "2" / "0" / "0"  # view 1 (epoch 1) of block 2
    good = chunk.read_bytes()
    chunk.write_bytes(good[: len(good) // 3])
    out = tmp_path / "run"
    result = run("train", args(damaged, out), tmp_path / "damaged")
    assert_one_line_error(result, str(chunk), "chunk")
    assert (out / "checkpoints" / "LATEST").read_text().strip() >= "step-00000005"  # epoch 0 kept
    assert len((out / "metrics_epochs.jsonl").read_text().splitlines()) == 1
    chunk.write_bytes(good)
    result = run("train", args(damaged, out), tmp_path / "repaired")
    assert result.code == 0, result.stderr
    assert_same_run(out, want, {damaged: store})
