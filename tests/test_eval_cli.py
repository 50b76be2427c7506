"""cosettle-eval end to end on tiny synthetic DAVIS, JHMDB and VIP trees with a tiny random ViT."""
import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from cosettle.eval import cli
from cosettle.eval.frame.datasets import DatasetError, davis_videos, jhmdb_split, read_frame
from cosettle.eval.frame.features import CacheError, FeatureSource
from cosettle.eval.frame.keypoints import read_jhmdb_joints
from cosettle.eval.frame.palette import davis_palette, read_indexed_png, save_indexed_png
from cosettle.eval.frame.propagation import preset
from cosettle.eval.frame.run import EvalConfig
from cosettle.eval.frame.synthetic import write_davis, write_jhmdb, write_vip
from cosettle.eval.tasks import davis, jhmdb, vip
from cosettle.pipeline.backbones import Backbone, load_backbone
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder
from cosettle.pipeline.transforms import normalize, to_float
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.projection import build_projection

TINY = dict(embed_dim=64, depth=2, num_heads=2)
SMALL = preset("dino", short_side=64, multiple=32)  # 64 x 96 frames -> 64 x 96 input, a 4 x 6 grid


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("DAVIS")
    write_davis(root, ["bear", "car"], frames=5, height=64, width=96, objects=2)
    return root


def config(root: Path, out: Path, cache: Path, **kw) -> EvalConfig:
    base = EvalConfig(root=root, out=out, backbone="dino_vitb", weights="random", settings=SMALL, device="cpu",
                      cache=cache, arch=TINY, batch_size=3)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def davis_run(davis_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    cfg = config(davis_root, base / "out", base / "cache.zarr")
    return cfg, davis.evaluate_davis(cfg, overlays=True)


def test_davis_outputs(davis_root, davis_run):
    cfg, summary = davis_run
    out = Path(cfg.out)
    assert set(summary) == {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}
    assert all(0 <= summary[k] <= 1 for k in ("J-Mean", "F-Mean", "J-Recall", "F-Recall"))
    assert summary == json.loads((out / "summary.json").read_text())
    for video in davis_videos(davis_root):
        first_gt = read_indexed_png(video.labels[0])
        for t, frame in enumerate(video.frames):
            path = out / "predictions" / video.name / f"{frame.stem}.png"
            with Image.open(path) as im:
                assert im.mode == "P"
                assert np.array_equal(np.array(im.getpalette()[:768], np.uint8).reshape(256, 3), davis_palette())
            pred = read_indexed_png(path)
            assert pred.shape == first_gt.shape and pred.max() <= first_gt.max()
            if t == 0:
                np.testing.assert_array_equal(pred, first_gt)
        assert (out / "overlays" / f"{video.name}_sheet.png").is_file()
        assert len(list((out / "overlays" / video.name).glob("*.png"))) == len(video.frames)
    rows = list(csv.DictReader(open(out / "per_object.csv")))
    assert [(r["sequence"], r["object"]) for r in rows] == [("bear", "1"), ("bear", "2"), ("car", "1"), ("car", "2")]
    assert len(list(csv.DictReader(open(out / "per_sequence.csv")))) == 2
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["short_side"] == 64 and record["backbone"]["weights"] == "random"
    assert record["projection"] is None and record["results"] == summary


def test_cached_features_are_the_backbone_tokens(davis_root, davis_run):
    cfg, _ = davis_run
    backbone = load_backbone("dino_vitb", "random", arch=TINY)
    video = davis_videos(davis_root)[0]
    x = normalize(to_float(read_frame(video.frames[2])[None]), SMALL.mean, SMALL.std)  # already 64 x 96
    expected = backbone.patch_features(x).reshape(4, 6, 64)
    source = FeatureSource(backbone, SMALL, cfg.cache)
    cached = torch.from_numpy(source.backbone_features("davis/480p", video)[2]).float()
    torch.testing.assert_close(cached, expected, atol=2e-2, rtol=1e-2)  # stored as float16
    meta = source.cache.group.attrs["cosettle_eval_features"]
    assert meta["key"]["std"] == [0.228, 0.224, 0.225] and meta["environment"]["cosettle_version"]


def test_projection_reuses_the_cache(davis_root, davis_run, tmp_path, monkeypatch):
    cfg, _ = davis_run

    def no_forward(*a, **k):
        raise AssertionError("the backbone ran although its features are cached")

    monkeypatch.setattr(Backbone, "patch_features", no_forward)
    proj = torch.nn.Linear(64, 64)
    summary = davis.evaluate_davis(replace(cfg, out=tmp_path / "proj", projection=proj))
    assert json.loads((tmp_path / "proj" / "run.json").read_text())["projection"] == {"module": "Linear"}
    assert 0 <= summary["J&F-Mean"] <= 1
    source = FeatureSource(load_backbone("dino_vitb", "random", arch=TINY), SMALL, cfg.cache, proj)
    video = davis_videos(davis_root)[1]
    projected = list(source.features("davis/480p", video))
    raw = torch.from_numpy(source.backbone_features("davis/480p", video)[:]).float()
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(projected), proj(raw))


