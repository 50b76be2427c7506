"""Video-level tasks beyond the command's one-split runs: CLIP zero-shot against the fake archive's
own ``encode_image`` / ``encode_text``, its one-line refusals, and the sweep file's ucf101
evaluations (parsed, blamed by line, run as the command runs)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from action_world import (
    ARCH,
    CLASSES,
    FRAMES,
    HAND_INDICES,
    PROTOCOL,
    PROTOCOL_RECORD,
    READABLE,
    assert_same,
    cosettle_eval,
    entries,
    find,
    one_line_error,
    read,
    refuse_forward,
)
from fake_clip import BACKBONE_ARCH, EMBED, GRID, PATCH, write_release
from open_clip.tokenizer import SimpleTokenizer

from cosettle.app.sweep_file import parse_sweep
from cosettle.app.sweep_toml import SweepFileError
from cosettle.eval.frame.analysis_report import clip_input
from cosettle.eval.task import TaskContext, discover
from cosettle.eval.video.clip_features import ClipFeatureSource, ClipProtocol
from cosettle.eval.video.datasets import ActionVideo
from cosettle.pipeline.backbones import Backbone, load_backbone
from cosettle.pipeline.text_tower import DEFAULT_TEMPLATES, load_clip_text
from cosettle.pipeline.videos import open_video

# ---------------------------------------------------------------- zero-shot


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("clip") / "ViT-B-16.pt", seed=3)


def topk(scores: torch.Tensor, labels: list[int], k: int) -> float:
    """Fraction of rows whose true class has fewer than min(k, C) classes scoring at least as high."""
    true = scores[torch.arange(len(labels)), torch.tensor(labels)]
    ahead = (scores >= true[:, None]).sum(1) - 1
    return float((ahead < min(k, scores.shape[1])).float().mean())


def test_zeroshot_end_to_end_matches_the_archive_forward(world, release, tmp_path, monkeypatch):
    # A random CLIP ranks the classes about the same for every video, so on a balanced test list
    # top-1 would be 1/C whatever the text side did; 1, 2, 3, 4 videos per class make it tell.
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(world["lists"] / "classInd.txt", lists / "classInd.txt")
    (lists / "testlist01.txt").write_text("".join(f"{c}/v_{c}_g{g:02d}_c01.mp4 {label}\n"
                                                  for label, c in enumerate(world["classes"])
                                                  for g in range(1, label + 2)))
    cache = tmp_path / "zs.zarr"
    result = cosettle_eval(world, tmp_path / "out", cache, "--task", "zeroshot", "--backbone", "clip_vitb",
                           "--weights", release, "--arch", json.dumps(BACKBONE_ARCH), lists=lists)
    assert result.exit_code == 0, result.output
    summary, record, _ = read(tmp_path / "out")

    archive = torch.jit.load(str(release), map_location="cpu").eval()
    test = entries(lists, 1, "test")
    assert len(test) == 10
    per_clip = []
    with torch.no_grad():
        for name, _ in test:
            video = open_video(find(world["videos"], name))
            assert len(video) == FRAMES
            x = clip_input(video.get([i for clip in HAND_INDICES for i in clip]), PATCH * GRID, 256)
            frames = F.normalize(archive.encode_image(x), dim=-1)
            per_clip.append(frames.reshape(2, 4, EMBED).mean(dim=1))
        videos = torch.stack([c.mean(dim=0) for c in per_clip])
        texts = [t.format(READABLE[c]) for c in world["classes"] for t in DEFAULT_TEMPLATES]
        tokens = SimpleTokenizer()(texts, context_length=77)
        text = F.normalize(archive.encode_text(tokens), dim=-1).reshape(CLASSES, len(DEFAULT_TEMPLATES), EMBED)
        classes = F.normalize(text.mean(dim=1), dim=-1)
    scores = F.normalize(videos, dim=-1) @ classes.T
    labels = [y for _, y in test]
    want = {"top1": topk(scores, labels, 1), "top5": topk(scores, labels, 5)}
    assert_same(summary, {**want, "splits": {"1": want}})
    # the cached per-clip vectors the command wrote are the archive's, so the match is no chance
    clip_text = load_clip_text(release)
    source = ClipFeatureSource(load_backbone("clip_vitb", release, arch=BACKBONE_ARCH),
                               ClipProtocol(pooling="clip", **PROTOCOL), cache, clip_text=clip_text)
    monkeypatch.setattr(Backbone, "tokens", refuse_forward)
    for (name, label), clips in zip(test, per_clip):
        video = ActionVideo(name, find(world["videos"], name), label, name.split("/")[0])
        assert np.allclose(source.clip_vectors("ucf101", video), clips.numpy(), atol=1e-4)
    # and the classifier is the archive's template-averaged text embeddings of the readable names
    assert torch.allclose(clip_text.class_embeddings(world["classes"]), classes, atol=1e-5)
    assert record["features"]["protocol"]["pooling"] == "clip"
    assert record["features"]["text_weights_sha256"] == hashlib.sha256(release.read_bytes()).hexdigest()
    assert [r["subset"] for r in record["lists_read"]] == ["test"]


def test_zeroshot_refusals_are_one_line(world, release, tmp_path):
    result = cosettle_eval(world, tmp_path / "a", tmp_path / "a.zarr", "--task", "zeroshot")
    assert one_line_error(result) == "Error: dino_vitb has no text encoder; zero-shot needs a CLIP backbone"
    result = cosettle_eval(world, tmp_path / "b", tmp_path / "b.zarr", "--task", "zeroshot", "--pooling", "mean",
                           "--backbone", "clip_vitb", "--weights", release, "--arch", json.dumps(BACKBONE_ARCH))
    assert one_line_error(result) == \
        "Error: pooling: zero-shot compares CLIP embeddings; use pooling 'clip', not 'mean'"


# ---------------------------------------------------------------- the sweep


SWEEP = """\
[sweep]
out = "out"

