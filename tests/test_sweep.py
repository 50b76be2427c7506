"""cosettle-sweep end to end: two tiny backbones x two training settings x DAVIS and the analysis,
on a 2-worker in-process Dask cluster, then resuming after a failed task, then bad sweep files."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from distributed import Client, LocalCluster

from cosettle.app import sweep as sweep_mod
from cosettle.app.report import render
from cosettle.app.results import read_results
from cosettle.app.sweep import run_sweep
from cosettle.app.sweep_file import parse_sweep
from cosettle.app.sweep_plan import plan_sweep
from cosettle.app.sweep_tasks import SweepError
from cosettle.app.sweep_toml import SweepFileError, key_lines
from cosettle.core.provenance import package_version
from cosettle.eval.frame.analysis_report import analyse
from cosettle.eval.frame.propagation import preset
from cosettle.eval.frame.run import EvalConfig
from cosettle.eval.frame.synthetic import write_davis
from cosettle.eval.task import TASKS as TASK_REGISTRY
from cosettle.eval.task import discover
from cosettle.eval.tasks.davis import evaluate_davis
from cosettle.pipeline.backbones import create_model, load_backbone
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder
from cosettle.trainer.run_dir import RunDir
from cosettle.trainer.trained import load_trained

ARCH = {"dino_vitb": dict(embed_dim=32, depth=1, num_heads=2, img_size=64),
        "mae_vitb": dict(embed_dim=48, depth=1, num_heads=2, img_size=64)}

SWEEP = """\
[sweep]
out = "{out}"
workers = 2

[datasets.train]
videos = "videos"
[datasets.davis]
root = "DAVIS"
[datasets.clips]
videos = "videos"

[extract]
views = 1
chunk_videos = 2
workers = 0

[[backbones]]
name = "dino_vitb"
weights = "ckpt/dino_vitb.pth"
arch = {{ embed_dim = 32, depth = 1, num_heads = 2, img_size = 64 }}

[[backbones]]
name = "mae_vitb"
weights = "ckpt/mae_vitb.pth"
arch = {{ embed_dim = 48, depth = 1, num_heads = 2, img_size = 64 }}

[train]
epochs = 1
batch_size = 2
warmup_epochs = 0.0
[train.grid]
fusion = ["linear", "mlp2"]

[evaluations.davis]
short_side = 64
multiple = 16

[evaluations.metrics]
dataset = "clips"
"""
TASKS = 2 + 2 * 2 + (2 + 2 * 2) * 2  # extract, train, (baseline + projection) evaluations


def write_weights(path: Path, backbone: str, seed: int) -> Path:
    """A tiny checkpoint in the backbone's release format (MAE nests it under 'model'), drawn from
    its own generator: loaded weights, unlike random inits, do not depend on torch's global RNG,
    which the threads of an in-process cluster share."""
    model = create_model(backbone, ARCH[backbone])
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state} if backbone == "mae_vitb" else state, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tiny checkpoints, four 8-frame training clips (also the analysis videos) and a two-sequence DAVIS tree."""
    root = tmp_path_factory.mktemp("sweep")
    for seed, backbone in enumerate(ARCH):
        write_weights(root / "ckpt" / f"{backbone}.pth", backbone, seed)
    for i in range(4):
        write_frame_folder(root / "videos" / f"clip{i}", moving_scene(8, 48, 64, 2, seed=i)[0])
    write_davis(root / "DAVIS", ["seq-a", "seq-b"], frames=5, height=64, width=96)
    return root


def sweep_file(data: Path, out: str, text: str = SWEEP) -> Path:
    path = data / f"{out}.toml"
    path.write_text(text.format(out=out))
    return path


@pytest.fixture(scope="module")
def finished(data):
    """The sweep on a 2-worker in-process local cluster."""
    path = sweep_file(data, "first")
    return path, run_sweep(path, workers=2, processes=False, echo=lambda line: None)


def rows_by_task(results: Path) -> dict[str, dict]:
    return {r["task"]: r for r in read_results(results).to_pylist()}