def test_cache_made_otherwise_is_refused(davis_root, davis_run, tmp_path):
    cfg, _ = davis_run
    with pytest.raises(CacheError, match=f"{cfg.cache}: features cache made with other settings.*dim"):
        davis.evaluate_davis(replace(cfg, out=tmp_path / "a", arch=dict(embed_dim=32, depth=2, num_heads=2)))
    with pytest.raises(CacheError, match=f"{cfg.cache}: .*std"):
        davis.evaluate_davis(replace(cfg, out=tmp_path / "b", settings=SMALL.with_overrides(std=(0.229, 0.224, 0.225))))
    with pytest.raises(CacheError, match=f"{cfg.cache}: .*input"):
        davis.evaluate_davis(replace(cfg, out=tmp_path / "c", settings=SMALL.with_overrides(size=(64, 64))))


def test_cache_of_other_frames_is_refused(davis_root, davis_run, tmp_path):
    cfg, _ = davis_run
    other = tmp_path / "DAVIS"
    shutil.copytree(davis_root, other)
    frame = other / "JPEGImages" / "480p" / "car" / "00003.jpg"
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(frame)
    with pytest.raises(CacheError, match="car were made from other frames"):
        davis.evaluate_davis(replace(cfg, root=other, out=tmp_path / "out"))


