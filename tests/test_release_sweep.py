"""``cosettle release-sweep``: the shipped sweeps/paper.toml plans the paper's table, and a tiny
release sweep (a DINO base file and its '+Ours' release on synthetic DAVIS) runs, resumes, and
reports measured, published and difference side by side."""
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_releases import official_encoder, write_dino
from test_release import adapter, write_release

from cosettle.app import report as report_mod
from cosettle.app.cli import main as cosettle
from cosettle.app.release_sweep import parse_release_sweep, plan_release_sweep, run_release_sweep
from cosettle.app.results import read_results
from cosettle.app.sweep_toml import SweepFileError
from cosettle.core.provenance import sha256_file
from cosettle.eval.frame.synthetic import write_davis

REPO = Path(__file__).resolve().parents[1]


def test_paper_sweep_plans_every_base_and_release(tmp_path):
    """sweeps/paper.toml with its placeholder paths filled by empty files: 8 bases, 7 releases, 3 evaluations."""
    (tmp_path / "sweeps").mkdir()
    shutil.copy(REPO / "sweeps" / "paper.toml", tmp_path / "sweeps" / "paper.toml")
    (tmp_path / "data_manifests").mkdir()
    shutil.copy(REPO / "data_manifests" / "jhmdb_split1_test.txt", tmp_path / "data_manifests")
    text = (tmp_path / "sweeps" / "paper.toml").read_text()
    for line in text.splitlines():
        m = re.match(r'^(root|weights|release) = "([^"]+)"', line)
        if m:
            target = tmp_path / "sweeps" / m.group(2)
            if m.group(1) == "root":
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(m.group(2).encode())
    sweep = parse_release_sweep(tmp_path / "sweeps" / "paper.toml")
    assert [b.name for b in sweep.backbones] == ["mae_vitb", "ijepa_vitb", "clip_vitb", "blip_vitb", "mocov3_vitb",
                                                 "ibot_vitb", "dino_vitb", "dinov2_vitb"]
    assert sum(b.release is not None for b in sweep.backbones) == 7
    assert [(e.name, e.options["preset"]) for e in sweep.evaluations] == [("davis", "cosettle"), ("vip", None),
                                                                         ("jhmdb", None)]
    plan = plan_release_sweep(sweep)
    assert len(plan.jobs) == 8 * 3 + 7 * 3 and not plan.done
    job = plan.jobs["eval-dino_vitb-release-davis"]
    assert job.context.projection.name == "checkpoint-4.pth" and job.baseline == "eval-dino_vitb-baseline-davis"
    result = CliRunner().invoke(cosettle, ["release-sweep", str(tmp_path / "sweeps" / "paper.toml"), "--dry-run"])
    assert result.exit_code == 0 and len(result.output.splitlines()) == 45


def test_a_bad_release_sweep_names_line_and_field(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[sweep]\nout = "o"\n[datasets.davis]\nroot = "."\n[[backbones]]\nname = "dino_vitb"\n'
                    'weights = "random"\nrelease = "missing.pth"\n[evaluations.davis]\n')
    with pytest.raises(SweepFileError, match=r"s.toml:8: backbones\[0\].release: no such file"):
        parse_release_sweep(path)


SWEEP = """\
[sweep]
out = "out"
[datasets.davis]
root = "DAVIS"
[[backbones]]
name = "dino_vitb"
weights = "dino_vitbase16_pretrain.pth"
release = "checkpoint-4.pth"
arch = {{ embed_dim = 64, depth = 2, num_heads = 2 }}
[evaluations.davis]
short_side = 64
multiple = 32
"""


def test_release_sweep_runs_resumes_and_reports_against_the_paper(tmp_path):
    base = write_dino(tmp_path)
    release = write_release(tmp_path / "checkpoint-4.pth", official_encoder(base.ref), adapter("linear"))
    write_davis(tmp_path / "DAVIS", ["bear", "car"], frames=4, height=64, width=96, objects=2)
    path = tmp_path / "release.toml"
    path.write_text(SWEEP.format())
    outcome = run_release_sweep(path, workers=1, processes=False, echo=lambda line: None)
    assert sorted(outcome.ran) == ["eval-dino_vitb-baseline-davis", "eval-dino_vitb-release-davis"]
    rows = {r["task"]: r for r in read_results(tmp_path / "out" / "results.parquet").to_pylist()}
    ours = rows["eval-dino_vitb-release-davis"]
    assert (ours["variant"], ours["setting"], ours["run_dir"]) == ("projection", "release", str(release))
    assert ours["train.release_sha256"] == sha256_file(release) and ours["weights_sha256"] == sha256_file(base.path)
    record = json.loads((Path(ours["eval_out"]) / "run.json").read_text())
    assert record["projection"]["release"]["sha256"] == sha256_file(release)

    again = run_release_sweep(path, workers=1, processes=False, echo=lambda line: None)
    assert not again.ran and len(again.skipped) == 2

    files, _ = report_mod.render(tmp_path / "out" / "results.parquet", tmp_path / "report")
    table = files["table.md"].read_text().splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert table[0].startswith("| backbone | setting | DAVIS J&F_m | DAVIS J&F_m published | DAVIS J&F_m measured - published")
    base_jf, ours_jf = rows["eval-dino_vitb-baseline-davis"]["metric.J&F-Mean"], ours["metric.J&F-Mean"]
    assert cells[:2] == ["dino_vitb", "+Ours (checkpoint-4.pth)"] and cells[3] == "63.2 / 64.2"
    assert cells[4] == f"{(base_jf - 63.2 / 100) * 100:+.1f} / {(ours_jf - 64.2 / 100) * 100:+.1f}"
