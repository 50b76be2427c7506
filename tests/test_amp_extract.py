"""``--amp`` at extraction: float32 tokens unchanged, CPU bf16 autocast really on and close to float32,
the effective choice recorded in the store settings and stores of another choice refused."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cosettle.core import precision
from cosettle.core.precision import cpu_bf16_supported, recorded_amp, resolve_amp
from cosettle.pipeline import cli
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.store import StoreError, open_store
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder
from cosettle.pipeline.transforms import apply_view
from cosettle.pipeline.views import View
from cosettle.trainer.stores import open_stores

TINY = dict(embed_dim=32, depth=2, num_heads=2)
needs_bf16 = pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no native bf16")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for i in range(3):
        write_frame_folder(root / f"clip{i}", moving_scene(10 + 2 * i, 48, 64, 2, seed=i)[0])
    return root


def config(videos: Path, out: Path, **kw) -> ExtractConfig:
    base = ExtractConfig(videos=videos, out=out, backbone="dino_vitb", weights="random", views=2, chunk_videos=2,
                         workers=0, batch_size=3, arch=TINY, dtype="float32")
    return replace(base, **kw)


def tokens(store) -> dict[str, np.ndarray]:
    return {name: store.array(name)[:] for name in ("a", "b", "a_asy")}


@pytest.fixture(scope="module")
def fp32_store(videos, tmp_path_factory):
    return extract(config(videos, tmp_path_factory.mktemp("fp32") / "s.zarr"))  # --amp auto: none on CPU


@pytest.fixture(scope="module")
def bf16_store(videos, tmp_path_factory):
    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16")
    return extract(config(videos, tmp_path_factory.mktemp("bf16") / "s.zarr", amp="bf16"))


def test_resolve_amp_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_amp(a, cuda) for a in ("auto", "none", "bf16", "fp16")] == ["bf16", "none", "bf16", "fp16"]
    assert resolve_amp("auto", cpu) == resolve_amp("none", cpu) == "none"
    with pytest.raises(ValueError, match="--amp fp16: not available on cpu"):
        resolve_amp("fp16", cpu)
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no native bf16 instructions"):
        resolve_amp("bf16", cpu)
    # recorded only where it is not auto's choice (what stores and caches were made with before --amp)
    assert [recorded_amp(a, cuda) for a in ("bf16", "none", "fp16")] == [None, "none", "fp16"]
    assert [recorded_amp(a, cpu) for a in ("none", "bf16")] == [None, "bf16"]


def test_float32_tokens_equal_a_direct_forward(fp32_store, videos):
    """Default extraction on CPU is float32: tokens equal the backbone run directly on the manifest's views."""
    store = open_store(fp32_store.path)
    assert "autocast" not in store.settings  # the default: settings as before the option existed
    backbone = load_backbone("dino_vitb", "random", arch=TINY)
    for r in store.manifest().to_pylist():
        view = View(**{k: r[k] for k in View.__dataclass_fields__})
        files = sorted((videos / r["video"]).iterdir())
        pair = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in (r["frame_a"], r["frame_b"])])
        x = apply_view(pair, view, 224)
        with torch.no_grad():
            a, b = backbone.patch_features(x)
            a_asy = backbone.patch_features(x[:1], asy_offset=(view.asy_oy, view.asy_ox))[0]
        for name, want in (("a", a), ("b", b), ("a_asy", a_asy)):
            got = torch.from_numpy(store.array(name)[r["view"], r["video_index"]])
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # batching order only


def test_explicit_none_equals_the_default(fp32_store, videos, tmp_path):
    other = extract(config(videos, tmp_path / "none.zarr", amp="none"))
    for name, got in tokens(other).items():
        np.testing.assert_array_equal(got, tokens(fp32_store)[name], err_msg=name)


@needs_bf16
def test_bf16_tokens_differ_from_float32_by_a_bounded_amount(bf16_store, fp32_store):
    assert open_store(bf16_store.path).settings["autocast"] == "bf16"
    for name, want in tokens(fp32_store).items():
        got = tokens(bf16_store)[name]
        valid = np.abs(want).sum(-1) > 0
        diff = np.abs(got - want)[valid]
        assert diff.max() > 0, name  # autocast was really on, not silently float32
        cos = (got * want).sum(-1)[valid] / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))[valid]
        assert cos.min() > 0.999, name
        assert diff.mean() / np.abs(want[valid]).mean() < 0.02, name


@needs_bf16
def test_another_choice_is_refused_on_resume(bf16_store, fp32_store, videos):
    with pytest.raises(StoreError, match="autocast: expected 'none', found 'bf16'"):
        extract(config(videos, bf16_store.path, resume=True))
    with pytest.raises(StoreError, match="autocast: expected 'bf16', found 'none'"):
        extract(config(videos, fp32_store.path, amp="bf16", resume=True))


@needs_bf16
def test_training_never_combines_stores_of_two_choices(bf16_store, fp32_store):
    for paths in ((bf16_store.path, fp32_store.path), (fp32_store.path, bf16_store.path)):
        with pytest.raises(StoreError, match="cannot be combined .*autocast"):
            open_stores(list(paths))


@needs_bf16
def test_clips_layout_records_and_applies_bf16(videos, tmp_path):
    clips = dict(layout="clips", plan="cstp", clip_frames=2, views=1, pooling="mean")
    fp32 = extract(config(videos, tmp_path / "c32.zarr", **clips))
    bf16 = extract(config(videos, tmp_path / "c16.zarr", amp="bf16", **clips))
    assert (fp32.settings.get("autocast"), bf16.settings["autocast"]) == (None, "bf16")
    want, got = fp32.array("tokens")[:], bf16.array("tokens")[:]
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_cli_refuses_amp_the_device_cannot_run(videos, tmp_path, monkeypatch):
    args = ["--backbone", "dino_vitb", "--weights", "random", "--videos", str(videos), "--out",
            str(tmp_path / "x.zarr"), "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(cli.main, args + ["--amp", "fp16"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "--amp fp16: not available on cpu" in result.output
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    result = CliRunner().invoke(cli.main, args + ["--amp", "bf16"])
    assert result.exit_code == 1 and "no native bf16 instructions" in result.output
    assert not (tmp_path / "x.zarr").exists()
