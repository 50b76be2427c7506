"""Video-level evaluation end to end: ``cosettle-eval ucf101`` (retrieval, kNN, linear probe) on a
synthetic UCF-style world, one split and all three, missing and undecodable videos.

Expectations are computed independently of the evaluation's wiring (see ``action_world``): video
vectors from ``ClipFeatureSource.video_vectors`` on the lists this file reads, the train/test
assignment it wrote, the metric functions called directly. Tiny random backbones, 64 px videos of
16 frames, 2 clips of 4 frames.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from action_world import (
    CLASSES,
    PROTOCOL_RECORD,
    TEST,
    TRAIN,
    VIDEOS,
    assert_same,
    cosettle_eval,
    entries,
    expected,
    one_line_error,
    read,
    refuse_forward,
)

from cosettle.eval.video.clip_features import UnreadableVideoWarning
from cosettle.eval.video.datasets import MissingVideosWarning
from cosettle.pipeline.backbones import Backbone


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli") / "clips.zarr"



# ---------------------------------------------------------------- one split


@pytest.mark.parametrize("task", ["knn", "retrieval", "linear"])
def test_one_split_matches_the_metric_functions(task, world, vectors, cli_cache, tmp_path):
    result = cosettle_eval(world, tmp_path / "out", cli_cache, "--task", task)
    assert result.exit_code == 0, result.output
    summary, record, table = read(tmp_path / "out")
    want = expected(task, entries(world["lists"], 1, "train"), entries(world["lists"], 1, "test"), vectors)
    assert_same(summary, {**want, "splits": {"1": want}})  # no _std keys with one split

    assert (record["dataset"], record["task"], record["split"], record["classes"]) == ("ucf101", task, "1", CLASSES)
    assert record["lists"] == str(world["lists"].resolve())
    for report, subset, n in zip(record["lists_read"], ("train", "test"), (CLASSES * TRAIN, CLASSES * TEST)):
        assert (report["split"], report["subset"], report["listed"], report["found"], report["missing"],
                report["unreadable"]) == (1, subset, n, n, 0, 0)
        assert Path(report["list_file"]).name == f"{subset}list01.txt"
    assert len(record["lists_read"]) == 2
    assert record["features"]["protocol"] == PROTOCOL_RECORD
    assert (record["features"]["backbone"], record["features"]["weights"]) == ("dino_vitb", "random")
    assert record["knn"] == ({"k": 20, "temperature": 0.07} if task == "knn" else None)
    assert_same(record["results"], summary)

    assert table[0] == ["split", *want] and len(table) == 2 and table[1][0] == "1"
    assert [float(v) for v in table[1][1:]] == pytest.approx(list(want.values()))
    assert result.output.splitlines()[0].split() == ["split", *want]


# ---------------------------------------------------------------- all three splits


def write_lists(world: dict, folder: Path) -> dict[int, tuple[list, list]]:
    """The world's split 1, and splits 2 and 3 testing on groups 1-2 and 3-4; returns each assignment."""
    folder.mkdir()
    for name in ("classInd.txt", "trainlist01.txt", "testlist01.txt"):
        shutil.copy(world["lists"] / name, folder / name)
    for split, test_groups in ((2, (1, 2)), (3, (3, 4))):
        rows = {"train": [], "test": []}
        for label, cls in enumerate(world["classes"]):
            for g in range(1, TRAIN + TEST + 1):
                rows["test" if g in test_groups else "train"].append(f"{cls}/v_{cls}_g{g:02d}_c01.mp4 {label}\n")
        for subset, lines in rows.items():
            (folder / f"{subset}list{split:02d}.txt").write_text("".join(lines))
    return {s: (entries(folder, s, "train"), entries(folder, s, "test")) for s in (1, 2, 3)}


