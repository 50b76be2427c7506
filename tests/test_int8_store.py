import json

"""int8 stores: per-token quantisation, its decoding by the trainer's reader (both layouts), extraction
into an int8 store, and the refusal to resume a store in another dtype."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cosettle.pipeline import cli
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.quant import dequantize, quantize
from cosettle.pipeline.store import StoreError, create_or_open, open_store
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder
from cosettle.trainer.data import ChunkReader, chunk_table, epoch_plan
from cosettle.trainer.synthetic import synthetic_settings, write_synthetic_clip_store, write_synthetic_store

pytestmark = pytest.mark.torch_threads(1)
TINY = dict(embed_dim=32, depth=1, num_heads=2)


def independent_dequantisation(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q * s in float64 (exact for int8 times float32), rounded to float32."""
    return (codes.astype(np.float64) * scale.astype(np.float64)).astype(np.float32)


def test_round_trip_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    # tokens of very different magnitudes, some with one outlier channel, as ViT tokens have
    x = rng.standard_normal((64, 7, 48)).astype(np.float32) * np.logspace(-4, 4, 64, dtype=np.float32)[:, None, None]
    x[::5, :, 3] *= 40
    codes, scale = quantize(x)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (64, 7, 1)
    assert np.abs(codes.astype(int)).max() <= 127
    s = scale.astype(np.float64)
    amax = np.abs(x).max(axis=-1, keepdims=True).astype(np.float64)
    assert np.allclose(s * 127, amax, rtol=2**-22, atol=0)  # max|x| / 127, whatever the token's magnitude
    assert (np.abs(codes).max(axis=-1) == 127).all()  # the scale is not looser than needed
    decoded = dequantize(codes, scale)
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, independent_dequantisation(codes, scale))
    err = np.abs(decoded.astype(np.float64) - x)
    assert (err <= s / 2 * (1 + 1e-4)).all()
    assert err.max() > 0  # it did quantise


def test_zero_token_and_non_finite_token():
    x = np.ones((3, 4, 8), dtype=np.float32)
    x[0, 1] = 0.0
    x[2, 3, 5] = np.nan
    with np.errstate(all="raise"):  # no division by zero anywhere
        codes, scale = quantize(x)
    assert scale[0, 1, 0] == 0 and not codes[0, 1].any()
    decoded = dequantize(codes, scale)
    assert np.array_equal(decoded[0, 1], np.zeros(8, np.float32))
    assert np.isnan(decoded[2, 3]).all()  # a NaN token stays unusable, never silently zero
    assert np.isfinite(np.delete(decoded.reshape(12, 8), 11, axis=0)).all()
    assert np.array_equal(decoded[1], x[1])


def planned_batches(store, view: int, batch: int = 4):
    """Every batch of one epoch through the trainer's reader, with the video row of each sample."""
    chunks = chunk_table([store])
    plan = epoch_plan(chunks, 0, 0, 0, 1, batch, shuffle_chunks=2)
    rows = [[chunks[c].block * store.settings["chunk_videos"] + r for c, r in ids.tolist()] for ids in plan]
    return list(ChunkReader([store], chunks, window=1, io_threads=2).batches(plan, view)), rows