def invoke(args: list[str]):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_cli_davis_end_to_end(davis_root, tmp_path):
    result = invoke(["davis", "--root", davis_root, "--backbone", "dino_vitb", "--weights", "random",
                     "--arch", json.dumps(TINY), "--short-side", "64", "--multiple", "32", "--topk", "3",
                     "--no-minmax", "--device", "cpu", "--cache", tmp_path / "c.zarr", "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    assert "J&F-Mean" in result.output
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    expected = dict(SMALL.as_dict(), topk=3, minmax=False)
    assert record["settings"] == expected  # unset options keep the preset's values
    assert len(list((tmp_path / "out" / "predictions" / "bear").glob("*.png"))) == 5


def test_cli_score_only_ground_truth_is_perfect(davis_root, tmp_path):
    preds = tmp_path / "preds"
    shutil.copytree(davis_root / "Annotations" / "480p", preds)
    result = invoke(["davis", "--score-only", "--predictions", preds, "--root", davis_root, "--out", tmp_path / "o"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["J&F-Mean"] == summary["J-Mean"] == summary["F-Mean"] == 1.0


def test_cli_errors_name_the_file(davis_root, tmp_path):
    preds = tmp_path / "preds"
    shutil.copytree(davis_root / "Annotations" / "480p", preds)
    bad = preds / "car" / "00002.png"
    save_indexed_png(bad, np.full((64, 96), 7, np.uint8))
    result = invoke(["davis", "--score-only", "--predictions", preds, "--root", davis_root, "--out", tmp_path / "o"])
    assert result.exit_code == 1 and f"{bad}: predicted id 7" in result.output
    assert len(result.output.strip().splitlines()) == 1

    broken = tmp_path / "DAVIS"
    shutil.copytree(davis_root, broken)
    missing = broken / "Annotations" / "480p" / "bear" / "00003.png"
    missing.unlink()
    result = invoke(["davis", "--root", broken, "--backbone", "dino_vitb", "--weights", "random", "--out", tmp_path / "x"])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {missing}: missing annotation"

    result = invoke(["davis", "--root", davis_root, "--out", tmp_path / "y"])
    assert result.exit_code == 2 and "--backbone and --weights are required" in result.output


def test_cli_cache_mismatch_is_one_line(davis_root, davis_run, tmp_path):
    cfg, _ = davis_run
    result = invoke(["davis", "--root", davis_root, "--backbone", "dino_vitb", "--weights", "random",
                     "--arch", json.dumps(TINY), "--short-side", "64", "--multiple", "32", "--device", "cpu",
                     "--cache", cfg.cache, "--out", tmp_path / "out", "--std", "0.229", "0.224", "0.225"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {cfg.cache}: features cache made with other settings")
    assert len(result.output.strip().splitlines()) == 1


def test_vip_counts_every_frame(tmp_path):
    root = tmp_path / "VIP_Fine"
    write_vip(root, ["v1", "v2"], frames=4, height=64, width=48)
    cfg = config(root, tmp_path / "out", tmp_path / "c.zarr", settings=preset("dino", size=(64, 48)))
    summary = vip.evaluate_vip(cfg)
    conf = np.loadtxt(tmp_path / "out" / "confusion.csv", delimiter=",", dtype=np.int64)
    # the confusion matrix holds every pixel of every frame, frame 0 (predicted = truth) included
    assert conf.sum() == 2 * 4 * 64 * 48
    first = read_indexed_png(root / "Annotations" / "Category_ids" / "v1" / "00000.png")
    assert np.all(np.diag(conf)[: first.max() + 1] > 0)
    assert 0 < summary["mIoU"] <= 1 and summary["IoU"]["left-shoe"] is None
    rows = list(csv.reader(open(tmp_path / "out" / "per_class.csv")))
    assert rows[0] == ["class", "IoU"] and len(rows) == 21


def test_cli_vip_and_jhmdb(tmp_path):
    write_vip(tmp_path / "VIP", ["v1"], frames=3, height=64, width=48)
    result = invoke(["vip", "--root", tmp_path / "VIP", "--backbone", "dino_vitb", "--weights", "random",
                     "--arch", json.dumps(TINY), "--size", "64x48", "--device", "cpu",
                     "--cache", tmp_path / "cv.zarr", "--out", tmp_path / "vip"])
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output
    assert json.loads((tmp_path / "vip" / "run.json").read_text())["settings"]["size"] == [64, 48]

    split = write_jhmdb(tmp_path / "JHMDB", ["walk/clip_a", "run/clip_b"], frames=4)
    result = invoke(["jhmdb", "--root", tmp_path / "JHMDB", "--split", split, "--backbone", "dino_vitb",
                     "--weights", "random", "--arch", json.dumps(TINY), "--device", "cpu",
                     "--cache", tmp_path / "cj.zarr", "--out", tmp_path / "jhmdb"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "jhmdb" / "run.json").read_text())
    assert record["settings"]["size"] == [320, 320] and record["settings"]["window"] == "disk"  # CRW protocol
    summary = json.loads((tmp_path / "jhmdb" / "summary.json").read_text())
    per_joint = [summary["per_joint"]["PCK@0.1"][j] for j in jhmdb.JOINTS]
    assert summary["PCK@0.1"] == pytest.approx(np.mean(per_joint))
    assert summary["PCK@0.1"] <= summary["PCK@0.2"]
    keypoints = np.load(tmp_path / "jhmdb" / "keypoints.npz")
    gt = read_jhmdb_joints(tmp_path / "JHMDB" / "joint_positions" / "walk" / "clip_a" / "joint_positions.mat")
    assert keypoints["walk/clip_a"].shape == gt.shape == (4, 15, 2)


def test_jhmdb_frame_zero_round_trip(tmp_path):
    # frame 0's Gaussian maps, decoded, give back its joints to within a grid cell
    split = write_jhmdb(tmp_path / "J", ["walk/a"], frames=3)
    cfg = config(tmp_path / "J", tmp_path / "o", tmp_path / "c.zarr", settings=preset("crw", size=(320, 320)))
    source = FeatureSource(load_backbone("dino_vitb", "random", arch=TINY), cfg.settings, cfg.cache)
    video = jhmdb.jhmdb_videos(cfg.root, split)[0]
    pred, gt = jhmdb.predict_keypoints(video, source, cfg.settings)
    cell = np.array([64 / 20, 48 / 20])
    assert np.all(np.abs(pred[0] - gt[0]) <= cell)


def test_jhmdb_split_files(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "walk_test_split1.txt").write_text("a.avi 1\nb.avi 2 \n\n")
    (splits / "run_test_split1.txt").write_text("c.avi 2\n")
    assert jhmdb_split(splits) == ["run/c", "walk/b"]
    crw = tmp_path / "list.txt"
    crw.write_text("/d/JHMDB/Rename_Images/walk/b /d/JHMDB/joint_positions/walk/b/joint_positions.mat\nrun/c\n")
    assert jhmdb_split(crw) == ["walk/b", "run/c"]
    (splits / "run_test_split1.txt").write_text("c.avi two\n")
    with pytest.raises(DatasetError, match="run_test_split1.txt: unexpected line"):
        jhmdb_split(splits)


def test_shipped_jhmdb_split_list():
    names = jhmdb_split(Path(__file__).parents[1] / "data_manifests" / "jhmdb_split1_test.txt")
    classes = {n.split("/")[0] for n in names}
    assert len(names) == len(set(names)) == 268 and len(classes) == 21
    assert all(f"_{n.split('/')[0]}_" in n.split("/")[1] for n in names)


def fake_run(path: Path, dim: int, backbone: str = "dino_vitb", sha: str = "random") -> Path:
    """A finished cosettle-train run directory holding a seed-1 linear projection."""
    path.mkdir(parents=True)
    save_file(build_projection(dim, "linear", seed=1).state_dict(), str(path / "projection.safetensors"))
    (path / "config.json").write_text(json.dumps({"dim": dim, "backbone": backbone, "weights_sha256": sha,
                                                  "train": TrainConfig(features=("x",), out=str(path)).as_dict()}))
    return path


def test_cli_metrics_side_by_side(tmp_path):
    for i in range(3):
        write_frame_folder(tmp_path / "videos" / f"clip{i}", moving_scene(10, 48, 64, 2, seed=i)[0])
    run = fake_run(tmp_path / "runs" / "p", 64)
    args = ["metrics", "--videos", tmp_path / "videos", "--backbone", "dino_vitb", "--weights", "random",
            "--arch", json.dumps(TINY), "--device", "cpu", "--out", tmp_path / "m"]
    result = invoke(args + ["--projection", run])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(open(tmp_path / "m" / "metrics.csv")))
    assert rows[0] == ["metric", "baseline", "projection"]
    metrics = {r[0]: (float(r[1]), float(r[2])) for r in rows[1:]}
    assert set(metrics) >= {"inter_video_distance", "inter_video_distance/diameter@90", "intra_video_distance",
                            "intra_video_distance/diameter@100", "effective_rank", "cycle_accuracy"}
    assert all(np.isfinite(v).all() for v in metrics.values())
    # a LayerNorm output has a different scale from the raw tokens
    assert metrics["inter_video_distance"][0] != pytest.approx(metrics["inter_video_distance"][1])
    assert all(0 <= v <= 1 for v in metrics["cycle_accuracy"])
    data = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert data["videos"] == 3 and data["projection"]["fusion"] == "linear"

    other = fake_run(tmp_path / "runs" / "q", 64, backbone="mae_vitb")
    result = invoke(args + ["--projection", other])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {other}: projection trained on backbone 'mae_vitb', but the evaluated backbone has 'dino_vitb'"
