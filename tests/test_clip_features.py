"""Clip features of whole videos: sampling, pooling against an independent forward, projection,
the cache (reuse, keys, fingerprints) and refusals. Tiny random backbones on 64 px synthetic videos."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cosettle.eval.frame.analysis_report import clip_input
from cosettle.eval.video.clip_features import (
    ClipFeatureSource,
    ClipProtocol,
    UnreadableVideoWarning,
    clip_indices,
)
from cosettle.eval.video.datasets import ActionVideo, load_split
from cosettle.eval.video.synthetic import write_action_world
from cosettle.eval.zarr_cache import CacheError
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.text_tower import ClipText
from cosettle.pipeline.videos import open_video

ARCH = dict(embed_dim=32, depth=1, num_heads=2, img_size=64)
FRAMES = 20
# 20-frame videos, 2 clips of 3 frames 2 apart: span 5, starts linspace(0, 15, 2) = [0, 15].
PROTOCOL = dict(clips=2, frames=3, stride=2, resize=64)
HAND_INDICES = [[0, 2, 4], [15, 17, 19]]
HAND_FRAMES = [i for clip in HAND_INDICES for i in clip]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("dino_vitb", "random", arch=ARCH)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[ActionVideo]:
    """Four videos, mp4 files and frame folders alternating."""
    info = write_action_world(tmp_path_factory.mktemp("world"), classes=2, train_per_class=2, test_per_class=0,
                              frames=FRAMES)
    found, _ = load_split(info["dataset"], info["videos"], 1, "train", lists=info["lists"])
    assert {v.path.suffix for v in found} == {".mp4", ""}
    return found


def source(backbone, tmp_path: Path, pooling: str = "cls", **kwargs) -> ClipFeatureSource:
    kwargs.setdefault("cache", tmp_path / "clips.zarr")
    return ClipFeatureSource(backbone, ClipProtocol(pooling=pooling, **PROTOCOL), batch_size=4, **kwargs)


def hand_tokens(backbone, video: ActionVideo) -> tuple[torch.Tensor, torch.Tensor]:
    """(class token, patch tokens) [clips, frames, ...] of the hand-sampled frames, by timm's own forward."""
    frames = open_video(video.path).get(HAND_FRAMES)
    with torch.no_grad():
        tokens = backbone.model.forward_features(clip_input(frames, 64, resize=64))  # final norm, CLS first
    tokens = tokens.reshape(2, 3, *tokens.shape[1:])
    return tokens[:, :, 0], tokens[:, :, 1:]


def hand_pool(cls: torch.Tensor, patches: torch.Tensor, pooling: str) -> np.ndarray:
    """Per-clip vectors: the frame vector by hand, averaged over the clip's frames."""
    frame = {"cls": cls, "mean": patches.mean(dim=2), "cls+mean": torch.cat([cls, patches.mean(dim=2)], dim=-1)}
    return frame[pooling].mean(dim=1).numpy()


# ---------------------------------------------------------------- sampling


def test_clip_indices_long_video():
    # span 7, starts linspace(0, 93, 3) = [0, 46.5, 93], rounded half up
    got = clip_indices(100, ClipProtocol(clips=3, frames=4, stride=2))
    assert got.tolist() == [[0, 2, 4, 6], [47, 49, 51, 53], [93, 95, 97, 99]]
    assert clip_indices(FRAMES, ClipProtocol(**PROTOCOL)).tolist() == HAND_INDICES


def test_clip_indices_exact_fit_and_one_clip():
    assert clip_indices(7, ClipProtocol(clips=3, frames=4, stride=2)).tolist() == [[0, 2, 4, 6]] * 3
    assert clip_indices(50, ClipProtocol(clips=1, frames=2, stride=10)).tolist() == [[0, 10]]


def test_clip_indices_short_video_clamps_to_the_last_frame():
    assert clip_indices(5, ClipProtocol(clips=2, frames=4, stride=2)).tolist() == [[0, 2, 4, 4]] * 2
    assert clip_indices(1, ClipProtocol(clips=1, frames=3, stride=1)).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("n", [1, 2, 9, 30, 31, 300])
def test_clip_indices_stay_inside_the_video(n):
    got = clip_indices(n, ClipProtocol())
    assert got.shape == (10, 8) and got.min() == 0 and got.max() == n - 1
    assert (np.diff(got, axis=1) >= 0).all() and (np.diff(got[:, 0]) >= 0).all()


