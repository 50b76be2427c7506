"""``cosettle-train --compile``: the same losses and weights as eager training, resumable, recorded
in the run config; and a one-line error, before anything is written, where torch.compile fails."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from cosettle.trainer import compiled
from cosettle.trainer.cli import main
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.synthetic import write_synthetic_store
from cosettle.trainer.train import train

pytestmark = pytest.mark.torch_threads(1)


def run_config(store, out, **kw):
    return TrainConfig(features=(store,), out=str(out), epochs=2, batch_size=4, blr=0.5, device="cpu",
                       shuffle_chunks=2, io_threads=2, **kw)


def step_losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics_steps.jsonl").read_text().splitlines()]


def test_compiled_training_gives_the_eager_losses_and_weights_and_resumes(tmp_path):
    store = str(tmp_path / "s.zarr")
    write_synthetic_store(store, num_videos=24, views=2, grid=4, dim=16, chunk_videos=6)
    train(run_config(store, tmp_path / "eager"))
    counters.clear()
    assert train(run_config(store, tmp_path / "compiled", compile=True, max_steps=4)) is None
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["train"]["compile"] is True
    train(run_config(store, tmp_path / "compiled", compile=True, resume=True))
    assert counters["stats"]["unique_graphs"] >= 2  # the availability probe's, and the loss's own

    eager, comp = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert len(comp) == len(eager) == 12  # 24 videos / batch 4 = 6 steps per epoch, 2 epochs
    assert max(abs(a - b) for a, b in zip(eager, comp)) <= 1e-5
    a = load_file(str(tmp_path / "eager" / "projection.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "projection.safetensors"))
    assert a.keys() == b.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}  # no "_orig_mod." prefix
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_compile_that_cannot_work_is_a_one_line_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(long traceback text)")

    monkeypatch.setattr(compiled.torch, "compile", broken)
    store = str(tmp_path / "s.zarr")
    write_synthetic_store(store, num_videos=8, views=1, grid=4, dim=8, chunk_videos=4)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["--features", store, "--out", str(out), "--device", "cpu", "--compile"])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: --compile: torch.compile does not work on cpu here "
                                     "(InvalidCxxCompiler: No working C++ compiler found)")
    assert not out.exists()