def test_all_splits_mean_std_and_the_cache_is_reused(world, vectors, tmp_path, monkeypatch):
    splits = write_lists(world, tmp_path / "lists")
    assert len({tuple(test) for _, test in splits.values()}) == 3
    forward = Backbone.tokens
    frames = []

    def counting(self, images):
        frames.append(len(images))
        return forward(self, images)

    monkeypatch.setattr(Backbone, "tokens", counting)
    cache = tmp_path / "clips.zarr"
    result = cosettle_eval(world, tmp_path / "all", cache, "--task", "retrieval", "--split", "all",
                           lists=tmp_path / "lists")
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()] == ["split", "1", "2", "3", "mean", "std"]
    # every video is in three lists, but its 8 distinct frames went through the backbone once
    assert len(frames) == VIDEOS and sum(frames) == VIDEOS * 8

    monkeypatch.setattr(Backbone, "tokens", refuse_forward)
    single = {}
    for s in (1, 2, 3):
        result = cosettle_eval(world, tmp_path / f"s{s}", cache, "--task", "retrieval", "--split", s,
                               lists=tmp_path / "lists")
        assert result.exit_code == 0, result.output
        single[s] = read(tmp_path / f"s{s}")[0]

    summary, record, table = read(tmp_path / "all")
    per_split = {s: expected("retrieval", *splits[s], vectors) for s in (1, 2, 3)}
    keys = list(per_split[1])
    for s in (1, 2, 3):
        assert_same(single[s], {**per_split[s], "splits": {str(s): per_split[s]}})
        assert_same(summary["splits"][str(s)], single[s]["splits"][str(s)])
    for k in keys:
        values = [single[s][k] for s in (1, 2, 3)]
        assert summary[k] == pytest.approx(np.mean(values))
        assert summary[f"{k}_std"] == pytest.approx(np.std(values, ddof=0), abs=1e-12)
    assert set(summary) == {*keys, *(f"{k}_std" for k in keys), "splits"}
    # the splits differ, so the population std is not the sample std
    assert any(np.std([single[s][k] for s in (1, 2, 3)]) > 0 for k in keys)

    assert record["split"] == "all"
    assert [(r["split"], r["subset"]) for r in record["lists_read"]] == [(s, sub) for s in (1, 2, 3)
                                                                         for sub in ("train", "test")]
    assert [r[0] for r in table[1:]] == ["1", "2", "3"]


# ---------------------------------------------------------------- missing and undecodable videos


@pytest.fixture
def copy(world, tmp_path) -> Path:
    """A private copy of the world's videos, to damage."""
    return Path(shutil.copytree(world["videos"], tmp_path / "videos"))


def test_missing_video_warns_and_strict_is_a_one_line_error(world, vectors, copy, tmp_path):
    gone = "MoveRight/v_MoveRight_g01_c01"
    (copy / f"{gone}.mp4").unlink()
    with pytest.warns(MissingVideosWarning) as caught:
        result = cosettle_eval(world, tmp_path / "out", tmp_path / "c.zarr", "--task", "knn", root=copy)
    assert result.exit_code == 0, result.output
    messages = [str(w.message) for w in caught if issubclass(w.category, MissingVideosWarning)]
    assert len(messages) == 1 and gone in messages[0]
    assert f"1 of the {CLASSES * TRAIN} videos of ucf101 split 1 train are missing" in messages[0]
    summary, record, _ = read(tmp_path / "out")
    train = [e for e in entries(world["lists"], 1, "train") if e[0] != gone]
    want = expected("knn", train, entries(world["lists"], 1, "test"), vectors)
    assert_same(summary, {**want, "splits": {"1": want}})
    report = record["lists_read"][0]
    assert (report["subset"], report["listed"], report["found"], report["missing"]) == ("train", 16, 15, 1)
    assert report["missing_examples"] == [gone]

    result = cosettle_eval(world, tmp_path / "strict", tmp_path / "c.zarr", "--task", "knn", "--strict", root=copy)
    one_line_error(result, str(copy), "1 of the 16 videos", gone)
    assert not (tmp_path / "strict" / "summary.json").exists()


def test_undecodable_videos_are_skipped_counted_and_left_out(world, vectors, copy, tmp_path):
    bad = {"MoveLeft/v_MoveLeft_g03_c01": "train", "MoveDown/v_MoveDown_g05_c01": "test"}
    for name in bad:
        (copy / f"{name}.mp4").write_bytes(b"this is no video\x00" * 64)
    with pytest.warns(UnreadableVideoWarning) as caught:
        result = cosettle_eval(world, tmp_path / "out", tmp_path / "c.zarr", "--task", "retrieval", root=copy)
    assert result.exit_code == 0, result.output
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableVideoWarning)]
    assert len(messages) == 2 and all(any(n in m for m in messages) for n in bad)
    summary, record, _ = read(tmp_path / "out")
    train, test = ([e for e in entries(world["lists"], 1, s) if e[0] not in bad] for s in ("train", "test"))
    assert (len(train), len(test)) == (CLASSES * TRAIN - 1, CLASSES * TEST - 1)
    want = expected("retrieval", train, test, vectors)
    assert_same(summary, {**want, "splits": {"1": want}})
    assert 0 < want["R@1"] < 1  # a test video kept (any vector) would change the denominators
    counts = {r["subset"]: (r["listed"], r["found"], r["missing"], r["unreadable"]) for r in record["lists_read"]}
    assert counts == {"train": (16, 16, 0, 1), "test": (8, 8, 0, 1)}