@pytest.mark.parametrize("bad", [dict(clips=0), dict(frames=-1), dict(stride=True), dict(resize=2.5),
                                 dict(pooling="max")])
def test_protocol_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ClipProtocol(**bad)
    with pytest.raises(ValueError):
        clip_indices(0, ClipProtocol())


# ---------------------------------------------------------------- vectors against an independent forward


def test_backbone_tokens_are_one_forward(backbone):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cls, patches = backbone.tokens(x)
    with torch.no_grad():
        want = backbone.model.forward_features(x)
    torch.testing.assert_close(cls, want[:, 0], **TOL)
    torch.testing.assert_close(patches, want[:, 1:], **TOL)
    assert torch.equal(patches, backbone.patch_features(x))


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls+mean"])
def test_stored_clip_vectors_match_a_hand_computation(backbone, videos, tmp_path, pooling):
    src = source(backbone, tmp_path, pooling)
    for video in videos[:2]:  # one mp4, one frame folder
        want = hand_pool(*hand_tokens(backbone, video), pooling)
        got = src.clip_vectors("ucf101", video)
        assert got.shape == (2, 64 if pooling == "cls+mean" else 32)
        np.testing.assert_allclose(got, want, **TOL)
        entry = src.cache.get(f"frozen/ucf101/{video.name}")
        np.testing.assert_array_equal(entry[...], got)
        assert entry.attrs["frame_indices"] == HAND_INDICES
    vectors, unreadable = src.video_vectors("ucf101", videos[:2])
    assert unreadable == [] and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[1], hand_pool(*hand_tokens(backbone, videos[1]), pooling).mean(0), **TOL)


def test_projection_is_applied_to_every_token_before_pooling(backbone, videos, tmp_path):
    proj = nn.Sequential(nn.Linear(32, 32), nn.GELU())
    torch.manual_seed(0)
    for p in proj.parameters():
        nn.init.normal_(p)
    src = source(backbone, tmp_path, "cls+mean", projection=proj, projection_info={"run": "test"})
    cls, patches = hand_tokens(backbone, videos[0])
    with torch.no_grad():
        want = hand_pool(proj(cls), proj(patches), "cls+mean")
    np.testing.assert_allclose(src.clip_vectors("ucf101", videos[0]), want, atol=1e-4, rtol=1e-5)
    assert not np.allclose(want, hand_pool(cls, patches, "cls+mean"), atol=1e-2)
    assert src.record()["projection"] == {"run": "test"}
    with pytest.raises(ValueError, match="together"):
        source(backbone, tmp_path, projection=proj)


def test_clip_pooling_embeds_each_frame_in_the_joint_space(backbone, videos, tmp_path):
    """A stand-in text tower: only the image projection is used by the pooling."""
    model = nn.Module()
    model.visual = nn.Module()
    model.visual.ln_post = nn.LayerNorm(32)
    model.visual.proj = nn.Parameter(torch.randn(32, 16, generator=torch.Generator().manual_seed(2)))
    model.text_projection = nn.Parameter(torch.zeros(8, 16))
    clip_text = ClipText(model, Path("fake.pt"), backbone.weights_sha256)  # "random", as the backbone
    src = source(backbone, tmp_path, "clip", clip_text=clip_text)
    cls, _ = hand_tokens(backbone, videos[0])
    want = F.normalize(cls @ model.visual.proj.detach(), dim=-1).mean(dim=1).numpy()
    np.testing.assert_allclose(src.clip_vectors("ucf101", videos[0]), want, **TOL)
    assert src.key["text_weights_sha256"] == "random"
    with pytest.raises(ValueError, match="clip_text"):
        source(backbone, tmp_path / "other", "clip")


# ---------------------------------------------------------------- the cache


def test_second_call_reads_the_cache(backbone, videos, tmp_path, monkeypatch):
    first, _ = source(backbone, tmp_path, "cls+mean").video_vectors("ucf101", videos)

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached video")

    monkeypatch.setattr(backbone, "tokens", boom)
    monkeypatch.setattr(backbone.model, "forward_features", boom)
    again, unreadable = source(backbone, tmp_path, "cls+mean").video_vectors("ucf101", videos)
    assert unreadable == []
    np.testing.assert_array_equal(again, first)