def test_sweep_runs_every_task_and_fills_the_table(finished, data, tmp_path):
    path, outcome = finished
    assert not outcome.failed and not outcome.blocked and not outcome.skipped
    assert len(set(outcome.ran)) == len(outcome.ran) == TASKS
    sweep = parse_sweep(path)
    rows = rows_by_task(sweep.results)
    assert len(rows) == 12
    for backbone in ARCH:
        for ev in ("davis", "metrics"):
            base = rows[f"eval-{backbone}-baseline-{ev}"]
            sha = hashlib.sha256((data / "ckpt" / f"{backbone}.pth").read_bytes()).hexdigest()
            assert (base["variant"], base["setting"], base["weights_sha256"]) == ("baseline", None, sha)
            assert base["wall_eval_s"] > 0 and base["cosettle_version"] == package_version()
            for setting in sweep.settings:
                row = rows[f"eval-{backbone}-{setting.id}-{ev}"]
                assert row["variant"] == "projection" and row["train.fusion"] == setting.values["fusion"]
                assert row["wall_train_s"] > 0 and row["wall_extract_s"] > 0
                _, config = load_trained(Path(row["run_dir"]))
                assert config["backbone"] == backbone and config["train"]["fusion"] == setting.values["fusion"]
                assert RunDir(row["run_dir"]).finished

    # The sweep's numbers are those of cosettle-eval run by hand on the same backbone and run.
    settings = preset("dino", short_side=64, multiple=16)
    for backbone in ARCH:
        setting = sweep.settings[1]
        run_dir = Path(rows[f"eval-{backbone}-{setting.id}-davis"]["run_dir"])
        for variant, projection in (("baseline", None), (setting.id, run_dir)):
            summary = evaluate_davis(EvalConfig(
                root=data / "DAVIS", out=tmp_path / backbone / variant, backbone=backbone,
                weights=str(data / "ckpt" / f"{backbone}.pth"),
                projection=projection, settings=settings, device="cpu", cache=tmp_path / f"{backbone}.zarr",
                arch=ARCH[backbone]))
            assert rows[f"eval-{backbone}-{variant}-davis"]["metric.J&F-Mean"] == pytest.approx(summary["J&F-Mean"])
    model = load_backbone("mae_vitb", data / "ckpt" / "mae_vitb.pth", arch=ARCH["mae_vitb"])
    videos = sorted((data / "videos").iterdir())
    with torch.no_grad():
        expected = analyse(videos, model, None, torch.device("cpu"))["baseline"]
    got = rows["eval-mae_vitb-baseline-metrics"]
    for name, value in expected.items():
        assert got[f"metric.{name}"] == pytest.approx(value)

    files, notes = render(sweep.results, tmp_path / "report")
    assert not notes and {"table.md", "table.csv", "deltas.png", "tradeoff.png"} <= set(files)
    assert len(files["table.md"].read_text().splitlines()) == 2 + 4  # header, rule, 2 backbones x 2 settings


def test_rerun_finds_everything_done(finished):
    path, _ = finished
    sweep = parse_sweep(path)
    stamps = {p: p.stat().st_mtime_ns for p in sweep.out.rglob("*") if p.is_file()}
    outcome = run_sweep(path, processes=False, echo=lambda line: None)
    assert outcome.ran == [] and len(outcome.skipped) == TASKS
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was rewritten
    result = CliRunner().invoke(sweep_mod.main, [str(path), "--dry-run"])
    assert result.exit_code == 0 and result.output.count("done  ") == TASKS and "todo" not in result.output


def test_changed_setting_reruns_only_what_depends_on_it(finished, data):
    path, _ = finished
    changed = path.with_name("changed.toml")
    changed.write_text(path.read_text().replace('fusion = ["linear", "mlp2"]', 'fusion = ["linear", "mlp3"]'))
    plan = plan_sweep(parse_sweep(changed))
    todo = sorted(j.id for j in plan.todo)
    mlp3 = [s.id for s in parse_sweep(changed).settings if s.values["fusion"] == "mlp3"][0]
    assert todo == sorted(f"{kind}-{b}-{mlp3}{suffix}" for b in ARCH
                          for kind, suffix in (("train", ""), ("eval", "-davis"), ("eval", "-metrics")))


class Counter:
    """Counts the calls of a stage function, and can make chosen calls fail once."""

    def __init__(self, fn, fail_once=lambda *a: False):
        self.fn, self.fail_once, self.calls, self.failed = fn, fail_once, [], False

    def __call__(self, *args):
        self.calls.append(args)
        if not self.failed and self.fail_once(*args):
            self.failed = True
            raise RuntimeError("injected failure")
        return self.fn(*args)


