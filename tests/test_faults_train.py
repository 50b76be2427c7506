"""cosettle-train under faults: killed at random points and resumed, a damaged store, a full disk."""
import os
import re
import time
from pathlib import Path

import pytest
from fault_harness import assert_one_line_error, assert_same_run, copy_store, finish, run, run_killed, start

from cosettle.trainer.run_dir import RunDir, RunError
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
    run_killed("train", args(store, out), tmp_path / "killed", wall, seed, [out])
    result = run("train", args(store, out), tmp_path / "resumed")
    assert result.code == 0, result.stderr
    assert_same_run(out, want)


def test_truncated_chunk_is_one_line_naming_it_and_keeps_finished_epochs(store, uninterrupted, tmp_path):
    want, _ = uninterrupted
    damaged = tmp_path / "s.zarr"
    copy_store(store, damaged)
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


def test_full_disk_is_one_line_naming_the_file_and_keeps_the_last_checkpoint(store, uninterrupted, tmp_path):
    """Under an 8 kB file-size limit the checkpoints (7 kB) fit and the plot (48 kB) does not."""
    want, _ = uninterrupted
    out = tmp_path / "run"
    result = run("train", args(store, out), tmp_path / "full", fsize=8000)
    assert_one_line_error(result, f"{out / 'training.png'}: cannot write", "File too large")
    kept = (out / "checkpoints" / "LATEST").read_text().strip()  # the last one before the plot failed
    result = run("train", args(store, out), tmp_path / "resumed")
    assert result.code == 0, result.stderr
    assert f"from {kept}" in result.stdout  # the kept checkpoint is what the run went on from ...
    assert_same_run(out, want)  # ... and it ends as the uninterrupted run


def test_a_second_writer_is_refused_while_the_first_holds_the_run(store, tmp_path):
    """The lock is held by this test process: cosettle-train names its pid and changes nothing."""
    out = tmp_path / "run"
    with RunDir(out).writing():
        result = run("train", args(store, out), tmp_path / "second")
        assert_one_line_error(result, f"{out}: run dir is being written by pid {os.getpid()}")
    assert not out.exists()


def test_two_writers_started_at_once_give_the_result_of_one(store, uninterrupted, tmp_path):
    want, _ = uninterrupted
    out = tmp_path / "run"
    procs = [start("train", args(store, out), tmp_path / f"w{i}") for i in range(2)]
    now = time.perf_counter()
    results = [finish(p, tmp_path / f"w{i}", now) for i, p in enumerate(procs)]
    for result, other in zip(results, reversed(procs)):
        # the loser is refused at once; one started after the winner finished finds a finished run
        if result.code != 0:
            assert_one_line_error(result, f"{out}: run dir is being written by pid {other.pid}")
    assert any(r.code == 0 for r in results)
    assert_same_run(out, want)


def test_a_metric_line_cut_short_is_dropped_and_a_damaged_one_is_an_error(tmp_path):
    """A kill during an append leaves a last line without its newline (always past the last
    checkpoint, so resuming drops it anyway); anything else unreadable names the log."""
    run_dir = RunDir(tmp_path)
    log = tmp_path / "metrics_steps.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert run_dir.records("metrics_steps.jsonl") == [{"step": 1, "loss": 2.0}]
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(RunError, match=f"^{re.escape(str(log))}: damaged metric log"):
        run_dir.records("metrics_steps.jsonl")