def test_other_settings_get_another_default_cache_path(backbone, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [
        source(backbone, tmp_path, cache=None).cache_path,
        source(backbone, tmp_path, cache=None).cache_path,
        source(backbone, tmp_path, "mean", cache=None).cache_path,
        ClipFeatureSource(backbone, ClipProtocol(**dict(PROTOCOL, clips=3)), None).cache_path,
    ]
    assert paths[0] == paths[1]
    assert len(set(paths)) == 3
    assert all(p.parent == Path("eval_cache") and p.name.startswith("dino_vitb_random_clips_") for p in paths)
    assert (tmp_path / paths[0]).is_dir()


def test_a_changed_source_file_is_a_cache_error(backbone, videos, tmp_path):
    mp4 = next(v for v in videos if v.path.suffix == ".mp4")
    copy = ActionVideo(mp4.name, tmp_path / mp4.path.name, mp4.label, mp4.class_name)
    shutil.copy(mp4.path, copy.path)
    src = source(backbone, tmp_path)
    src.clip_vectors("ucf101", copy)
    with copy.path.open("ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(CacheError, match=mp4.name.split("/")[-1]) as err:
        src.clip_vectors("ucf101", copy)
    assert "\n" not in str(err.value)


def test_unreadable_videos_are_reported_not_dropped_silently(backbone, videos, tmp_path):
    broken = tmp_path / "Broken" / "v_broken.mp4"
    broken.parent.mkdir()
    broken.write_bytes(b"not a video")
    bad = [ActionVideo("Broken/v_broken", broken, 0, "Broken"),
           ActionVideo("Broken/v_gone", tmp_path / "v_gone.avi", 0, "Broken")]
    src = source(backbone, tmp_path)
    with pytest.warns(UnreadableVideoWarning) as caught:
        vectors, unreadable = src.video_vectors("ucf101", [videos[0], bad[0], videos[1], bad[1]])
    assert vectors.shape == (2, 32)
    assert unreadable == ["Broken/v_broken", "Broken/v_gone"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "v_broken.mp4" in messages[0] and "v_gone.avi" in messages[1]
    assert all("\n" not in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        assert src.video_vectors("ucf101", bad)[0].shape == (0, 32)


# ---------------------------------------------------------------- backbones without a class token


def test_no_class_token_backbone(videos, tmp_path):
    ijepa = load_backbone("ijepa_vitb", "random", arch=ARCH)
    for pooling in ("cls", "cls+mean"):
        with pytest.raises(ValueError, match="ijepa_vitb has no class token") as err:
            source(ijepa, tmp_path, pooling)
        assert "\n" not in str(err.value)
    assert ijepa.tokens(torch.zeros(1, 3, 64, 64))[0] is None
    frames = open_video(videos[0].path).get(HAND_FRAMES)
    with torch.no_grad():
        m, x = ijepa.model, clip_input(frames, 64, resize=64)
        patches = m.blocks(m.norm_pre(m._pos_embed(m.patch_embed(x))))  # no prefix tokens; no final norm (ijepa_vitb's rule)
    want = patches.mean(dim=1).reshape(2, 3, -1).mean(dim=1).numpy()
    np.testing.assert_allclose(source(ijepa, tmp_path / "ijepa", "mean").clip_vectors("ucf101", videos[0]), want,
                               **TOL)


def test_trained_runs_share_the_frozen_backbones_cache_in_their_own_entries(backbone, videos, tmp_path):
    """Like the frame-level cache: one store per backbone and protocol, one entry folder per variant."""
    proj = nn.Linear(32, 32)
    frozen = source(backbone, tmp_path, "mean")
    runs = [source(backbone, tmp_path, "mean", projection=proj, projection_info={"run_weights_sha256": sha})
            for sha in ("a" * 64, "b" * 64)]
    assert {s.cache_path for s in [frozen, *runs]} == {frozen.cache_path}
    assert [s.variant for s in [frozen, *runs]] == ["frozen", "run-" + "a" * 16, "run-" + "b" * 16]
    base, _ = frozen.video_vectors("ucf101", videos[:1])
    projected, _ = runs[0].video_vectors("ucf101", videos[:1])
    again, _ = runs[1].video_vectors("ucf101", videos[:1])
    assert not np.allclose(base, projected)
    np.testing.assert_array_equal(projected, again)  # same module, another variant: computed alike, kept apart
    group = frozen.cache.group
    assert sorted(group.group_keys()) == ["frozen", "run-" + "a" * 16, "run-" + "b" * 16]
