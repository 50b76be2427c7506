"""The in-memory run log: epoch means and the plot come from the records the files hold, the plot is
redrawn at most every PLOT_EVERY_S (and at the end of every session), and a resumed run ends with
the log and plot data of an uninterrupted one."""
import copy
import json

import numpy as np
import pytest

from cosettle.trainer import run_log
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.synthetic import write_synthetic_store
from cosettle.trainer.train import train

pytestmark = pytest.mark.torch_threads(1)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def plots(monkeypatch):
    """Every drawing: (path, steps, epochs) as plotted; the drawing itself still happens."""
    drawn, real = [], run_log.plot_records

    def spy(path, steps, epochs):
        drawn.append((path, copy.deepcopy(steps), copy.deepcopy(epochs)))
        real(path, steps, epochs)

    monkeypatch.setattr(run_log, "plot_records", spy)
    return drawn


def cfg(store, out, **kw):
    return TrainConfig(features=(store,), out=str(out), epochs=3, batch_size=2, accum_iter=2, blr=2.0,
                       device="cpu", shuffle_chunks=2, io_threads=2, checkpoint_every=3, **kw)


def without_rates(records):
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]


def test_a_resumed_run_ends_with_the_log_and_plot_of_an_uninterrupted_one(tmp_path, plots, monkeypatch):
    monkeypatch.setattr(run_log, "PLOT_EVERY_S", 1e9)  # no redraw during these short sessions
    store = str(tmp_path / "s.zarr")
    write_synthetic_store(store, num_videos=24, views=2, grid=4, dim=16, chunk_videos=6, invalid=(5,))
    train(cfg(store, tmp_path / "full"))
    assert len(plots) == 1  # once, at the end: not at each of the 3 epoch ends
    _, full_steps, full_epochs = plots[0]

    assert train(cfg(store, tmp_path / "part", max_steps=7)) is None  # stops in epoch 1 (5 steps per epoch)
    assert len(plots) == 2 and [r["step"] for r in plots[1][1]] == list(range(1, 8))  # drawn at the stop
    train(cfg(store, tmp_path / "part", resume=True))
    assert len(plots) == 3
    path, steps, epochs = plots[2]

    run = tmp_path / "part"
    assert path == run / "training.png"
    assert steps == read_jsonl(run / "metrics_steps.jsonl")  # plotted = what the files hold
    assert epochs == read_jsonl(run / "metrics_epochs.jsonl")
    assert without_rates(steps) == without_rates(full_steps)  # rates are timings; all else equal
    assert without_rates(epochs) == without_rates(full_epochs)
    for e, record in enumerate(epochs):  # epoch means of the logged step rows, recomputed here
        rows = [r for r in steps if r["epoch"] == e]
        assert record["steps"] == len(rows) == 5 and record["step"] == rows[-1]["step"]
        for key in ("loss", "acc", "lr", "samples_per_s"):
            assert record[key] == float(np.mean([r[key] for r in rows])), (e, key)

    again = tmp_path / "from_files.png"  # the plot drawn from the files, as it was before
    plots_before = len(plots)
    run_log.plot_records(again, read_jsonl(run / "metrics_steps.jsonl"), read_jsonl(run / "metrics_epochs.jsonl"))
    assert len(plots) == plots_before + 1
    assert again.read_bytes() == (run / "training.png").read_bytes()


def test_the_plot_is_redrawn_at_epoch_ends_once_plot_every_s_has_passed(tmp_path, plots, monkeypatch):
    monkeypatch.setattr(run_log, "PLOT_EVERY_S", 0.0)
    store = str(tmp_path / "s.zarr")
    write_synthetic_store(store, num_videos=24, views=2, grid=4, dim=16, chunk_videos=6)
    train(cfg(store, tmp_path / "run"))
    assert [len(epochs) for _, _, epochs in plots] == [1, 2, 3, 3]  # each epoch end, then the end
