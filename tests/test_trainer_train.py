"""The training loop end to end on small synthetic stores: learning, schedule, resume, refusals."""
import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cosettle.pipeline.store import FeatureStore, StoreError, open_store
from cosettle.trainer.cli import main
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.losses import cosettle_loss
from cosettle.trainer.projection import ProjectionError, build_projection
from cosettle.trainer.run_dir import RunError
from cosettle.trainer.synthetic import write_synthetic_store
from cosettle.trainer.train import TrainingError, train
from cosettle.trainer.trained import load_trained

pytestmark = pytest.mark.torch_threads(1)


def small_store(path, **kw):
    args = dict(num_videos=24, views=2, grid=4, dim=16, chunk_videos=6, invalid=(5,))
    write_synthetic_store(path, **(args | kw))
    return str(path)


def config(stores, out, **kw):
    base = dict(features=tuple(stores), out=str(out), epochs=2, batch_size=4, blr=2.0, device="cpu",
                shuffle_chunks=2, io_threads=2)
    return TrainConfig.from_flat(**(base | kw))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def store_loss(store_path, projection):
    """The loss over every valid video of view 0, as one batch."""
    st = open_store(store_path)
    valid = st.valid()
    a, b, a_asy = (torch.from_numpy(st.array(n)[0][valid]) for n in ("a", "b", "a_asy"))
    with torch.no_grad():
        return {k: float(v) for k, v in cosettle_loss(projection, a, b, a_asy).items()}


def test_one_epoch_lowers_the_loss_and_raises_cycle_accuracy(tmp_path):
    store = small_store(tmp_path / "s.zarr", num_videos=48, grid=8, dim=32, chunk_videos=8, invalid=(3, 17), noise=2.0)
    cfg = config([store], tmp_path / "run", epochs=1, batch_size=8, blr=4.0, warmup_epochs=0)
    summary = train(cfg)
    trained, run_config = load_trained(tmp_path / "run")
    before = store_loss(store, build_projection(32, "linear", seed=0))
    after = store_loss(store, trained)
    assert after["loss"] < before["loss"] - 1.0
    assert after["acc"] > before["acc"] + 0.2
    assert summary["steps"] == 46 // 8 == run_config["steps_per_epoch"]
    assert run_config["stores"][0]["settings"]["dim"] == 32
    assert not trained.training