def test_failed_task_then_rerun_redoes_no_finished_task(data, monkeypatch):
    from cosettle.pipeline import extract as extract_stage
    from cosettle.trainer import train as train_stage

    extract = Counter(extract_stage.extract)
    train = Counter(train_stage.train, lambda cfg: "mae_vitb" in cfg.out and cfg.options["fusion"] == "mlp2")
    evals = {k: Counter(discover()[k].run) for k in ("davis", "metrics")}
    monkeypatch.setattr(extract_stage, "extract", extract)
    monkeypatch.setattr(train_stage, "train", train)
    for k, counter in evals.items():
        monkeypatch.setitem(TASK_REGISTRY, k, replace(discover()[k], run=counter))
    path = sweep_file(data, "resumed")
    with pytest.raises(SweepError, match=r"(?s)1 task\(s\) failed, 2 not run.*train-mae_vitb-s-\w+: RuntimeError: injected"):
        run_sweep(path, processes=False, echo=lambda line: None)
    assert (len(extract.calls), len(train.calls), sum(len(c.calls) for c in evals.values())) == (2, 4, 10)
    results = parse_sweep(path).results
    assert len(rows_by_task(results)) == 10
    mlp2 = [s.id for s in parse_sweep(path).settings if s.values["fusion"] == "mlp2"][0]
    stamps = {p: p.stat().st_mtime_ns for p in (data / "resumed").rglob("*") if p.is_file()}
    assert not any(f"mae_vitb-{mlp2}" in str(p) or f"mae_vitb/{mlp2}" in str(p) for p in stamps)

    for counter in (extract, train, *evals.values()):
        counter.calls.clear()
    # The rerun goes to an existing cluster (--scheduler) whose workers advertise one GPU each.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=":0") as cluster:
        outcome = run_sweep(path, scheduler=cluster.scheduler_address, echo=lambda line: None)
    assert (len(extract.calls), len(train.calls), sum(len(c.calls) for c in evals.values())) == (0, 1, 2)
    assert sorted(outcome.ran) == sorted([f"train-mae_vitb-{mlp2}", f"eval-mae_vitb-{mlp2}-davis",
                                          f"eval-mae_vitb-{mlp2}-metrics"])
    assert len(rows_by_task(results)) == 12
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # every finished output untouched


