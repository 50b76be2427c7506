"""The synthetic UCF-style world of the video-level tests and the independent side of their
expectations: lists read with ``read_split_list``, videos found by hand, vectors from
``ClipFeatureSource`` and numbers from the metric functions called directly."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cosettle.eval import cli as eval_cli
from cosettle.eval.video import metrics
from cosettle.eval.video.clip_features import ClipFeatureSource, ClipProtocol
from cosettle.eval.video.datasets import ActionVideo, read_split_list
from cosettle.eval.video.synthetic import write_action_world
from cosettle.pipeline.backbones import load_backbone

ARCH = dict(embed_dim=32, depth=1, num_heads=2, img_size=64)
CLASSES, TRAIN, TEST, FRAMES = 4, 4, 2, 16
# 16 frames, 2 clips of 4 frames 4 apart (the default stride): span 13, starts linspace(0, 3, 2) -> [0, 3].
PROTOCOL = dict(clips=2, frames=4)
HAND_INDICES = [[0, 4, 8, 12], [3, 7, 11, 15]]
PROTOCOL_RECORD = {"clips": 2, "frames": 4, "stride": 4, "pooling": "cls", "resize": 256, "levels": []}
VIDEOS = CLASSES * (TRAIN + TEST)
READABLE = {"MoveRight": "move right", "MoveLeft": "move left", "MoveDown": "move down", "MoveUp": "move up"}



def make_world(folder: Path) -> dict:
    return write_action_world(folder, classes=CLASSES, train_per_class=TRAIN,
                              test_per_class=TEST, frames=FRAMES)


def entries(lists: Path, split: int, subset: str) -> list[tuple[str, int]]:
    """(video name without extension, label) of a list file, read with read_split_list."""
    rows = read_split_list(lists / f"{subset}list{split:02d}.txt")
    return [(entry.removesuffix(".mp4"), label) for entry, label in rows]


def find(root: Path, name: str) -> Path:
    """The world writes ``<name>.mp4`` files and ``<name>/`` frame folders."""
    path = root / f"{name}.mp4"
    return path if path.is_file() else root / name



def video_vectors(world: dict, folder: Path) -> dict[str, np.ndarray]:
    """Video vectors (cls pooling) of every video of the world, by name."""
    rows = entries(world["lists"], 1, "train") + entries(world["lists"], 1, "test")
    videos = [ActionVideo(name, find(world["videos"], name), label, name.split("/")[0]) for name, label in rows]
    assert len(videos) == VIDEOS and {v.path.suffix for v in videos} == {".mp4", ""}
    backbone = load_backbone("dino_vitb", "random", arch=ARCH)
    source = ClipFeatureSource(backbone, ClipProtocol(**PROTOCOL), folder / "clips.zarr")
    x, unreadable = source.video_vectors("ucf101", videos)
    assert unreadable == [] and x.shape == (VIDEOS, ARCH["embed_dim"])
    return {v.name: row for v, row in zip(videos, x)}



def expected(task: str, train: list[tuple[str, int]], test: list[tuple[str, int]], vectors: dict) -> dict:
    """The task's numbers from the metric functions, on the assignment given."""
    xtr, ytr = np.stack([vectors[n] for n, _ in train]), np.array([y for _, y in train])
    xte, yte = np.stack([vectors[n] for n, _ in test]), np.array([y for _, y in test])
    if task == "knn":
        return metrics.knn_classify(xtr, ytr, xte, yte, CLASSES, k=20, temperature=0.07)
    if task == "retrieval":
        return metrics.recall_at_k(xte, yte, xtr, ytr)
    probe = metrics.linear_probe(xtr, ytr, xte, yte)
    return {"top1": probe["top1"], "top5": probe["top5"], "C": probe["C"]}


def assert_same(got, want) -> None:
    """Nested dicts of numbers, equal up to float rounding."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (got, want)
        for k in want:
            assert_same(got[k], want[k])
    else:
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)



def cosettle_eval(world: dict, out: Path, cache: Path, *extra, lists: Path | None = None, root: Path | None = None):
    args = ["ucf101", "--root", root or world["videos"], "--lists", lists or world["lists"],
            "--clips", PROTOCOL["clips"], "--frames", PROTOCOL["frames"], "--device", "cpu",
            "--cache", cache, "--out", out, *extra]
    if "--backbone" not in extra:
        args += ["--backbone", "dino_vitb", "--weights", "random", "--arch", json.dumps(ARCH)]
    return CliRunner().invoke(eval_cli.main, [str(a) for a in args])


def read(out: Path) -> tuple[dict, dict, list[list[str]]]:
    """summary.json, run.json and per_split.csv of a run."""
    with open(out / "per_split.csv") as f:
        table = list(csv.reader(f))
    return json.loads((out / "summary.json").read_text()), json.loads((out / "run.json").read_text()), table


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0 and not isinstance(result.exception, (AssertionError, TypeError)), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def refuse_forward(self, images):
    raise AssertionError("the backbone ran: the clip cache was not reused")

