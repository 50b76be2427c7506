"""Extraction forwards each batch as soon as the decoded videos fill it, with the same batches and
tokens as a forward over the whole block at once."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cosettle.pipeline import cli
from cosettle.pipeline import extract as extract_module
from cosettle.pipeline.backbones import Backbone, load_backbone
from cosettle.pipeline.extract import BlockForward, ExtractConfig, VideoViews, extract
from cosettle.pipeline.extract_config import CUDA_WORKERS, decode_workers
from cosettle.pipeline.store import open_store
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder, write_video_file
from cosettle.pipeline.videos import discover_videos

TINY = dict(embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Five videos, mp4 and frame folders, one block."""
    root = tmp_path_factory.mktemp("stream_videos")
    for i in range(5):
        frames, _ = moving_scene(10 + i, 40, 56, 2, seed=i)
        if i % 2:
            write_video_file(root / f"v{i}.mp4", frames)
        else:
            write_frame_folder(root / f"f{i}", frames)
    return root


def config(videos: Path, out: Path) -> ExtractConfig:
    # 3 views: 6 A/B images and 3 A_asy images per video, so batches of 4 straddle videos.
    return ExtractConfig(videos=videos, out=out, backbone="dino_vitb", weights="random", views=3, chunk_videos=5,
                         workers=0, batch_size=4, arch=TINY, dtype="float32")


class Recorder:
    """A plain function over a batch that records the batch sizes it was called with."""

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        self.sizes.append(len(x))
        out = x.sum(dim=(1, 2, 3))
        return out if extra is None else out + extra


def test_batches_run_when_full_and_outputs_do_not_depend_on_arrival(tmp_path):
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    forward = BlockForward(bb, config(tmp_path, tmp_path / "x.zarr"), torch.device("cpu"))
    fn = Recorder()
    stream = forward.stream(fn)
    x = torch.randn(17, 3, 2, 2)
    extra = torch.arange(17.0)
    ran_after_push = []
    for lo, hi in ((0, 3), (3, 8), (8, 10), (10, 17)):
        stream.push(x[lo:hi], extra[lo:hi])
        ran_after_push.append(len(fn.sizes))
    assert ran_after_push == [0, 2, 2, 4]  # a batch runs on the push that fills it, not later
    got = stream.finish()
    assert fn.sizes == [4, 4, 4, 4, 1]
    np.testing.assert_array_equal(got, (x.sum(dim=(1, 2, 3)) + extra).numpy())
    assert forward.stream(fn).finish().shape == (0,)  # nothing pushed


def test_one_large_push_runs_its_batches_on_views_without_copies(tmp_path):
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    forward = BlockForward(bb, config(tmp_path, tmp_path / "x.zarr"), torch.device("cpu"))
    x = torch.randn(10, 3, 2, 2)
    starts = []
    stream = forward.stream(lambda batch, _: starts.append(batch.data_ptr()) or batch.sum(dim=(1, 2, 3)))
    stream.push(x)
    stream.finish()
    row = x[1].numel() * x.element_size()
    assert starts == [x.data_ptr() + i * row for i in (0, 4, 8)]  # batches of 4, 4, 2 inside x itself


def test_first_batch_runs_before_the_last_video_is_decoded(videos, tmp_path, monkeypatch):
    events = []
    decode, patch_features = VideoViews.__getitem__, Backbone.patch_features
    monkeypatch.setattr(VideoViews, "__getitem__", lambda self, i: events.append("decode") or decode(self, i))
    monkeypatch.setattr(Backbone, "patch_features",
                        lambda self, *a, **k: events.append("forward") or patch_features(self, *a, **k))
    extract(config(videos, tmp_path / "s.zarr"))
    # 6 A/B images per video, batches of 4: the first runs once the first video is decoded.
    assert events[:3] == ["decode", "forward", "decode"]
    assert events.count("decode") == 5 and events.index("forward") < len(events) - 1 - events[::-1].index("decode")


def test_tokens_equal_one_forward_over_the_whole_block_in_float32(videos, tmp_path):
    """Bit-identical to the batches of a block-at-once forward: batch i holds images 4i..4i+3 of the
    block's A/B images (video-major), and of its A_asy images."""
    cfg = config(videos, tmp_path / "s.zarr")
    store = open_store(extract(cfg).path)
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    root, rel = discover_videos(videos)
    items = list(VideoViews(root, list(enumerate(rel)), cfg, bb.image_size, bb.grid))
    images = torch.cat([it["images"] for it in items])  # [5*3, 2, 3, S, S]
    offsets = torch.tensor([[v.asy_oy, v.asy_ox] for it in items for v in it["views"]])
    ab_images, asy_images = images.flatten(0, 1), images[:, 0]
    with torch.no_grad():
        ab = torch.cat([bb.patch_features(ab_images[s : s + 4]) for s in range(0, len(ab_images), 4)])
        asy = torch.cat([bb.patch_features(asy_images[s : s + 4], asy_offset=offsets[s : s + 4])
                         for s in range(0, len(asy_images), 4)])
    ab = ab.reshape(5, 3, 2, *ab.shape[1:])
    expected = {"a": ab[:, :, 0], "b": ab[:, :, 1], "a_asy": asy.reshape(5, 3, *asy.shape[1:])}
    for name, want in expected.items():
        np.testing.assert_array_equal(store.array(name)[:], want.swapaxes(0, 1).numpy(), err_msg=name)


def test_decoding_workers_follow_the_device(videos, tmp_path):
    cfg = config(videos, tmp_path / "x.zarr")
    auto = replace(cfg, workers=None)
    assert decode_workers(auto, "cpu") == 0  # the forward's threads use every core: decode in turn
    assert decode_workers(auto, "cuda") == CUDA_WORKERS == 2
    assert decode_workers(replace(cfg, workers=3), "cpu") == decode_workers(replace(cfg, workers=3), "cuda") == 3


def test_decoding_in_workers_or_in_turn_writes_the_same_store(videos, tmp_path, monkeypatch):
    """By default on the CPU the DataLoader has no workers; with --workers it has them, and the
    decoded pixels, hence the float32 tokens and the manifests, are the same either way."""
    asked = []

    class Spy(extract_module.DataLoader):
        def __init__(self, *args, num_workers: int = 0, **kw):
            asked.append(num_workers)
            super().__init__(*args, num_workers=num_workers, **kw)

    monkeypatch.setattr(extract_module, "DataLoader", Spy)
    in_turn = open_store(extract(replace(config(videos, tmp_path / "turn.zarr"), workers=None)).path)
    in_workers = open_store(extract(replace(config(videos, tmp_path / "workers.zarr"), workers=2)).path)
    assert asked == [0, 2]
    for name in ("a", "b", "a_asy", "valid"):
        np.testing.assert_array_equal(in_turn.array(name)[:], in_workers.array(name)[:], err_msg=name)
    assert in_turn.manifest().equals(in_workers.manifest())


def test_cli_leaves_the_workers_to_the_device(videos, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "extract", seen.append)
    base = ["--backbone", "dino_vitb", "--weights", "random", "--videos", str(videos), "--out", str(tmp_path / "c.zarr")]
    for extra, workers in (([], None), (["--workers", "3"], 3)):
        res = CliRunner().invoke(cli.main, base + extra)
        assert res.exit_code == 0, res.output
        assert seen.pop().workers == workers
