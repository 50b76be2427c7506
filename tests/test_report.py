"""cosettle report on a hand-made results table: the paper-style table, its CSV, the plots, and
which rows count when tasks were rerun."""
import csv
import hashlib

import pytest
from click.testing import CliRunner
from PIL import Image

from cosettle.app import report as report_mod
from cosettle.app.results import BASE_SCHEMA, read_results, write_row

# backbone -> setting (None: baseline) -> evaluation -> metrics, 0-1 scale as the evaluations give
VALUES = {
    "dino_vitb": {
        None: {"davis": {"J&F-Mean": 0.632}, "vip": {"mIoU": 0.391}, "jhmdb": {"PCK@0.1": 0.444},
               "metrics": {"intra_video_distance/diameter@100": 0.21, "inter_video_distance/diameter@100": 0.55}},
        "s-a": {"davis": {"J&F-Mean": 0.642}, "vip": {"mIoU": 0.398}, "jhmdb": {"PCK@0.1": 0.462},
                "metrics": {"intra_video_distance/diameter@100": 0.15, "inter_video_distance/diameter@100": 0.52}},
    },
    "mae_vitb": {
        None: {"davis": {"J&F-Mean": 0.524}, "vip": {"mIoU": 0.293}, "jhmdb": {"PCK@0.1": 0.416},
               "metrics": {"intra_video_distance/diameter@100": 0.31, "inter_video_distance/diameter@100": 0.61}},
        "s-a": {"davis": {"J&F-Mean": 0.596}, "vip": {"mIoU": 0.338}, "jhmdb": {"PCK@0.1": 0.484},
                "metrics": {"intra_video_distance/diameter@100": 0.18, "inter_video_distance/diameter@100": 0.57}},
        "s-b": {"davis": {"J&F-Mean": 0.581}, "vip": {"mIoU": 0.321}, "jhmdb": {"PCK@0.1": 0.470},
                "metrics": {"intra_video_distance/diameter@100": 0.20, "inter_video_distance/diameter@100": 0.58}},
    },
    "clip_vitb": {None: {"davis": {"J&F-Mean": 0.549}}},  # training never finished
}
LABELS = {"s-a": "lambda_reg=3.0", "s-b": "lambda_reg=1.0"}


def row(backbone, setting, evaluation, finished="2026-01-01T00:00:00+00:00", sha="random", provenance=None):
    variant = "projection" if setting else "baseline"
    r = dict.fromkeys(f.name for f in BASE_SCHEMA)
    task = f"eval-{backbone}-{setting or 'baseline'}-{evaluation}"
    provenance = provenance or hashlib.sha256(f"{task} {sha} {finished}".encode()).hexdigest()
    r.update(task=task, provenance=provenance, backbone=backbone,
             backbone_name=backbone, weights_sha256=sha, variant=variant, setting=setting,
             setting_label=LABELS.get(setting), evaluation=evaluation, eval_kind=evaluation, finished=finished,
             wall_eval_s=1.0)
    return r


def write_all(results, values=VALUES, **kw):
    for backbone, settings in values.items():
        for setting, evals in settings.items():
            for evaluation, metrics in evals.items():
                write_row(results, row(backbone, setting, evaluation, **kw),
                          {"lambda_reg": 3.0} if setting else {}, metrics)


def cell(base, proj, scale=100, digits=1):
    if proj is None:
        return f"{base * scale:.{digits}f} / –"
    return f"{base * scale:.{digits}f} / {proj * scale:.{digits}f} ({(proj - base) * scale:+.{digits}f})"


def table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()]


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.parquet"
    write_all(path)
    return path


