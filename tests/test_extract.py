"""Stage one end to end on synthetic videos in the real formats, with a tiny ViT."""
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cosettle.pipeline import cli
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.store import FeatureStore, StoreError, manifest_dir, open_store
from cosettle.pipeline.store_settings import TOKEN_ARRAYS
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder, write_video_file
from cosettle.pipeline.transforms import apply_view
from cosettle.pipeline.views import View

TINY = dict(embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Seven good videos (frame folders and mp4), one corrupt mp4, one single-frame folder."""
    root = tmp_path_factory.mktemp("videos")
    for i in range(7):
        frames, _ = moving_scene(8 + 3 * i, 48, 64, 2, seed=i)
        if i % 2:
            write_video_file(root / "mp4" / f"clip{i}.mp4", frames)
        else:
            write_frame_folder(root / "frames" / f"clip{i}", frames)
    (root / "mp4" / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    write_frame_folder(root / "frames" / "single", moving_scene(1, 48, 64, 1, seed=9)[0])
    return root


def config(videos: Path, out: Path, **kw) -> ExtractConfig:
    base = ExtractConfig(videos=videos, out=out, backbone="dino_vitb", weights="random", views=3,
                         chunk_videos=2, workers=0, batch_size=5, arch=TINY)
    return replace(base, **kw)


def read_all(store: FeatureStore) -> dict:
    return {name: store.array(name)[:] for name in TOKEN_ARRAYS + ("valid",)}


@pytest.fixture(scope="module")
def single_run(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "s.zarr"
    return extract(config(videos, out))


def test_store_layout_and_manifest(single_run):
    store = open_store(single_run.path)
    videos = store.videos()
    assert len(videos) == 9 and videos == sorted(videos)
    assert store.array("a").shape == (3, 9, 196, 32)
    assert store.array("a").chunks == (1, 2, 196, 32)
    m = store.manifest().to_pylist()
    assert len(m) == 9 * 3
    bad = {r["video"]: r["status"] for r in m if r["status"] != "ok"}
    assert set(bad) == {"mp4/broken.mp4", "frames/single"}
    assert "broken.mp4: cannot open video" in bad["mp4/broken.mp4"]
    assert "1 frame(s)" in bad["frames/single"]
    valid = store.valid()
    assert [videos[i] for i in np.flatnonzero(~valid)] == ["frames/single", "mp4/broken.mp4"]
    assert not store.array("a")[:, ~valid].any()  # skipped rows stay zero
    s = store.settings
    assert (s["backbone"], s["weights"], s["weights_sha256"], s["views"], s["seed"]) == ("dino_vitb", "random", "random", 3, 0)
    assert store.meta["complete"] and store.meta["environment"]["cosettle_version"]


def test_tokens_equal_a_direct_forward(single_run, videos):
    """Every stored token is the backbone applied to the frames the manifest says were sampled."""
    store = open_store(single_run.path)
    backbone = load_backbone("dino_vitb", "random", arch=TINY)
    rows = [r for r in store.manifest().to_pylist() if r["video"] == "frames/clip2"]
    folder = videos / "frames" / "clip2"
    files = sorted(folder.iterdir())
    for r in rows:
        view = View(**{k: r[k] for k in View.__dataclass_fields__})
        pair = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in (r["frame_a"], r["frame_b"])])
        x = apply_view(pair, view, 224)
        a, b = backbone.patch_features(x)
        a_asy = backbone.patch_features(x[:1], asy_offset=(view.asy_oy, view.asy_ox))[0]
        for name, want in (("a", a), ("b", b), ("a_asy", a_asy)):
            got = torch.from_numpy(store.array(name)[r["view"], r["video_index"]].astype(np.float32))
            torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_two_shards_equal_a_single_run(single_run, videos, tmp_path):
    out = tmp_path / "sharded.zarr"
    first = extract(config(videos, out, shard=(1, 2)))
    assert not first.complete and first.done().tolist() == [False, True, False, True, False]
    extract(config(videos, out, shard=(0, 2)))
    sharded = open_store(out)
    want = read_all(single_run)
    for name, got in read_all(sharded).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    assert sharded.manifest().equals(single_run.manifest())


def test_crash_then_resume_equals_a_single_run(single_run, videos, tmp_path, monkeypatch):
    out = tmp_path / "crashed.zarr"
    real_write = FeatureStore.write_block

    def crash_on_block_2(self, block, tokens, valid, manifest):
        if block == 2:
            self.group["a"][:, 4:6] = 1.0  # half-written block: tokens land, done flag never does
            raise KeyboardInterrupt
        real_write(self, block, tokens, valid, manifest)

    monkeypatch.setattr(FeatureStore, "write_block", crash_on_block_2)
    with pytest.raises(KeyboardInterrupt):
        extract(config(videos, out))
    monkeypatch.setattr(FeatureStore, "write_block", real_write)
    with pytest.raises(StoreError, match="--resume"):
        extract(config(videos, out))
    partial = FeatureStore(out).done()
    # blocks 0-1 finished, block 2 half-written; the writer thread may have finished block 3 too
    assert partial[:3].tolist() == [True, True, False] and not partial[4]
    extract(config(videos, out, resume=True))
    want = read_all(single_run)
    for name, got in read_all(open_store(out)).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)


def test_finished_store_is_never_rewritten(single_run, videos):
    chunk = single_run.path / "a" / "c" / "0" / "0" / "0" / "0"
    before = chunk.stat().st_mtime_ns
    with pytest.raises(StoreError, match="complete"):
        extract(config(videos, single_run.path))
    extract(config(videos, single_run.path, resume=True))  # nothing left: a no-op
    assert chunk.stat().st_mtime_ns == before


def test_other_settings_are_refused(single_run, videos):
    with pytest.raises(StoreError, match="views: expected 2, found 3"):
        extract(config(videos, single_run.path, views=2, resume=True))
    with pytest.raises(StoreError, match="seed"):
        extract(config(videos, single_run.path, seed=1, resume=True))


def test_overwrite_is_refused_for_shards(single_run, videos):
    with pytest.raises(ValueError, match="--overwrite cannot be combined with --shard"):
        extract(config(videos, single_run.path, shard=(0, 2), overwrite=True))
    assert open_store(single_run.path).complete


def test_incomplete_store_is_refused_by_readers(videos, tmp_path):
    out = tmp_path / "half.zarr"
    extract(config(videos, out, shard=(0, 2)))
    with pytest.raises(StoreError, match="incomplete store, 2 of 5 blocks missing"):
        open_store(out)


def test_list_file_with_root(videos, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("frames/clip0\nmp4/clip1.mp4\n")
    store = extract(config(listing, tmp_path / "l.zarr", root=videos))
    assert store.videos() == ["frames/clip0", "mp4/clip1.mp4"] and store.valid().all()
    assert manifest_dir(store.path).is_dir()


def test_cli_rejects_bad_input_with_one_line(videos, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    res = CliRunner().invoke(cli.main, ["--backbone", "dino_vitb", "--weights", str(bad), "--videos", str(videos),
                                        "--out", str(tmp_path / "x.zarr")])
    assert res.exit_code == 1
    assert f"Error: {bad}: not a weights-only torch checkpoint" in res.output
    res = CliRunner().invoke(cli.main, ["--backbone", "dino_vitb", "--weights", "random", "--videos", str(videos),
                                        "--out", str(tmp_path / "x.zarr"), "--shard", "2/2"])
    assert res.exit_code == 2 and "need 0 <= i < n" in res.output


def test_cli_full_size_backbone(videos, tmp_path):
    """The command line on a real-size random ViT-B/16: one video, one view."""
    listing = tmp_path / "one.txt"
    listing.write_text("frames/clip0\n")
    out = tmp_path / "cli.zarr"
    res = CliRunner().invoke(cli.main, ["--backbone", "mae_vitb", "--weights", "random", "--videos", str(listing),
                                        "--root", str(videos), "--out", str(out), "--views", "1", "--workers", "0"])
    assert res.exit_code == 0, res.output
    store = open_store(out)
    assert store.array("a_asy").shape == (1, 1, 196, 768)
    tokens = store.array("a_asy")[:].astype(np.float32)
    assert np.isfinite(tokens).all() and tokens.std() > 0.1


def test_list_file_rules(tmp_path):
    from cosettle.core.listfiles import ListFileError, read_list_file

    good = tmp_path / "good.txt"
    good.write_text("# a comment\n\n  a/b.mp4 \n  # indented comment\nc\n")
    assert read_list_file(good) == ["a/b.mp4", "c"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ListFileError, match=f"^{re.escape(str(empty))}: the video list is empty$"):
        read_list_file(empty)
    twice = tmp_path / "twice.txt"
    twice.write_text("a\nb\na\n")
    with pytest.raises(ListFileError, match="names some videos twice"):
        read_list_file(twice)
