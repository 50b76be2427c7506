"""Clip-level objectives end to end: a clip store extracted from synthetic action videos, VTHCL and
CSTP trained on it with neither the videos nor the backbone reachable, the trained head evaluated
on UCF-style kNN against an independent computation, and the one-line refusals.

Independent side: frames decoded here (PIL for frame folders, decord for mp4 files), the clip
indices checked by hand, the per-level vectors from timm's ``forward_intermediates`` (never
``Backbone.level_vectors``), the head's ``embed`` of the run loaded with ``load_trained``, and
``knn_classify`` called on the lists as this file reads them.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

import cosettle.pipeline.backbones as backbones_module
import cosettle.pipeline.videos as videos_module
from cosettle.eval import cli as eval_cli
from cosettle.eval.frame.analysis_report import clip_input
from cosettle.eval.video import metrics
from cosettle.eval.video.clip_features import ClipProtocol, UnreadableVideoWarning, clip_indices
from cosettle.eval.video.datasets import read_split_list
from cosettle.eval.video.synthetic import write_action_world
from cosettle.pipeline.backbones import Backbone, load_backbone
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.store import open_store
from cosettle.trainer import cli as train_cli
from cosettle.trainer.synthetic import write_synthetic_store
from cosettle.trainer.trained import load_trained

ARCH = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}
LEVELS, CLIP_FRAMES, VIEWS, POOLING = (1, 2), 4, 2, "cls+mean"
CLASSES, TRAIN, TEST, FRAMES = 4, 4, 2, 16
VIDEOS = CLASSES * (TRAIN + TEST)
OBJECTIVES = ("vthcl", "cstp")
# Evaluation: 2 clips of the store's 4 frames, the default stride 4: span 13, starts linspace(0, 16 - 13, 2)
# rounded half up = [0, 3].
EVAL_CLIPS = 2
HAND_INDICES = [[0, 4, 8, 12], [3, 7, 11, 15]]
STORE_PROTOCOL = {"frames": CLIP_FRAMES, "levels": list(LEVELS), "pooling": POOLING}


pytestmark = pytest.mark.torch_threads(2)


def make_world(folder: Path) -> dict:
    return write_action_world(folder, classes=CLASSES, train_per_class=TRAIN, test_per_class=TEST, frames=FRAMES)


def extract_clips(videos: Path, out: Path, plan: str, **kw):
    base = {"videos": videos, "out": out, "backbone": "dino_vitb", "weights": "random", "arch": ARCH,
            "layout": "clips", "plan": plan, "clip_frames": CLIP_FRAMES, "levels": LEVELS, "pooling": POOLING,
            "views": VIEWS, "workers": 0, "chunk_videos": 8, "batch_size": 64, "device": "cpu"}
    return extract(ExtractConfig(**(base | kw)))


def train_args(store: Path, out: Path, objective: str, *extra) -> list[str]:
    args = ["--features", str(store), "--out", str(out), "--objective", objective, "--epochs", "2",
            "--batch-size", "4", "--blr", "1.0", "--device", "cpu", "--width", "32", "--depth", "1",
            "--shuffle-chunks", "2", "--io-threads", "1", *extra]
    return args + (["--queue", "64"] if objective == "vthcl" else [])


def one_line(result, exit_code: int) -> str:
    """The only line a refused command printed (stdout and stderr together)."""
    assert result.exit_code == exit_code and not isinstance(result.exception, (AssertionError, TypeError)), \
        (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# ---------------------------------------------------------------- stores, then training without videos


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A clip store of each plan, extracted from a world whose videos are then deleted."""
    root = tmp_path_factory.mktemp("extract")
    world = make_world(root / "world")
    out = {plan: extract_clips(world["videos"], root / f"{plan}.zarr", plan).path for plan in OBJECTIVES}
    shutil.rmtree(world["videos"])
    assert not world["videos"].exists()
    return out


@pytest.fixture(scope="module")
def runs(stores, tmp_path_factory) -> dict:
    """Each objective trained through cosettle-train while every way to a video or the backbone raises."""
    root = tmp_path_factory.mktemp("runs")
    touched: list[str] = []

    def refuse(what):
        def refused(*args, **kwargs):
            touched.append(what)
            raise AssertionError(f"training touched {what}")
        return refused

    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones_module, "load_backbone", refuse("load_backbone"))
        mp.setattr(Backbone, "tokens", refuse("Backbone.tokens"))
        mp.setattr(Backbone, "level_vectors", refuse("Backbone.level_vectors"))
        mp.setattr(videos_module, "open_video", refuse("open_video"))
        for objective in OBJECTIVES:
            results[objective] = CliRunner().invoke(train_cli.main,
                                                    train_args(stores[objective], root / objective, objective))
    return {"dirs": {o: root / o for o in OBJECTIVES}, "results": results, "touched": touched}


