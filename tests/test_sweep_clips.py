"""A sweep comparing objectives: a Co-Settle setting trains on the backbone's views store, a CSTP
setting on its own clip store (extracted once, by the plan its objective names), and only the
video-level evaluation runs for the clip-level head, whose vectors equal the command's."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cosettle.app import sweep as sweep_mod
from cosettle.app.results import read_results
from cosettle.app.sweep import run_sweep
from cosettle.app.sweep_file import parse_sweep
from cosettle.app.sweep_plan import plan_sweep
from cosettle.eval import cli as eval_cli
from cosettle.eval.video.synthetic import write_action_world
from cosettle.pipeline.store import open_store

ARCH = dict(embed_dim=32, depth=2, num_heads=2, img_size=64)

SWEEP = """\
[sweep]
out = "out"
workers = 1

[datasets.train]
videos = "world/videos"
[datasets.actions]
root = "world/videos"
[datasets.davis]
root = "world/videos"

[extract]
views = 2
chunk_videos = 4
workers = 0
clip_frames = 4
levels = [1, 2]
pooling = "mean"

[[backbones]]
name = "dino_vitb"
weights = "random"
arch = {{ embed_dim = 32, depth = 2, num_heads = 2, img_size = 64 }}

[train]
epochs = 1
batch_size = 4
warmup_epochs = 0.0
[train.grid]
objective = ["cosettle", "cstp"]

[evaluations.ucf_knn]
kind = "ucf101"
dataset = "actions"
task = "knn"
lists = "world/splits"
clips = 2
frames = 4
pooling = "mean"

[evaluations.davis]
dataset = "davis"
{davis_options}
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    write_action_world(root / "world", classes=2, train_per_class=4, test_per_class=2, frames=16, seed=1)
    path = root / "sweep.toml"
    # DAVIS is listed to show it is planned for the Co-Settle run only; its data is never read here.
    path.write_text(SWEEP.format(davis_options="short_side = 64"))
    return path


def test_each_objective_gets_the_store_of_its_layout_and_only_fitting_evaluations(sweep):
    plan = plan_sweep(parse_sweep(sweep))
    settings = {s.values["objective"]: s.id for s in plan.sweep.settings}
    assert set(plan.jobs) == {
        "extract-dino_vitb", "extract-dino_vitb-cstp",
        f"train-dino_vitb-{settings['cosettle']}", f"train-dino_vitb-{settings['cstp']}",
        "eval-dino_vitb-baseline-ucf_knn", "eval-dino_vitb-baseline-davis",
        f"eval-dino_vitb-{settings['cosettle']}-ucf_knn", f"eval-dino_vitb-{settings['cosettle']}-davis",
        f"eval-dino_vitb-{settings['cstp']}-ucf_knn",  # no DAVIS for a clip-level head
    }
    cstp = plan.jobs[f"train-dino_vitb-{settings['cstp']}"]
    assert cstp.extract == "extract-dino_vitb-cstp"
    clips = plan.jobs["extract-dino_vitb-cstp"].config
    assert (clips.layout, clips.plan, clips.clip_frames, list(clips.levels), clips.pooling) == ("clips", "cstp", 4, [1, 2], "mean")
    assert plan.jobs["extract-dino_vitb"].config.layout == "views"
    dry = CliRunner().invoke(sweep_mod.main, [str(sweep), "--dry-run"])
    assert dry.exit_code == 0 and "extract-dino_vitb-cstp" in dry.output


def test_the_clip_level_run_is_evaluated_as_the_command_evaluates_it(sweep, tmp_path):
    text = sweep.read_text().replace("[evaluations.davis]\ndataset = \"davis\"\nshort_side = 64\n", "")
    sweep.write_text(text)
    outcome = run_sweep(sweep, workers=1, processes=False, echo=lambda line: None)
    assert not outcome.failed
    parsed = parse_sweep(sweep)
    cstp = next(s.id for s in parsed.settings if s.values["objective"] == "cstp")
    store = open_store(next((parsed.out / "stores").glob("dino_vitb-cstp-*.zarr")))
    assert (store.layout, store.settings["plan"]) == ("clips", "cstp")
    rows = {r["task"]: r for r in read_results(parsed.results).to_pylist()}
    row = rows[f"eval-dino_vitb-{cstp}-ucf_knn"]
    args = ["ucf101", "--root", str(sweep.parent / "world" / "videos"), "--lists", str(sweep.parent / "world" / "splits"),
            "--task", "knn", "--clips", "2", "--frames", "4", "--pooling", "mean", "--backbone", "dino_vitb",
            "--weights", "random", "--arch", json.dumps(ARCH), "--device", "cpu", "--projection", row["run_dir"],
            "--out", str(tmp_path / "cli"), "--cache", str(tmp_path / "cache.zarr")]
    result = CliRunner().invoke(eval_cli.main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert row["metric.top1"] == pytest.approx(summary["top1"]) and row["metric.top5"] == pytest.approx(summary["top5"])
    record = json.loads((tmp_path / "cli" / "run.json").read_text())["features"]
    assert record["protocol"]["levels"] == [1, 2] and record["protocol"]["frames"] == 4