def test_table_pairs_baseline_and_projection_per_backbone_and_setting(results, tmp_path):
    files, notes = report_mod.render(results, tmp_path / "report")
    rows = table_rows(files["table.md"].read_text())
    assert rows[0] == ["backbone", "setting", "DAVIS J&F_m", "VIP mIoU", "JHMDB PCK@0.1",
                       "intra-video distance", "inter-video distance"]
    body = rows[2:]
    # paper order of the registry (MAE, CLIP, DINO), settings by label
    assert [r[:2] for r in body] == [["mae_vitb", "lambda_reg=1.0"], ["mae_vitb", "lambda_reg=3.0"],
                                     ["clip_vitb", "(not trained)"], ["dino_vitb", "lambda_reg=3.0"]]
    for r in body:
        backbone, setting = r[0], {"lambda_reg=1.0": "s-b", "lambda_reg=3.0": "s-a"}.get(r[1])
        base, proj = VALUES[backbone][None], VALUES[backbone].get(setting, {})
        if setting is None:
            assert r[2] == cell(base["davis"]["J&F-Mean"], None) and r[3:] == ["– / –"] * 4
            continue
        for i, (ev, metric) in enumerate((("davis", "J&F-Mean"), ("vip", "mIoU"), ("jhmdb", "PCK@0.1"))):
            assert r[2 + i] == cell(base[ev][metric], proj[ev][metric])
        for i, metric in enumerate(("intra_video_distance/diameter@100", "inter_video_distance/diameter@100")):
            assert r[5 + i] == cell(base["metrics"][metric], proj["metrics"][metric], scale=1, digits=3)
    assert notes == []

    with open(files["table.csv"]) as f:
        lines = list(csv.DictReader(f))
    mae_b = next(ln for ln in lines if ln["setting"] == "s-b")
    assert float(mae_b["VIP mIoU baseline"]) == pytest.approx(29.3)
    assert float(mae_b["VIP mIoU projection"]) == pytest.approx(32.1)
    assert float(mae_b["VIP mIoU delta"]) == pytest.approx(2.8)
    assert next(ln for ln in lines if ln["backbone"] == "clip_vitb")["DAVIS J&F_m projection"] == ""