def finite_numbers(record: dict) -> list[float]:
    values = [v for v in record.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert values and all(math.isfinite(v) for v in values), record
    return values


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_reads_only_the_clip_store(objective, stores, runs):
    result, run = runs["results"][objective], runs["dirs"][objective]
    assert result.exit_code == 0, (result.output, result.exception)
    assert runs["touched"] == []
    for name in ("config.json", "summary.json", "projection.safetensors", "metrics_steps.jsonl", "metrics_epochs.jsonl"):
        assert (run / name).is_file(), name

    config = json.loads((run / "config.json").read_text())
    store = open_store(stores[objective])
    settings = config["stores"][0]["settings"]
    assert len(config["stores"]) == 1 and config["stores"][0]["path"] == str(Path(stores[objective]).resolve())
    assert settings == store.settings
    assert (settings["layout"], settings["plan"], settings["frames"], settings["levels"], settings["pooling"],
            settings["dim"], settings["views"]) == ("clips", objective, CLIP_FRAMES, list(LEVELS), POOLING, 64, VIEWS)
    assert (config["backbone"], config["weights_sha256"], config["dim"]) == ("dino_vitb", "random", 64)
    assert config["stores"][0]["valid_videos"] == VIDEOS
    train = config["train"]
    assert (train["objective"], train["epochs"], train["batch_size"], train["width"], train["depth"]) == \
        (objective, 2, 4, 32, 1)
    assert train.get("queue", 64) == 64
    assert (config["steps_per_epoch"], config["total_steps"]) == (VIDEOS // 4, 2 * VIDEOS // 4)

    summary = json.loads((run / "summary.json").read_text())
    finite_numbers(summary["final_epoch"])
    assert summary["final_epoch"]["epoch"] == 1
    steps = [json.loads(line) for line in (run / "metrics_steps.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (run / "metrics_epochs.jsonl").read_text().splitlines()]
    assert len(steps) == 2 * VIDEOS // 4 and [e["epoch"] for e in epochs] == [0, 1]
    for record in steps + epochs:
        finite_numbers(record)
    assert json.loads(result.output[result.output.index("{"):]) == pytest.approx(summary["final_epoch"])

    model, loaded = load_trained(run)
    assert loaded == config and hasattr(model, "embed")
    x = torch.randn(3, CLIP_FRAMES, len(LEVELS), 64)
    assert model.embed(x).shape == (3, len(LEVELS) * 32) and torch.isfinite(model.embed(x)).all()


# ---------------------------------------------------------------- evaluation with the trained head


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The action world again (the extraction's was deleted)."""
    return make_world(tmp_path_factory.mktemp("evalworld"))


def entries(world: dict, subset: str) -> list[tuple[str, int]]:
    rows = read_split_list(world["lists"] / f"{subset}list01.txt")
    return [(entry.removesuffix(".mp4"), label) for entry, label in rows]


def decode(world: dict, name: str, indices: list[int]) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of a world video, decoded here (frame folder or mp4)."""
    path = world["videos"] / f"{name}.mp4"
    if path.is_file():
        import decord

        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        assert len(reader) == FRAMES
        return reader.get_batch(indices).asnumpy()
    files = sorted((world["videos"] / name).iterdir())
    assert len(files) == FRAMES
    return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in indices])


def level_vectors_by_hand(vit, x: torch.Tensor) -> torch.Tensor:
    """[B, L, 2D]: per level (after the final norm) the class token and the patch mean, via timm."""
    levels = vit.forward_intermediates(x, indices=[b - 1 for b in LEVELS], norm=True, output_fmt="NLC",
                                       intermediates_only=True, return_prefix_tokens=True)
    return torch.stack([torch.cat([prefix[:, 0], patches.mean(1)], -1) for patches, prefix in levels], dim=1)


def independent_clip_vectors(world: dict, run: Path) -> dict[str, np.ndarray]:
    """Per-clip vectors [clips, D_out] of every listed video, by name."""
    head, _ = load_trained(run)
    vit = load_backbone("dino_vitb", "random", arch=ARCH).model.eval()
    indices = clip_indices(FRAMES, ClipProtocol(clips=EVAL_CLIPS, frames=CLIP_FRAMES))
    assert indices.tolist() == HAND_INDICES
    out = {}
    with torch.no_grad():
        for name, _ in entries(world, "train") + entries(world, "test"):
            frames = decode(world, name, [i for clip in HAND_INDICES for i in clip])
            x = clip_input(frames, ARCH["img_size"], 256)
            assert x.shape == (EVAL_CLIPS * CLIP_FRAMES, 3, 64, 64)
            per_frame = level_vectors_by_hand(vit, x)  # [clips * frames, L, D']
            clips = per_frame.reshape(EVAL_CLIPS, CLIP_FRAMES, len(LEVELS), -1)
            out[name] = head.embed(clips).float().numpy()
    return out


def cosettle_eval(world: dict, out: Path, cache: Path, *extra, backbone=("dino_vitb", "random", ARCH)):
    name, weights, arch = backbone
    args = ["ucf101", "--root", world["videos"], "--lists", world["lists"], "--clips", EVAL_CLIPS,
            "--device", "cpu", "--cache", cache, "--out", out, "--backbone", name, "--weights", weights,
            "--arch", json.dumps(arch), *extra]
    return CliRunner().invoke(eval_cli.main, [str(a) for a in args])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_knn_with_the_trained_head_matches_an_independent_computation(objective, world, runs, stores, tmp_path):
    run = runs["dirs"][objective]
    assert runs["results"][objective].exit_code == 0
    cache = tmp_path / "cache.zarr"
    result = cosettle_eval(world, tmp_path / "out", cache, "--task", "knn", "--projection", run)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    record = json.loads((tmp_path / "out" / "run.json").read_text())

    # the protocol is the run's clip store's frames, levels and pooling (not the defaults 8, [], cls)
    settings = open_store(stores[objective]).settings
    protocol = record["features"]["protocol"]
    assert {k: protocol[k] for k in STORE_PROTOCOL} == {k: settings[k] for k in STORE_PROTOCOL} == STORE_PROTOCOL
    assert protocol == {"clips": EVAL_CLIPS, "stride": 4, "resize": 256, **STORE_PROTOCOL}
    sha = hashlib.sha256((run / "projection.safetensors").read_bytes()).hexdigest()
    projection = record["features"]["projection"]
    assert projection["clip_store"] == {"plan": objective, **STORE_PROTOCOL}
    assert (projection["run_dir"], projection["objective"], projection["run_weights_sha256"]) == \
        (str(run.resolve()), objective, sha)
    assert (record["dataset"], record["task"], record["classes"]) == ("ucf101", "knn", CLASSES)
    assert (record["features"]["backbone"], record["features"]["weights"]) == ("dino_vitb", "random")

    clips = independent_clip_vectors(world, run)
    # the cached per-clip vectors are the head's on the hand-made inputs
    used = Path(record["features"]["cache"])  # the given cache, or one beside it for the run's own protocol
    assert used.parent == cache.parent and used.is_dir()
    group = zarr.open_group(str(used), mode="r")
    for name, want in clips.items():
        entry = group[f"run-{sha[:16]}/ucf101/{name}"]
        assert entry.attrs["frame_indices"] == HAND_INDICES
        np.testing.assert_allclose(entry[...], want, rtol=1e-4, atol=1e-5, err_msg=name)

    train, test = entries(world, "train"), entries(world, "test")
    assert (len(train), len(test)) == (CLASSES * TRAIN, CLASSES * TEST)
    video = {name: c.mean(axis=0) for name, c in clips.items()}
    want = metrics.knn_classify(np.stack([video[n] for n, _ in train]), np.array([y for _, y in train]),
                                np.stack([video[n] for n, _ in test]), np.array([y for _, y in test]),
                                CLASSES, k=20, temperature=0.07)
    assert set(want) == {"top1", "top5"}
    for key in ("top1", "top5"):
        assert summary[key] == pytest.approx(want[key], abs=1e-9)
        assert summary["splits"]["1"][key] == pytest.approx(want[key], abs=1e-9)
    assert record["results"]["top1"] == pytest.approx(want["top1"], abs=1e-9)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("objective,store_kind", [("vthcl", "views"), ("cstp", "views"),
                                                  ("cstp", "vthcl"), ("vthcl", "cstp")])
def test_objective_on_the_wrong_store_is_one_line(objective, store_kind, stores, tmp_path):
    if store_kind == "views":
        store = tmp_path / "views.zarr"
        write_synthetic_store(store, num_videos=8, views=1, dim=16)
    else:
        store = stores[store_kind]
    out = tmp_path / "run"
    result = CliRunner().invoke(train_cli.main, train_args(store, out, objective))
    line = one_line(result, 1)
    assert line.startswith("error: ") and str(store) in line, line
    assert f"'{objective}'" in line, line
    if store_kind == "views":
        assert "a views store" in line and "clips" in line, line
    else:  # names the plan the store was made with, and the one the objective needs
        rest = line.replace(str(store), "")
        assert "plan" in rest and store_kind in rest and objective in rest.replace(f"'{objective}'", "", 1), line
    # a refused run leaves no run directory behind (a later correct run would find one)
    assert not (out / "config.json").exists()


def test_zeroshot_with_a_clip_level_run_is_one_line(world, runs, tmp_path):
    run = runs["dirs"]["cstp"]
    result = cosettle_eval(world, tmp_path / "out", tmp_path / "c.zarr", "--task", "zeroshot", "--projection", run)
    assert one_line(result, 1).startswith("Error: ")  # dino_vitb: no text tower at all

    # a CLIP backbone with a text tower reaches the clip-level refusal itself
    from fake_clip import BACKBONE_ARCH, write_release

    release = write_release(tmp_path / "ViT-B-16.pt", seed=3)
    listing = tmp_path / "four.txt"
    listing.write_text("".join(f"{n}{'.mp4' if (world['videos'] / f'{n}.mp4').exists() else ''}\n"
                               for n, _ in entries(world, "train")[:4]))
    store = extract(ExtractConfig(videos=listing, root=world["videos"], out=tmp_path / "clip.zarr",
                                  backbone="clip_vitb", weights=str(release), arch=BACKBONE_ARCH, layout="clips",
                                  plan="cstp", clip_frames=2, views=1, workers=0, chunk_videos=4, device="cpu",
                                  pooling="cls")).path
    clip_run = tmp_path / "cliprun"
    trained = CliRunner().invoke(train_cli.main, ["--features", str(store), "--out", str(clip_run), "--objective",
                                                  "cstp", "--epochs", "1", "--batch-size", "4", "--width", "16",
                                                  "--depth", "1", "--device", "cpu"])
    assert trained.exit_code == 0, (trained.output, trained.exception)
    result = cosettle_eval(world, tmp_path / "zs", tmp_path / "zs.zarr", "--task", "zeroshot", "--projection",
                           clip_run, backbone=("clip_vitb", release, BACKBONE_ARCH))
    line = one_line(result, 1)
    assert line == (f"Error: {clip_run}: a clip-level head's vectors are not in CLIP's joint space; "
                    "zero-shot takes the frozen backbone or a token-wise projection"), line
    assert not (tmp_path / "zs" / "summary.json").exists()


def test_a_split_without_a_readable_video_is_one_line_with_a_clip_level_run(world, runs, tmp_path):
    """Every listed video undecodable: the clip-level source still knows its vector width."""
    root = tmp_path / "broken"
    for name, _ in entries(world, "train") + entries(world, "test"):
        (root / f"{name}.mp4").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.mp4").write_bytes(b"\x00not a video" * 20)
    args = ["ucf101", "--root", root, "--lists", world["lists"], "--clips", EVAL_CLIPS, "--device", "cpu",
            "--cache", tmp_path / "c.zarr", "--out", tmp_path / "out", "--backbone", "dino_vitb", "--weights", "random",
            "--arch", json.dumps(ARCH), "--task", "knn", "--projection", runs["dirs"]["vthcl"]]
    with pytest.warns(UnreadableVideoWarning) as caught:
        result = CliRunner().invoke(eval_cli.main, [str(a) for a in args])
    assert len(caught) == CLASSES * TEST  # the test list is read first; nothing of it is readable
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    assert result.exit_code == 1 and not isinstance(result.exception, (AttributeError, AssertionError)), \
        (result.output, result.exception)
    assert len(lines) == 1 and "no readable video in ucf101 split 1 test" in lines[0], result.output
