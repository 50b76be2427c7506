"""cosettle-extract --dry-run: the printed size and chunk count against an independent count and
against the store a real run then writes; nothing written; the free-space warning."""
import functools
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner

from cosettle.pipeline import cli, dry_run
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder

pytestmark = pytest.mark.torch_threads(1)

TINY = dict(embed_dim=32, depth=1, num_heads=2)  # 224 px: 196 tokens of 32 channels
V, C = 7, 2  # videos (the first one broken) and videos per block: 4 blocks, the last one half full
BLOCKS, ROWS = 4, 8  # rows padded to whole chunks, as Zarr writes edge chunks
LAYOUTS = {
    # layout: extra settings, {array: bytes of one video row (all views)} computed from the settings by hand
    "views": (dict(views=3), {"a": 3 * 196 * 32 * 2, "a_asy": 3 * 196 * 32 * 2, "b": 3 * 196 * 32 * 2}),
    # two clips of 4 frames, one level, cls+mean = 64 channels, float16; labels: 6 int16
    "clips": (dict(views=2, layout="clips", plan="vthcl", clip_frames=4),
              {"tokens": 2 * 2 * 4 * 1 * 64 * 2, "labels": 2 * 6 * 2}),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dryvideos")
    (root / "0broken.mp4").write_bytes(b"\x00not a video" * 50)  # first in the list: the probe must skip it
    for i in range(V - 1):
        write_frame_folder(root / f"clip{i}", moving_scene(24, 48, 64, 2, seed=i)[0])
    return root


def config(videos: Path, out: Path, layout: str, **kw) -> ExtractConfig:
    extra, _ = LAYOUTS[layout]
    return ExtractConfig(videos=videos, out=out, backbone="dino_vitb", weights="random", chunk_videos=C, workers=0,
                         batch_size=8, device="cpu", arch=TINY, **extra, **kw)


def number(lines: list[str], pattern: str) -> int:
    found = [m for line in lines if (m := re.search(pattern, line))]
    assert len(found) == 1, (pattern, lines)
    return int(found[0].group(1).replace(",", ""))


def tree(path: Path) -> set[str]:
    return {str(Path(d) / f) for d, _, files in os.walk(path) for f in files} | {str(path)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_size_and_chunks_equal_an_independent_count_and_the_written_store(layout, videos, tmp_path):
    out = tmp_path / "new" / "dir" / "s.zarr"
    before = tree(tmp_path), tree(videos)
    lines, warning = dry_run.dry_run_report(config(videos, out, layout))
    assert (tree(tmp_path), tree(videos)) == before  # nothing written, not even the parent folders
    assert not (tmp_path / "new").exists()

    _, row_bytes = LAYOUTS[layout]
    k = LAYOUTS[layout][0]["views"]
    expected = {name: ROWS * b for name, b in row_bytes.items()} | {"valid": ROWS, "done": BLOCKS}
    for name, nbytes in expected.items():
        assert number(lines, rf"^array +{name} \[.*: ([\d,]+) bytes") == nbytes, name
    written = number(lines, r"^written +([\d,]+) bytes")
    assert 0 < written < 20_000  # metadata, attributes and seven paths
    assert number(lines, r"^size +([\d,]+) bytes") == sum(expected.values()) + written
    chunks = len(row_bytes) * k * BLOCKS + BLOCKS + BLOCKS + 1  # per-view arrays, valid, done, videos
    assert number(lines, r"in ([\d,]+) chunk files") == chunks
    assert number(lines, r"for ([\d,]+) videos on cpu") == V
    # a batch of 8 images from decoded videos of 2K (views) or 2 x 2 x 4 (clips) images, within a block of 2
    copies = {"views": "2 copies", "clips": "1 copy"}[layout]
    assert any(f"timed: {copies} of clip0, batch 8" in line for line in lines), lines  # the broken one skipped
    assert warning is None  # a few MB

    # the store a real run writes (uncompressed): the same bytes per array and the same chunk files
    store = extract(config(videos, out, layout))
    for name in row_bytes:
        files = [p for p in (store.path / name).rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert sum(p.stat().st_size for p in files) == expected[name], name
    chunk_files = [p for p in store.path.rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(chunk_files) == chunks


@pytest.mark.parametrize("shard", [(0, 1), (0, 2), (1, 2), (2, 3), (0, 5)])
def test_shard_videos_counts_the_blocks_a_shard_owns(shard):
    index, count = shard
    owned = sum(1 for row in range(V) if (row // C) % count == index)
    assert dry_run.shard_videos(V, C, shard) == owned


def fake_disk(free: int):
    usage = namedtuple("usage", "total used free")
    return lambda path: usage(10**12, 10**12 - free, free)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cli_warns_when_the_filesystem_is_too_small(layout, videos, tmp_path, monkeypatch):
    """Through the command line (a tiny architecture slipped into its config): one warning line on
    stderr naming the store, the bytes needed and the free bytes of the nearest existing folder."""
    monkeypatch.setattr(cli, "ExtractConfig", functools.partial(ExtractConfig, arch=TINY))
    out = tmp_path / "missing" / "s.zarr"
    args = ["--backbone", "dino_vitb", "--weights", "random", "--videos", str(videos), "--out", str(out),
            "--chunk-videos", str(C), "--workers", "0", "--batch-size", "8", "--device", "cpu", "--dry-run",
            "--layout", layout]
    extra, _ = LAYOUTS[layout]
    args += ["--views", str(extra["views"])] + (["--plan", "vthcl", "--clip-frames", "4"] if layout == "clips" else [])
    seen = []
    monkeypatch.setattr(dry_run.shutil, "disk_usage", lambda p: seen.append(p) or fake_disk(1000)(p))
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    needed = number(res.stdout.splitlines(), r"^size +([\d,]+) bytes")
    assert res.stderr == (f"warning: {out} needs {needed:,} bytes ({needed / 2**30:.2f} GiB), {tmp_path} has only "
                          f"1,000 bytes free (0.00 GiB)\n")
    assert seen == [tmp_path] and not (tmp_path / "missing").exists()

    monkeypatch.setattr(dry_run.shutil, "disk_usage", fake_disk(needed))  # exactly enough
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0 and res.stderr == "", res.output


def test_real_disk_usage_is_asked_of_the_nearest_existing_folder(tmp_path):
    assert dry_run.nearest_existing(tmp_path / "a" / "b" / "c.zarr") == tmp_path
    free = shutil.disk_usage(tmp_path).free
    assert dry_run.space_warning(tmp_path / "a" / "c.zarr", free // 2) is None
    assert dry_run.space_warning(tmp_path / "a" / "c.zarr", free * 2 + 2**40).startswith(f"warning: {tmp_path / 'a'}")
