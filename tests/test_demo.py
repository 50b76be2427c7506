"""The embedded demo end to end at a reduced size, through its command line."""
import json
import math
from functools import partial

from click.testing import CliRunner

from cosettle.app import cli as cosettle_cli
from cosettle.app.demo import ROWS, DemoConfig

SMALL = dict(train_videos=6, train_frames=10, video_size=(64, 96), views=2, eval_sequences=2, eval_frames=8,
             eval_objects=2, analysis_videos=3, epochs=6, batch_size=4, device="cpu",
             arch=dict(embed_dim=48, depth=2, num_heads=3))


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path, monkeypatch):
    monkeypatch.setattr(cosettle_cli, "DemoConfig", partial(DemoConfig, **SMALL))
    out = tmp_path / "demo"
    res = CliRunner().invoke(cosettle_cli.main, ["demo", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "randomly initialised" in res.output and "NOT paper numbers" in res.output

    saved = json.loads((out / "demo_results.json").read_text())["results"]
    table = res.output[res.output.index("frozen  +Co-Settle"):].splitlines()
    for (label, _, _), line in zip(ROWS, table[1:]):
        frozen, cosettle, change = (float(x) for x in line[len(label):].split())
        assert line.startswith(label)
        # the printed table is the saved results, and the change column is their difference
        assert math.isclose(frozen, saved["baseline"][label], abs_tol=1e-4)
        assert math.isclose(cosettle, saved["cosettle"][label], abs_tol=1e-4)
        assert math.isclose(change, cosettle - frozen, abs_tol=2e-4)
    for variant in saved.values():
        assert all(0.0 <= variant[k] <= 1.0 for k in ("DAVIS J&F-Mean", "DAVIS J-Mean", "DAVIS F-Mean", "cycle accuracy"))
    epochs = [json.loads(line) for line in (out / "runs/cosettle/metrics_epochs.jsonl").read_text().splitlines()]
    assert len(epochs) == SMALL["epochs"] and epochs[-1]["loss"] < epochs[0]["loss"]
    assert (out / "demo.png").stat().st_size > 10_000 and (out / "runs/cosettle/projection.safetensors").exists()

    chunk = next((out / "features.zarr" / "a").rglob("c/*/*/*/*"))
    store_mtime, weights_mtime = chunk.stat().st_mtime_ns, (out / "runs/cosettle/projection.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(cosettle_cli.main, ["demo", "--out", str(out), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "nothing left to do" in again.output and "already finished" in again.output
    assert chunk.stat().st_mtime_ns == store_mtime
    assert (out / "runs/cosettle/projection.safetensors").stat().st_mtime_ns == weights_mtime
    assert json.loads((out / "demo_results.json").read_text())["results"] == saved
