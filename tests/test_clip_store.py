"""Clip stores (stage one of VTHCL and CSTP): sampling rules, labels, level vectors, the store end to end."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from cosettle.pipeline import cli
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.clips import (
    PACES,
    ROTATIONS,
    ClipPair,
    cstp_frames,
    sample_cstp,
    sample_pairs,
    sample_vthcl,
    spatial_boxes,
    spatial_overlap_class,
    temporal_offset,
    temporal_overlap_class,
    vthcl_strides,
)
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.store import FeatureStore, StoreError, open_store
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder, write_video_file
from cosettle.pipeline.views import video_rng
from cosettle.trainer.data import ChunkReader, chunk_table, epoch_plan
from cosettle.trainer.synthetic import write_synthetic_clip_store

TINY = dict(embed_dim=32, depth=3, num_heads=2)
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ---------------------------------------------------------------- labels and sampling rules


def test_temporal_overlap_class_on_hand_made_ranges():
    base = (10, 20)  # ties (0.9, 0.7, 0.5, 0.3) go to the larger overlap
    for other, want in [((10, 20), 0), ((11, 21), 0), ((12, 22), 1), ((8, 18), 1), ((13, 23), 1), ((14, 24), 2),
                        ((15, 25), 2), ((16, 26), 3), ((17, 27), 3), ((18, 28), 4), ((20, 30), 4), ((40, 50), 4)]:
        assert temporal_overlap_class(base, other) == want, other
    assert temporal_overlap_class((0, 8), (2, 10)) == 1  # 0.75: nearer 0.8 than 0.6
    with pytest.raises(ValueError, match="same positive length"):
        temporal_overlap_class((0, 8), (0, 9))


def test_spatial_overlap_class_on_hand_made_boxes():
    b = (0, 0, 10, 10)  # top, left, h, w
    for other, want in [((0, 0, 10, 10), 0), ((0, 1, 10, 10), 0), ((0, 2, 10, 10), 1), ((2, 2, 10, 10), 2),
                        ((0, 5, 10, 10), 2), ((4, 4, 10, 10), 3), ((5, 5, 10, 10), 4), ((10, 0, 10, 10), 4),
                        ((20, 20, 10, 10), 4), ((-4, 0, 10, 10), 2), ((-3, 0, 10, 10), 1)]:
        assert spatial_overlap_class(b, other) == want, other
    # relative to the FIRST box's area: a small box inside a big one overlaps fully, not the reverse
    assert spatial_overlap_class((2, 2, 4, 4), b) == 0 and spatial_overlap_class(b, (2, 2, 4, 4)) == 4


def test_vthcl_strides_and_pairs():
    assert vthcl_strides(100, 8, 8, 2) == (8, 2)
    assert vthcl_strides(57, 8, 8, 2) == (8, 2)  # (8 - 1) * 8 + 1 = 57 fits exactly
    assert vthcl_strides(56, 8, 8, 2) == (7, 1)
    assert vthcl_strides(30, 8, 8, 2) == (4, 1)
    assert vthcl_strides(5, 8, 8, 2) == (1, 1)
    pairs = sample_vthcl(100, 3, np.random.default_rng(0), frames=8, image_size=224, slow_stride=8, fast_stride=2,
                         crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3))
    for p in pairs:
        s = p.frames_1[0]
        assert p.frames_1 == tuple(s + 8 * t for t in range(8)) and p.frames_2 == tuple(s + 2 * t for t in range(8))
        assert p.frames_1[-1] < 100 and p.box_1 == p.box_2 and (p.rotation_deg_1, p.rotation_deg_2) == (0, 0)
        assert p.labels == (-1, -1, 8, 2, -1, -1) and (p.rate_1, p.rate_2) == (8, 2)
    short = sample_vthcl(5, 1, np.random.default_rng(0), frames=8, image_size=224, slow_stride=8, fast_stride=2,
                         crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3))[0]
    assert short.frames_1 == (0, 1, 2, 3, 4, 4, 4, 4) and short.labels[2:4] == (1, 1)  # clamped, scaled, recorded


def test_cstp_temporal_offsets_and_frames():
    assert [temporal_offset(8, c) for c in range(5)] == [0, 2, 3, 5, 6]
    assert [temporal_offset(10, c) for c in range(5)] == [0, 2, 4, 6, 8]
    for length in (5, 8, 16, 32, 64):
        assert [temporal_overlap_class((0, length), (d, d + length))
                for d in (temporal_offset(length, c) for c in range(5))] == [0, 1, 2, 3, 4]
    assert cstp_frames((3, 35), 8, 4, 100) == (3, 11, 19, 27)  # the max-pace clip fills its range
    assert cstp_frames((3, 35), 2, 4, 100) == (15, 17, 19, 21)  # a slower clip is centred in it
    assert cstp_frames((3, 35), 8, 4, 20) == (3, 11, 19, 7)  # a short video is looped


def test_cstp_spatial_boxes_realise_every_class():
    rng = np.random.default_rng(1)
    for cls in range(5):
        for _ in range(20):
            b1, b2 = spatial_boxes(224, cls, rng, (0.5, 1.0), (0.75, 4 / 3))
            assert b1[2:] == b2[2:] and spatial_overlap_class(b1, b2) == cls
            for top, left, h, w in (b1, b2):
                assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224


@pytest.mark.parametrize("n", [12, 60, 400])
def test_cstp_pairs_follow_their_rules(n):
    pairs = [p for seed in range(40) for p in sample_cstp(n, 3, np.random.default_rng(seed), frames=8,
                                                          image_size=224, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3))]
    for p in pairs:
        t_cls, s_cls, p1, p2, r1, r2 = p.labels
        assert (p.rate_1, p.rate_2) == (PACES[p1], PACES[p2])
        assert (p.rotation_deg_1, p.rotation_deg_2) == (ROTATIONS[r1], ROTATIONS[r2])
        length = 8 * max(p.rate_1, p.rate_2)
        assert p.range_1[1] - p.range_1[0] == length == p.range_2[1] - p.range_2[0]
        assert t_cls == temporal_overlap_class(p.range_1, p.range_2) and s_cls == spatial_overlap_class(p.box_1, p.box_2)
        assert p.frames_1 == cstp_frames(p.range_1, p.rate_1, 8, n) and p.frames_2 == cstp_frames(p.range_2, p.rate_2, 8, n)
        if n == 400:  # long enough: no looping, both ranges inside the video
            assert 0 <= min(p.range_1[0], p.range_2[0]) and max(p.range_1[1], p.range_2[1]) <= n
        assert ClipPair.from_row(p.as_row()) == p
    labels = np.array([p.labels for p in pairs])
    for col, classes in enumerate((5, 5, 4, 4, 4, 4)):
        assert sorted(set(labels[:, col].tolist())) == list(range(classes))  # every class drawn
    # pairs are a function of (seed, video path) only
    kw = dict(frames=8, image_size=224, params={}, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3))
    assert sample_pairs("cstp", n, 2, video_rng(0, "a/b.mp4"), **kw) == sample_pairs("cstp", n, 2, video_rng(0, "a/b.mp4"), **kw)


def test_level_vectors_equal_timm_intermediates():
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    x = torch.randn(3, 3, 224, 224)
    ref = bb.model.forward_intermediates(x, indices=[0, 2], norm=True, output_fmt="NLC", intermediates_only=True,
                                         return_prefix_tokens=True)
    for pooling in ("cls", "mean", "cls+mean"):
        got = bb.level_vectors(x, (1, 3), pooling)
        for i, (patches, prefix) in enumerate(ref):
            want = {"cls": prefix[:, 0], "mean": patches.mean(1), "cls+mean": torch.cat([prefix[:, 0], patches.mean(1)], -1)}
            torch.testing.assert_close(got[:, i], want[pooling])
    cls, patches = bb.tokens(x)  # the last level is the pooled tokens()
    torch.testing.assert_close(bb.level_vectors(x, (3,), "cls+mean")[:, 0], torch.cat([cls, patches.mean(1)], -1))
    with pytest.raises(ValueError, match=r"levels \[2, 1\]"):
        bb.level_vectors(x, (2, 1), "mean")
    with pytest.raises(ValueError, match="within 1..3"):
        bb.level_vectors(x, (4,), "mean")
    ijepa = load_backbone("ijepa_vitb", "random", arch=TINY)
    with pytest.raises(ValueError, match="ijepa_vitb has no class token"):
        ijepa.level_vectors(x, (1,), "cls")
    assert ijepa.level_vectors(x, (1, 3), "mean").shape == (3, 2, 32)


# ---------------------------------------------------------------- the store end to end


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Four good videos (three frame folders, one mp4; 12 to 120 frames) and one corrupt mp4."""
    root = tmp_path_factory.mktemp("clipvideos")
    for i, n in enumerate((12, 40, 120, 30)):
        frames, _ = moving_scene(n, 48, 64, 2, seed=i)
        if i == 1:
            write_video_file(root / "mp4" / f"clip{i}.mp4", frames)
        else:
            write_frame_folder(root / "frames" / f"clip{i}", frames)
    (root / "mp4" / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    return root


def config(videos: Path, out: Path, **kw) -> ExtractConfig:
    base = ExtractConfig(videos=videos, out=out, backbone="dino_vitb", weights="random", views=2, chunk_videos=2,
                         workers=0, batch_size=16, arch=TINY, layout="clips", plan="cstp", clip_frames=4, levels=(1, 3))
    return replace(base, **kw)


def read_all(store: FeatureStore) -> dict:
    return {name: store.array(name)[:] for name in ("tokens", "labels", "valid")}


@pytest.fixture(scope="module")
def cstp_run(videos, tmp_path_factory):
    return extract(config(videos, tmp_path_factory.mktemp("cstp") / "c.zarr"))


def test_clip_store_layout_settings_and_manifest(cstp_run):
    store = open_store(cstp_run.path)
    assert store.layout == "clips" and store.batch_arrays == ("tokens", "labels")
    tokens, labels = store.array("tokens"), store.array("labels")
    assert tokens.shape == (2, 5, 2, 4, 2, 64) and tokens.chunks == (1, 2, 2, 4, 2, 64) and tokens.dtype == np.float16
    assert labels.shape == (2, 5, 6) and labels.chunks == (1, 2, 6) and labels.dtype == np.int16
    s = store.settings
    assert (s["layout"], s["plan"], s["frames"], s["levels"], s["pooling"], s["dim"], s["views"]) == \
        ("clips", "cstp", 4, [1, 3], "cls+mean", 64, 2)
    assert s["paces"] == [1, 2, 4, 8] and s["temporal_overlaps"] == [1.0, 0.8, 0.6, 0.4, 0.2]
    m = store.manifest().to_pylist()
    assert len(m) == 10 and [r["status"] == "ok" for r in m].count(False) == 2
    valid = store.valid()
    assert store.videos()[int(np.flatnonzero(~valid)[0])] == "mp4/broken.mp4"
    assert not tokens[:, ~valid].any() and (labels[:, ~valid] == -1).all()
    for r in m:
        if r["status"] == "ok":
            assert labels[r["view"], r["video_index"]].tolist() == list(ClipPair.from_row(r).labels)


def hand_made_clip(folder: Path, frames, box, rotation: int) -> torch.Tensor:
    """Decode, squash, crop, resize, rotate and normalise one clip, independently of the pipeline."""
    files = sorted(folder.iterdir())
    x = torch.from_numpy(np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in frames]))
    x = x.permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    top, left, h, w = box
    x = F.interpolate(x[:, :, top : top + h, left : left + w], size=(224, 224), mode="bicubic", align_corners=False,
                      antialias=True)
    return (torch.rot90(x, rotation // 90, dims=(2, 3)) - MEAN) / STD


@pytest.mark.parametrize("plan", ["cstp", "vthcl"])
def test_stored_vectors_equal_an_independent_computation(plan, cstp_run, videos, tmp_path):
    store = open_store(cstp_run.path) if plan == "cstp" else extract(config(videos, tmp_path / "v.zarr", plan=plan))
    model = load_backbone("dino_vitb", "random", arch=TINY).model
    rows = [r for r in store.manifest().to_pylist() if r["video"] in ("frames/clip0", "frames/clip2")]
    assert rows and (plan == "vthcl" or any(r["rotation_deg_1"] for r in rows))
    for r in rows:
        for c in (1, 2):
            x = hand_made_clip(videos / r["video"], r[f"frames_{c}"], [r[f"box_{c}_{k}"] for k in ("top", "left", "h", "w")],
                               r[f"rotation_deg_{c}"])
            levels = model.forward_intermediates(x, indices=[0, 2], norm=True, output_fmt="NLC",
                                                 intermediates_only=True, return_prefix_tokens=True)
            want = torch.stack([torch.cat([pre[:, 0], p.mean(1)], -1) for p, pre in levels], dim=1)  # [T, L, D']
            got = torch.from_numpy(store.array("tokens")[r["view"], r["video_index"], c - 1].astype(np.float32))
            torch.testing.assert_close(got, want, atol=3e-3, rtol=3e-3)


def test_two_shards_equal_a_single_run(cstp_run, videos, tmp_path):
    out = tmp_path / "sharded.zarr"
    assert extract(config(videos, out, shard=(1, 2))).done().tolist() == [False, True, False]
    extract(config(videos, out, shard=(0, 2)))
    want, sharded = read_all(cstp_run), open_store(out)
    for name, got in read_all(sharded).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    assert sharded.manifest().equals(cstp_run.manifest())


KILLER = """
import os, signal, sys
from pathlib import Path
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.store import FeatureStore

real = FeatureStore.write_block
def write_block(self, block, tokens, valid, manifest):
    if block == 1:  # half a block lands, then the process dies without a chance to clean up
        self.group["tokens"][:, 2:3] = 1.0
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, block, tokens, valid, manifest)
FeatureStore.write_block = write_block
extract(ExtractConfig(videos=Path(sys.argv[1]), out=Path(sys.argv[2]), backbone="dino_vitb", weights="random",
                      views=2, chunk_videos=2, workers=0, batch_size=16, arch=dict(embed_dim=32, depth=3, num_heads=2),
                      layout="clips", plan="cstp", clip_frames=4, levels=(1, 3)))
"""


def test_sigkill_then_resume_equals_a_single_run(cstp_run, videos, tmp_path):
    out = tmp_path / "killed.zarr"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(videos), str(out)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    done = FeatureStore(out).done().tolist()
    assert done[:2] == [True, False]
    with pytest.raises(StoreError, match="--resume"):
        extract(config(videos, out))
    extract(config(videos, out, resume=True))
    want = read_all(cstp_run)
    for name, got in read_all(open_store(out)).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    assert open_store(out).manifest().equals(cstp_run.manifest())


def test_other_settings_are_refused(cstp_run, videos, tmp_path):
    path = cstp_run.path
    for change, key in [(dict(levels=(3,)), "levels"), (dict(pooling="mean"), "pooling"), (dict(plan="vthcl"), "plan"),
                        (dict(clip_frames=8), "frames"), (dict(views=3), "views"), (dict(seed=1), "seed")]:
        with pytest.raises(StoreError, match=f"{key}: expected"):
            extract(config(videos, path, resume=True, **change))
    with pytest.raises(StoreError, match="a clips store, this run writes a views store"):
        extract(config(videos, path, resume=True, layout="views", plan=None))
    views = extract(config(videos, tmp_path / "views.zarr", layout="views", plan=None, views=1)).path
    with pytest.raises(StoreError, match="a views store, this run writes a clips store"):
        extract(config(videos, views, resume=True))
    assert open_store(views).batch_arrays == ("a", "b", "a_asy") and "layout" not in open_store(views).settings


def test_cli_clip_options(videos, tmp_path):
    run = CliRunner().invoke
    listing = tmp_path / "one.txt"
    listing.write_text("clip2\n")
    base = ["--weights", "random", "--videos", str(listing), "--root", str(videos / "frames"), "--workers", "0",
            "--views", "1"]
    res = run(cli.main, ["--backbone", "ijepa_vitb", *base, "--out", str(tmp_path / "i.zarr"), "--layout", "clips",
                         "--plan", "vthcl"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "Error: ijepa_vitb has no class token; pooling 'cls+mean' needs one (use 'mean')"]
    res = run(cli.main, ["--backbone", "mae_vitb", *base, "--out", str(tmp_path / "x.zarr"), "--plan", "cstp"])
    assert res.exit_code == 2 and "--plan: not an option of --layout views" in res.output
    res = run(cli.main, ["--backbone", "mae_vitb", *base, "--out", str(tmp_path / "x.zarr"), "--layout", "clips"])
    assert res.exit_code == 2 and "--layout clips needs --plan vthcl|cstp" in res.output
    out = tmp_path / "mae.zarr"
    res = run(cli.main, ["--backbone", "mae_vitb", *base, "--out", str(out), "--layout", "clips", "--plan", "vthcl",
                         "--clip-frames", "2", "--levels", "4,8,12", "--pooling", "cls"])
    assert res.exit_code == 0, res.output
    store = open_store(out)
    assert store.array("tokens").shape == (1, 1, 2, 2, 3, 768) and store.settings["levels"] == [4, 8, 12]
    assert (store.settings["slow_stride"], store.settings["fast_stride"]) == (8, 2)


# ---------------------------------------------------------------- synthetic clip stores


def test_synthetic_clip_store_reads_through_the_chunk_reader(tmp_path):
    write_synthetic_clip_store(tmp_path / "s.zarr", num_videos=20, views=3, invalid=(4,), seed=1)
    store = open_store(tmp_path / "s.zarr")
    chunks = chunk_table([store])
    plan = epoch_plan(chunks, 0, 0, 0, 1, 5, shuffle_chunks=2)
    batches = list(ChunkReader([store], chunks, window=1).batches(plan, 2))
    assert len(batches) == 3
    rows = [chunks[c].block * 8 + r for c, r in plan[0].tolist()]
    b = batches[0]
    assert set(b) == {"tokens", "labels"} and b["tokens"].shape == (5, 2, 4, 2, 16) and b["labels"].dtype == torch.int16
    assert np.array_equal(b["labels"].numpy(), store.array("labels")[2][rows])
    assert torch.isfinite(b["tokens"]).all() and (b["labels"] >= 0).all()


@pytest.mark.parametrize("plan", ["cstp", "vthcl"])
def test_synthetic_labels_are_readable_from_the_tokens(plan, tmp_path):
    """Each label has a fixed read-out from the tokens (see synthetic_clip_tokens), so heads can learn it."""
    store = write_synthetic_clip_store(tmp_path / "s.zarr", num_videos=64, views=2, frames=4, plan=plan)
    x = store.array("tokens")[:].astype(np.float32)[..., -1, :]  # the deepest level: [K, V, 2, T, D]
    labels = store.array("labels")[:]
    z = x[..., 0] + 1j * x[..., 1]
    step = np.abs(np.angle((z[..., 1:] * np.conj(z[..., :-1])).mean(-1)))  # phase advance per frame
    rates = np.array(PACES if plan == "cstp" else (2, 8))
    rate = rates[np.abs(step[..., None] - np.pi * rates / 8).argmin(-1)]  # [K, V, 2]
    want = np.array(PACES)[labels[..., 2:4]] if plan == "cstp" else labels[..., 2:4]
    assert (rate == want).mean() > 0.95
    if plan == "vthcl":
        return
    turn = np.rint(np.degrees(np.arctan2(x[..., 3].mean(-1), x[..., 2].mean(-1))) / 90) % 4
    assert (turn == labels[..., 4:6]).mean() > 0.99
    for g, col in ((0, 0), (1, 1)):
        c = x[..., 4 + 6 * g : 10 + 6 * g]
        shared = (np.abs(c[:, :, 0] - c[:, :, 1]).max(axis=-2) < 0.5).sum(-1)  # channels clip 2 copies of clip 1
        assert (shared == np.array([6, 5, 4, 2, 1])[labels[..., col]]).mean() > 0.95