def test_killed_sweep_rerun_redoes_no_finished_task(data):
    """cosettle-sweep on a machine with two (faked) GPUs, killed with its workers (SIGKILL) once an
    evaluation has finished, then rerun. The local cluster has one worker process per visible GPU,
    pinned to it and advertising GPU=1; extraction starts a DataLoader worker inside it."""
    path = sweep_file(data, "killed", SWEEP.replace("workers = 0", "workers = 1"))
    sweep = parse_sweep(path)
    fake_gpus = "import torch; torch.cuda.device_count = lambda: 2; from cosettle.app.sweep import main; main()"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "3,5,6"}
    proc = subprocess.Popen([sys.executable, "-c", fake_gpus, str(path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(sweep.results.glob("*.parquet")):
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no evaluation finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    plan = plan_sweep(sweep)
    finished = set(plan.done)
    assert 0 < len(finished) < TASKS
    records = list((sweep.out / "tasks").glob("*.json")) + list(sweep.results.glob("*.parquet"))
    assert {json.loads(p.read_text())["worker"] for p in records if p.suffix == ".json"} | \
        {r["worker"] for r in read_results(sweep.results).to_pylist()} <= {"gpu3", "gpu5"}
    stamps = {p: p.stat().st_mtime_ns for p in records}

    outcome = run_sweep(path, processes=False, echo=lambda line: None)
    assert sorted(outcome.ran) == sorted(set(plan.jobs) - finished) and sorted(outcome.skipped) == sorted(finished)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no finished task was redone
    assert len(rows_by_task(sweep.results)) == 12


def test_gpu_resources_follow_the_workers():
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as plain, \
            LocalCluster(n_workers=1, processes=False, resources={"GPU": 1}, dashboard_address=":0") as gpus:
        with Client(plain) as a, Client(gpus) as b:
            assert sweep_mod._gpu_resources(a) is None
            assert sweep_mod._gpu_resources(b) == {"GPU": 1}


@pytest.mark.parametrize("kind", ["vip", "jhmdb"])
def test_vip_and_jhmdb_runners_give_what_cosettle_eval_gives(kind, tmp_path):
    """The sweep's runners apply cosettle-eval's task defaults (preset, input size) and return its summary."""
    from cosettle.app.results import flat_metrics
    from cosettle.eval import cli as eval_cli
    from cosettle.eval.frame.synthetic import write_jhmdb, write_vip
    from cosettle.eval.task import REQUIRED, TaskContext

    root = tmp_path / kind
    extra = {}
    if kind == "vip":
        write_vip(root, ["v1", "v2"], frames=3)
    else:
        extra = {"split": str(write_jhmdb(root, ["cls/a", "cls/b"], frames=4))}
    arch = ARCH["dino_vitb"]
    args = [kind, "--root", str(root), "--backbone", "dino_vitb", "--weights", "random", "--device", "cpu",
            "--arch", json.dumps(arch), "--out", str(tmp_path / "cli"), "--cache", str(tmp_path / "c1.zarr")]
    result = CliRunner().invoke(eval_cli.main, args + [a for k, v in extra.items() for a in (f"--{k}", v)])
    assert result.exit_code == 0, result.output
    expected = flat_metrics(json.loads((tmp_path / "cli" / "summary.json").read_text()))

    runner = discover()[kind]
    options = {k: v for k, v in runner.options.items() if v is not REQUIRED} | extra
    context = TaskContext("dino_vitb", "random", tmp_path / "sweep", arch, root=root, cache=tmp_path / "c2.zarr",
                          device="cpu")
    (tmp_path / "sweep").mkdir()
    assert flat_metrics(runner.run(context, options)) == pytest.approx(expected)


# -- malformed sweep files ------------------------------------------------------------------------

def line_of(text: str, fragment: str) -> int:
    matches = [i for i, line in enumerate(text.splitlines(), start=1) if line.startswith(fragment)]
    assert len(matches) == 1, fragment
    return matches[0]


BAD = [
    # (change to the good file, the line to blame (a fragment of it), field, words of the message)
    (('out = "{out}"', 'out = "{out}'), 'out = "{out}', None, "not valid TOML"),
    (('name = "mae_vitb"', 'name = "nope_vitb"'), 'name = "nope_vitb"', "backbones[1].name", "unknown backbone"),
    (('weights = "ckpt/mae_vitb.pth"', 'weights = "ckpt/missing.pth"'),
     'weights = "ckpt/missing.pth"', "backbones[1].weights", "no such file"),
    (("epochs = 1", "epochs = 0"), "epochs = 0", "train.epochs", "must be at least 1"),
    (('fusion = ["linear", "mlp2"]', 'fusion = ["linear", 2]'), "fusion = [", "train.grid.fusion", "must be str"),
    (('fusion = ["linear", "mlp2"]', 'fusion = ["linear", "mlp9"]'), "fusion = [", "train.grid.fusion", "unknown 'mlp9'"),
    (("multiple = 16", "multiple = 16\ntopkk = 3"), "topkk = 3", "evaluations.davis.topkk", "unknown option"),
    (("multiple = 16", "multiple = 16\ntopk = 0"), "topk = 0", "evaluations.davis.topk", "topk must be >= 1"),
    (("workers = 2", "workers = 2\nretries = 3"), "retries = 3", "sweep.retries", "unknown key"),
    (('dataset = "clips"', 'dataset = "kinetics"'), 'dataset = "kinetics"', "evaluations.metrics.dataset",
     "no [datasets.kinetics]"),
    (('[datasets.train]\nvideos = "videos"', '[datasets.train]\nroot = "videos"'), "[datasets.train]",
     "datasets.train.videos", "missing"),
    (("views = 1", "views = 1.5"), "views = 1.5", "extract.views", "must be int"),
    (("[evaluations.metrics]", '[evaluations.pose]\nkind = "jhmdb"\ndataset = "davis"\n\n[evaluations.metrics]'),
     "[evaluations.pose]", "evaluations.pose.split", "missing (a jhmdb evaluation needs it)"),
]


@pytest.mark.parametrize("change,blamed,field,words", BAD, ids=[b[2] or "syntax" for b in BAD])
def test_malformed_sweep_file_names_line_and_field(data, change, blamed, field, words):
    text = SWEEP.replace(*change)
    assert text != SWEEP
    path = sweep_file(data, "bad", text)
    with pytest.raises(SweepFileError) as info:
        parse_sweep(path)
    message = str(info.value)
    line = line_of(text.format(out="bad"), blamed.format(out="bad"))
    prefix = f"{path}:{line}:" + (f" {field}:" if field else "")
    assert message.startswith(prefix), message
    assert words in message


def test_cli_rejects_a_malformed_file_in_one_line(data):
    path = sweep_file(data, "badcli", SWEEP.replace('name = "dino_vitb"', 'name = 3'))
    result = CliRunner().invoke(sweep_mod.main, [str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {path}:{line_of(path.read_text(), 'name = 3')}: "
                                     "backbones[0].name: must be str, got int 3")


def test_key_lines_follows_tables_arrays_and_multiline_values():
    text = (
        "top = 1\n"                       # 1
        "[a]\n"                           # 2
        'x = """\n'                       # 3
        "y = 2\n"                         # 4 (inside the string)
        '"""\n'                           # 5
        "list = [\n"                      # 6
        "  { z = 1 },\n"                  # 7
        "]\n"                             # 8
        "[[b]]\n"                         # 9
        "k = 1\n"                         # 10
        "[[b]]\n"                         # 11
        "'quoted key' = { q = 1 }\n"      # 12
        "[a.sub]\n"                       # 13
        "d.e = 2\n"                       # 14
    )
    assert key_lines(text) == {
        ("top",): 1, ("a",): 2, ("a", "x"): 3, ("a", "list"): 6, ("b", 0): 9, ("b", 0, "k"): 10,
        ("b", 1): 11, ("b", 1, "quoted key"): 12, ("a", "sub"): 13, ("a", "sub", "d", "e"): 14,
    }
