"""Evaluation features: ``--amp`` in the frame and clip caches' keys, and a trained projection applied
once per cached frame, equal to projecting the backbone entry on read."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from action_world import cosettle_eval
from click.testing import CliRunner

from cosettle.core.precision import cpu_bf16_supported
from cosettle.eval import cli
from cosettle.eval.frame.datasets import davis_videos
from cosettle.eval.frame.features import CacheError, FeatureSource
from cosettle.eval.frame.propagation import preset
from cosettle.eval.frame.synthetic import write_davis
from cosettle.eval.video.clip_features import ClipFeatureSource, ClipProtocol
from cosettle.eval.video.datasets import load_split
from cosettle.eval.video.synthetic import write_action_world
from cosettle.pipeline.backbones import load_backbone

TINY = dict(embed_dim=64, depth=2, num_heads=2)
SMALL = preset("dino", short_side=64, multiple=32)  # 64 x 96 frames -> a 4 x 6 grid
needs_bf16 = pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no native bf16")


class CountingProjection(torch.nn.Module):
    """LayerNorm(tanh(W x + b)) (Co-Settle's linear projection), counting the frames [B, h, w, D] it maps."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc, self.norm = torch.nn.Linear(dim, dim), torch.nn.LayerNorm(dim)
        self.frames = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            self.frames += x.shape[0]
        return self.norm(torch.tanh(self.fc(x)))


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("DAVIS")
    write_davis(root, ["bear", "car"], frames=5, height=64, width=96, objects=2)
    return root


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("dino_vitb", "random", arch=TINY)


def read(source: FeatureSource, video, num_frames=None) -> torch.Tensor:
    return torch.stack(list(source.features("davis/480p", video, num_frames)))


def test_projection_runs_once_per_frame_and_equals_projecting_on_read(davis_root, backbone, tmp_path):
    cache, videos = tmp_path / "c.zarr", davis_videos(davis_root)
    proj = CountingProjection(64, seed=1)
    for _ in range(2):  # two evaluations of the same run share the cache
        source = FeatureSource(backbone, SMALL, cache, proj, batch_size=2)
        got = {v.name: read(source, v) for v in videos}
        assert torch.equal(read(source, videos[0], num_frames=3), got[videos[0].name][:3])
    assert proj.frames == sum(len(v.frames) for v in videos)  # 10: once per frame, not per read
    frozen = FeatureSource(backbone, SMALL, cache)
    for v in videos:
        raw = torch.from_numpy(frozen.backbone_features("davis/480p", v)[:]).float()
        with torch.no_grad():  # independently: the projection applied frame by frame to the backbone entry
            want = torch.stack([proj(frame[None])[0] for frame in raw])
        assert got[v.name].dtype == torch.float32
        torch.testing.assert_close(got[v.name], want, atol=1e-6, rtol=1e-6)
        assert torch.equal(read(frozen, v), raw)  # the backbone entry is read unprojected

    other = CountingProjection(64, seed=2)  # other weights: an entry of its own, projected anew
    again = read(FeatureSource(backbone, SMALL, cache, other), videos[0])
    assert other.frames == len(videos[0].frames) and not torch.allclose(again, got[videos[0].name])


def test_amp_is_in_the_frame_cache_key(davis_root, backbone, tmp_path):
    fp32 = FeatureSource(backbone, SMALL, tmp_path / "fp32.zarr")
    assert "autocast" not in fp32.cache.key  # float32: the key as before the option existed
    with pytest.raises(ValueError, match="--amp fp16: not available on cpu"):
        FeatureSource(backbone, SMALL, tmp_path / "x.zarr", amp="fp16")
    if not cpu_bf16_supported():
        return
    with pytest.raises(CacheError, match="autocast: expected 'bf16', found None"):
        FeatureSource(backbone, SMALL, tmp_path / "fp32.zarr", amp="bf16")
    bf16 = FeatureSource(backbone, SMALL, tmp_path / "bf16.zarr", amp="bf16")
    assert bf16.cache.key["autocast"] == "bf16"
    video = davis_videos(davis_root)[0]
    want, got = read(fp32, video), read(bf16, video)
    assert (got - want).abs().max() > 0  # the autocast was on
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.999


@needs_bf16
def test_eval_cli_records_the_autocast(davis_root, tmp_path):
    args = ["davis", "--root", davis_root, "--backbone", "dino_vitb", "--weights", "random", "--arch", json.dumps(TINY),
            "--short-side", "64", "--multiple", "32", "--device", "cpu", "--cache", tmp_path / "c.zarr"]
    result = CliRunner().invoke(cli.main, [str(a) for a in args + ["--out", tmp_path / "out", "--amp", "bf16"]])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["autocast"] == "bf16"
    result = CliRunner().invoke(cli.main, [str(a) for a in args + ["--out", tmp_path / "o2", "--amp", "fp16"]])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "not available on cpu" in result.output


@needs_bf16
def test_clip_features_autocast(tmp_path):
    arch = dict(embed_dim=32, depth=1, num_heads=2, img_size=64)
    bb = load_backbone("dino_vitb", "random", arch=arch)
    info = write_action_world(tmp_path / "world", classes=2, train_per_class=1, test_per_class=0, frames=12)
    videos, _ = load_split(info["dataset"], info["videos"], 1, "train", lists=info["lists"])
    protocol = ClipProtocol(clips=2, frames=2, stride=2, resize=64)
    fp32 = ClipFeatureSource(bb, protocol, tmp_path / "a.zarr")  # auto on CPU: float32, the key as before
    bf16 = ClipFeatureSource(bb, protocol, tmp_path / "b.zarr", amp="bf16")
    assert (fp32.key["precision"], bf16.key["precision"]) == ("float32", "bf16-autocast")
    assert bf16.record()["precision"] == "bf16-autocast"
    with pytest.raises(CacheError, match="precision"):
        ClipFeatureSource(bb, protocol, tmp_path / "a.zarr", amp="bf16")
    want, got = fp32.clip_vectors("ucf", videos[0]), bf16.clip_vectors("ucf", videos[0])
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_action_cli_passes_the_autocast(world, tmp_path):
    """--amp reaches the clip features (only they refuse fp16 on a CPU); the record is the key's precision,
    checked in test_clip_features_autocast."""
    result = cosettle_eval(world, tmp_path / "out", tmp_path / "c.zarr", "--amp", "fp16")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "--amp fp16: not available on cpu" in result.output