def test_plots_draw_one_arrow_and_bars_per_trained_line(results, tmp_path):
    rows, _ = report_mod.current_rows(read_results(results).to_pylist())
    lines = report_mod.build_lines(rows)
    columns = report_mod.table_columns(rows)
    assert report_mod.plot_tradeoff(tmp_path / "t.png", lines, "metrics") == 3
    assert report_mod.plot_deltas(tmp_path / "d.png", lines, columns) == 3 * 3
    for name in ("t.png", "d.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_newest_rows_and_weights_win(results, tmp_path):
    # an older DINO baseline with other numbers, and a newer DINO checkpoint for one evaluation
    older = {"dino_vitb": {None: {"davis": {"J&F-Mean": 0.100}}}}
    write_all(results, older, finished="2025-06-01T00:00:00+00:00", provenance="old-run")
    rows, superseded = report_mod.current_rows(read_results(results).to_pylist())
    assert superseded == 1
    davis = [r for r in rows if r["backbone"] == "dino_vitb" and r["variant"] == "baseline" and r["evaluation"] == "davis"]
    assert [r["metric.J&F-Mean"] for r in davis] == [0.632]

    newer = {"dino_vitb": {None: {"davis": {"J&F-Mean": 0.700}}}}
    write_all(results, newer, finished="2027-01-01T00:00:00+00:00", sha="f" * 64)
    files, notes = report_mod.render(results, tmp_path / "report")
    dino = [r for r in table_rows(files["table.md"].read_text()) if r[0] == "dino_vitb"]
    assert dino == [["dino_vitb", "(not trained)", cell(0.700, None), "– / –", "– / –", "– / –", "– / –"]]
    assert notes == ["9 older row(s) of rerun tasks left out (the newest of each are reported)"]


def test_without_analysis_no_tradeoff_plot_and_a_note(tmp_path):
    path = tmp_path / "r.parquet"
    write_all(path, {"mae_vitb": {s: {"davis": v["davis"]} for s, v in VALUES["mae_vitb"].items()}})
    files, notes = report_mod.render(path, tmp_path / "out")
    assert "tradeoff.png" not in files and not (tmp_path / "out" / "tradeoff.png").exists()
    assert notes == ["tradeoff.png not written: the results hold no metrics evaluation (intra/inter distances)"]


def test_cli_writes_beside_results_and_rejects_an_empty_table(results, tmp_path):
    result = CliRunner().invoke(report_mod.report, [str(results)])
    assert result.exit_code == 0, result.output
    assert "| mae_vitb | lambda_reg=1.0 |" in result.output
    assert sorted(p.name for p in (results.parent / "report").iterdir()) == ["deltas.png", "table.csv", "table.md",
                                                                            "tradeoff.png"]
    empty = tmp_path / "empty.parquet"
    empty.mkdir()
    result = CliRunner().invoke(report_mod.report, [str(empty)])
    assert result.exit_code == 1 and f"{empty}: no result rows" in result.output


# ---------------------------------------------------------------- the report


def result_row(setting: str | None, evaluation: str, kind: str) -> dict:
    row = dict.fromkeys(f.name for f in BASE_SCHEMA)
    task = f"eval-dino_vitb-{setting or 'baseline'}-{evaluation}"
    row.update(task=task, provenance=hashlib.sha256(task.encode()).hexdigest(), backbone="dino_vitb",
               backbone_name="dino_vitb", weights_sha256="random", variant="projection" if setting else "baseline",
               setting=setting, setting_label="lambda_reg=3.0" if setting else None, evaluation=evaluation,
               eval_kind=kind, finished="2026-01-01T00:00:00+00:00", wall_eval_s=1.0)
    return row


# evaluation -> (kind, baseline metrics, projection metrics)
RESULTS = {
    "davis": ("davis", {"J&F-Mean": 0.632}, {"J&F-Mean": 0.642}),
    "ucf_knn": ("ucf101", {"top1": 0.412, "top5": 0.70}, {"top1": 0.450, "top5": 0.74}),
    "ucf_ret": ("ucf101", {"R@1": 0.305, "R@5": 0.52}, {"R@1": 0.287, "R@5": 0.50}),
    "hmdb": ("hmdb51", {"top5": 0.33}, {"top5": 0.35}),  # neither top-1 nor R@1: no column
}
COLUMNS = {"davis": ("DAVIS J&F_m", "J&F-Mean"), "ucf_knn": ("UCF101 top-1 [ucf_knn]", "top1"),
           "ucf_ret": ("UCF101 R@1 [ucf_ret]", "R@1")}




@pytest.mark.parametrize("evaluations", [("davis", "ucf_knn", "ucf_ret", "hmdb"), ("ucf_knn", "ucf_ret", "hmdb")],
                         ids=["with-davis", "video-only"])
def test_report_shows_ucf101_columns_in_points(evaluations, tmp_path):
    results = tmp_path / "results.parquet"
    for name in evaluations:
        kind, base, proj = RESULTS[name]
        write_row(results, result_row(None, name, kind), {}, base)
        write_row(results, result_row("s-a", name, kind), {"lambda_reg": 3.0}, proj)
    files, notes = report_mod.render(results, tmp_path / "report")
    assert {"table.md", "table.csv", "deltas.png"} <= set(files)  # video-only results are a report too
    assert not any("deltas.png" in n for n in notes)  # it has bars
    rows = table_rows(files["table.md"].read_text())
    shown = [e for e in evaluations if e in COLUMNS]
    # no UCF101 R@1 [ucf_knn] nor UCF101 top-1 [ucf_ret]: neither reported it; no HMDB51 column at all
    assert rows[0] == ["backbone", "setting", *(COLUMNS[e][0] for e in shown)]
    assert len(rows) == 3 and rows[2][:2] == ["dino_vitb", "lambda_reg=3.0"]
    cells = rows[2][2:]
    assert len(cells) == len(shown)
    for cell, name in zip(cells, shown):
        _, base, proj = RESULTS[name]
        b, p = 100 * base[COLUMNS[name][1]], 100 * proj[COLUMNS[name][1]]
        assert cell == f"{b:.1f} / {p:.1f} ({p - b:+.1f})"
    assert cells[-1] == "30.5 / 28.7 (-1.8)"
    with open(files["table.csv"]) as f:
        line = next(csv.DictReader(f))
    assert float(line["UCF101 top-1 [ucf_knn] delta"]) == pytest.approx(3.8)