[datasets.train]
videos = "{videos}"
[datasets.actions]
root = "{videos}"

[[backbones]]
name = "dino_vitb"
weights = "random"
arch = {{ embed_dim = 32, depth = 1, num_heads = 2, img_size = 64 }}

[evaluations.ucf_knn]
kind = "ucf101"
dataset = "actions"
task = "{task}"
lists = "{lists}"
clips = 2
frames = 4
pooling = "mean"
"""


def test_sweep_parses_blames_the_line_and_runs_as_the_command(world, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(videos=world["videos"], lists=world["lists"], task="knn"))
    (evaluation,) = parse_sweep(path).evaluations
    assert (evaluation.name, evaluation.kind) == ("ucf_knn", "ucf101")
    assert evaluation.dataset.root == world["videos"].resolve()
    options = evaluation.options
    assert (options["task"], options["lists"], options["clips"], options["frames"], options["pooling"]) == \
        ("knn", str(world["lists"].resolve()), 2, 4, "mean")
    assert (options["split"], options["k"], options["strict"]) == ("1", 20, False)

    bad = tmp_path / "bad.toml"
    text = SWEEP.format(videos=world["videos"], lists=world["lists"], task="knnn")
    bad.write_text(text)
    with pytest.raises(SweepFileError) as info:
        parse_sweep(bad)
    line = text.splitlines().index('task = "knnn"') + 1
    assert str(info.value).startswith(f"{bad}:{line}: evaluations.ucf_knn.task:"), str(info.value)
    assert "unknown 'knnn'" in str(info.value) and "\n" not in str(info.value)

    context = TaskContext("dino_vitb", "random", tmp_path / "sweep", ARCH, root=evaluation.dataset.root,
                          cache=tmp_path / "sweep.zarr", device="cpu")
    summary = discover()["ucf101"].run(context, options)
    result = cosettle_eval(world, tmp_path / "cli", tmp_path / "cli.zarr", "--task", "knn", "--pooling", "mean")
    assert result.exit_code == 0, result.output
    cli_summary, cli_record, _ = read(tmp_path / "cli")
    assert_same(summary, cli_summary)
    sweep_record = read(tmp_path / "sweep")[1]
    for record in (cli_record, sweep_record):
        assert record["features"]["protocol"] == PROTOCOL_RECORD | {"pooling": "mean"}
        assert (record["task"], record["lists"]) == ("knn", str(world["lists"].resolve()))