@pytest.mark.parametrize("layout", ["views", "clips"])
def test_reader_gets_the_dequantised_tokens(tmp_path, layout):
    if layout == "views":
        write = lambda p, dtype: write_synthetic_store(p, num_videos=11, views=2, grid=4, dim=16,  # noqa: E731
                                                       chunk_videos=4, dtype=dtype, invalid=(5,))
        names = ("a", "b", "a_asy")
    else:
        write = lambda p, dtype: write_synthetic_clip_store(p, num_videos=11, views=2, chunk_videos=4,  # noqa: E731
                                                            dtype=dtype, invalid=(5,))
        names = ("tokens",)
    write(tmp_path / "q.zarr", "int8")
    write(tmp_path / "f.zarr", "float32")  # the same tokens (same seed), unquantised
    store, exact = open_store(tmp_path / "q.zarr"), open_store(tmp_path / "f.zarr")
    raw = zarr.open_group(str(tmp_path / "q.zarr"), mode="r")
    view = 1
    batches, rows = planned_batches(store, view)
    assert batches
    for name in names:
        codes, scale = raw[name][view], raw[f"{name}_scale"][view]
        assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == codes.shape[:-1] + (1,)
        expected = independent_dequantisation(codes, scale)
        reference = exact.array(name)[view]
        for batch, r in zip(batches, rows):
            got = batch[name].numpy()
            assert got.dtype == np.float32 and np.array_equal(got, expected[r])
            step = scale[r].astype(np.float64)
            assert (np.abs(got - reference[r]) <= step / 2 * (1 + 1e-4)).all()
        assert np.isnan(expected[5]).all()  # the invalid row's NaN survives quantisation
    if layout == "clips":
        assert all(np.array_equal(b["labels"].numpy(), exact.array("labels")[view][r]) for b, r in zip(batches, rows))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_zstd_shuffle_stores_read_as_uncompressed_ones(tmp_path, dtype):
    stores = {}
    for compressor in ("none", "zstd-shuffle"):
        write_synthetic_store(tmp_path / f"{compressor}.zarr", num_videos=6, views=1, chunk_videos=3, dtype=dtype,
                              compressor=compressor)
        stores[compressor] = open_store(tmp_path / f"{compressor}.zarr")
    codec = stores["zstd-shuffle"].array("a").compressors[0]
    assert (codec.cname.value, codec.clevel, codec.shuffle.value) == ("zstd", 5, "shuffle")
    for name in ("a", "b", "a_asy"):
        assert np.array_equal(stores["zstd-shuffle"].read(name, 0, 0, 6), stores["none"].read(name, 0, 0, 6))


def test_resuming_in_another_dtype_is_refused(tmp_path):
    videos = [f"v{i}" for i in range(4)]
    for made, asked in (("float16", "int8"), ("int8", "float16")):
        path = tmp_path / f"{made}.zarr"
        write_synthetic_store(path, num_videos=4, views=1, chunk_videos=2, dtype=made, complete=False)
        settings = synthetic_settings([f"synthetic/video{i:06d}" for i in range(4)], views=1, grid=4, dim=32,
                                      chunk_videos=2, dtype=asked)
        with pytest.raises(StoreError, match=f"{path}: made with other settings \\(dtype: expected '{asked}', "
                                             f"found '{made}'\\)"):
            create_or_open(path, settings, videos, resume=True, overwrite=False, join=False)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("int8videos")
    for i in range(3):
        write_frame_folder(root / f"clip{i}", moving_scene(6 + i, 48, 64, 2, seed=i)[0])
    return root


def config(videos: Path, out: Path, **kw) -> ExtractConfig:
    return replace(ExtractConfig(videos=videos, out=out, backbone="dino_vitb", weights="random", views=2,
                                 chunk_videos=2, workers=0, batch_size=8, arch=TINY), **kw)


def test_extract_int8_matches_float32_extraction_and_refuses_other_dtypes(frames, tmp_path):
    q = extract(config(frames, tmp_path / "q.zarr", dtype="int8"))
    f = extract(config(frames, tmp_path / "f.zarr", dtype="float32"))
    assert q.settings["dtype"] == "int8" and open_store(q.path).complete
    for name in ("a", "b", "a_asy"):
        codes, scale = q.array(name)[:], q.array(f"{name}_scale")[:]
        assert codes.dtype == np.int8 and scale.shape == codes.shape[:-1] + (1,)
        err = np.abs(independent_dequantisation(codes, scale).astype(np.float64) - f.array(name)[:])
        assert (err <= scale.astype(np.float64) / 2 * (1 + 1e-4)).all()
    res = CliRunner().invoke(cli.main, ["--backbone", "dino_vitb", "--weights", "random", "--videos", str(frames),
                                        "--out", str(f.path), "--views", "2", "--chunk-videos", "2", "--workers", "0",
                                        "--dtype", "int8", "--resume", "--arch", json.dumps(TINY)])  # the float32 store, resumed as int8
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: {f.path}: made with other settings (dtype: expected 'int8', found 'float32'); "
        "use another path or --overwrite"]