def test_learning_rate_follows_warmup_then_half_cosine(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    cfg = config([store], tmp_path / "run", epochs=3, batch_size=2, accum_iter=2, blr=0.5, min_lr=0.01,
                 warmup_epochs=1.5)
    train(cfg)
    steps = read_jsonl(tmp_path / "run" / "metrics_steps.jsonl")
    micro = 23 // 2  # 23 valid videos in micro-batches of 2 per epoch; the 11th is dropped ...
    per_epoch = micro // 2  # ... as 5 optimizer steps of 2 micro-batches fit in an epoch
    assert len(steps) == 3 * per_epoch
    peak = 0.5 * (2 * 2) / 256
    for s in (0, 3, per_epoch + 2, 2 * per_epoch, 3 * per_epoch - 1):
        # As the release: step s sets its lr at its first micro-batch, at epoch + micro index / 11.
        e = s // per_epoch + (s % per_epoch) * 2 / micro
        if e < 1.5:
            expect = peak * e / 1.5
        else:
            expect = 0.01 + (peak - 0.01) * 0.5 * (1 + math.cos(math.pi * (e - 1.5) / 1.5))
        assert steps[s]["lr"] == pytest.approx(expect, rel=1e-12, abs=1e-15)
        assert steps[s]["step"] == s + 1


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    full = config([store], tmp_path / "full", epochs=2, accum_iter=2, batch_size=2, checkpoint_every=3)
    train(full)
    part = config([store], tmp_path / "part", epochs=2, accum_iter=2, batch_size=2, checkpoint_every=3, max_steps=7)
    assert train(part) is None  # stopped mid-epoch 1 (5 steps per epoch)
    assert not (tmp_path / "part" / "projection.safetensors").exists()
    with open(tmp_path / "part" / "metrics_steps.jsonl", "a") as f:  # a step logged after the checkpoint
        f.write(json.dumps({"step": 8, "epoch": 1, "lr": 0.0, "loss": 0.0}) + "\n")
    resumed = config([store], tmp_path / "part", epochs=2, accum_iter=2, batch_size=2, checkpoint_every=3, resume=True)
    train(resumed)
    a = load_file(str(tmp_path / "full" / "projection.safetensors"))
    b = load_file(str(tmp_path / "part" / "projection.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps_full = read_jsonl(tmp_path / "full" / "metrics_steps.jsonl")
    steps_part = read_jsonl(tmp_path / "part" / "metrics_steps.jsonl")
    assert [r["step"] for r in steps_part] == list(range(1, 11))
    assert [r["loss"] for r in steps_part] == [r["loss"] for r in steps_full]
    assert len(read_jsonl(tmp_path / "part" / "metrics_epochs.jsonl")) == 2


def test_cli_writes_every_output(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    out = tmp_path / "runs" / "cli"
    args = ["--features", store, "--out", str(out), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
            "--fusion", "mlp2", "--reg-loss", "mse"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ("config.json", "metrics_steps.jsonl", "metrics_epochs.jsonl", "summary.json", "training.png",
                 "projection.safetensors"):
        assert (out / name).is_file(), name
    projection, cfg = load_trained(out)
    assert cfg["train"]["fusion"] == "mlp2" and cfg["train"]["reg_loss"] == "mse"
    assert cfg["lr"] == pytest.approx(1e-4 * 4 / 256)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 23 // 4
    again = CliRunner().invoke(main, args)  # a finished run is not trained over by accident
    assert again.exit_code == 1 and "finished run" in again.output
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0
    resumed = CliRunner().invoke(main, args + ["--resume"])
    assert resumed.exit_code == 0 and "already finished" in resumed.output
    both = CliRunner().invoke(main, args + ["--resume", "--overwrite"])
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_refuses_incomplete_and_mixed_stores(tmp_path):
    good = small_store(tmp_path / "good.zarr")
    partial = small_store(tmp_path / "partial.zarr", complete=False, name="p")
    with pytest.raises(StoreError, match="incomplete store"):
        train(config([partial], tmp_path / "r1"))
    other_dim = small_store(tmp_path / "dim.zarr", dim=8, name="d")
    with pytest.raises(StoreError, match=r"dim: expected 16, found 8"):
        train(config([good, other_dim], tmp_path / "r2"))
    other_views = small_store(tmp_path / "views.zarr", views=3, name="v")
    with pytest.raises(StoreError, match=r"views: expected 2, found 3"):
        train(config([good, other_views], tmp_path / "r3"))
    with pytest.raises(StoreError, match="same videos"):
        train(config([good, good], tmp_path / "r4"))
    shard = small_store(tmp_path / "shard.zarr", num_videos=12, name="shard")  # differs only in its videos
    summary = train(config([good, shard], tmp_path / "r5", epochs=1))
    assert summary["steps"] == (23 + 11) // 4


def test_refuses_resuming_with_another_dim_or_settings(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    train(config([store], tmp_path / "run", epochs=2, max_steps=2))
    other = small_store(tmp_path / "d.zarr", dim=8, name="d")
    with pytest.raises(RunError, match="projection has dim 16 but the stores' tokens have dim 8"):
        train(config([other], tmp_path / "run", resume=True))
    with pytest.raises(RunError, match=r"train.blr: expected 1.0, found 2.0"):
        train(config([store], tmp_path / "run", blr=1.0, resume=True))
    with pytest.raises(RunError, match="unfinished run; pass --resume"):
        train(config([store], tmp_path / "run"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "s.zarr"
    store = small_store(path)
    st = FeatureStore(path, mode="r+")
    st.group["a"][1, 0] = np.full(st.array("a").shape[2:], np.inf)  # a valid video, view 1 = epoch 1
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss .* epoch 1.*checkpoint kept: step-00000005"):
        train(config([store], run, epochs=2, checkpoint_every=100))
    ckpt = run / "checkpoints" / "step-00000005"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == ckpt.name
    weights = load_file(str(ckpt / "projection.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (run / "summary.json").exists()


@pytest.mark.parametrize("config_text", ["{not json", '{"train": {"fusion": "linear"}}'])
def test_load_projection_names_a_broken_config(tmp_path, config_text):
    (tmp_path / "config.json").write_text(config_text)
    (tmp_path / "projection.safetensors").write_bytes(b"")
    with pytest.raises(ProjectionError, match="^" + re.escape(f"{tmp_path / 'config.json'}: not a cosettle-train config")):
        load_trained(tmp_path)


def test_resume_names_a_damaged_config(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    run = tmp_path / "run"
    train(config([store], run, max_steps=2))
    (run / "config.json").write_text("{ truncated")
    with pytest.raises(RunError, match=re.escape(str(run / "config.json")) + ": unreadable"):
        train(config([store], run, resume=True))


def test_equal_weights_give_equal_files(tmp_path):
    """safetensors orders several metadata keys differently from call to call; one sorted-JSON key
    keeps the file, and so the run's weights digest, a function of the weights and metadata."""
    import hashlib

    from safetensors import safe_open

    from cosettle.trainer.run_dir import METADATA_KEY, save_weights

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    meta = {"dim": "3", "objective": "cosettle", "fusion": "linear", "step": "7", "temp": "0.03"}
    digests = set()
    for i in range(5):
        save_weights(tmp_path / f"w{i}.safetensors", state, meta)
        digests.add(hashlib.sha256((tmp_path / f"w{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "w0.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == meta


def test_the_module_marker_sets_the_thread_count():
    assert torch.get_num_threads() == 1
