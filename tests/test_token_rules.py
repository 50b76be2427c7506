"""The per-backbone token rule (``BackboneSpec.final_norm``): which token sets get the final norm.

``ijepa_vitb`` follows the Co-Settle authors' I-JEPA code ("asy-only": A, B, evaluation features and
pooled levels without the final norm, A_asy with it), ``ijepa_vitb_norm`` normalises every token set
("all", as every other backbone). The references are written here from the timm modules' parts
(patch projection, positions, blocks, norm), not through ``Backbone``. The rule is provenance: stores
record it, evaluation caches key on it, and a store or cache made with the old rule is refused.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zarr
from click.testing import CliRunner
from fake_releases import TOL, as_grid, images, write_ijepa
from PIL import Image

from cosettle.core.provenance import mismatches
from cosettle.eval.frame.features import FeatureCache, FeatureSource
from cosettle.eval.frame.features import cache_key as frame_cache_key
from cosettle.eval.frame.features import default_cache_path as frame_cache_path
from cosettle.eval.frame.propagation import PropagationSettings
from cosettle.eval.video.clip_features import ClipFeatureSource, ClipProtocol
from cosettle.eval.video.clip_features import cache_key as clip_cache_key
from cosettle.eval.video.clip_features import default_cache_path as clip_cache_path
from cosettle.eval.zarr_cache import CacheError, ZarrCache
from cosettle.pipeline import cli as extract_cli
from cosettle.pipeline.backbones import ALL, ASY_ONLY, BACKBONES, BackboneSpec, load_backbone, register
from cosettle.pipeline.extract import ExtractConfig, extract, store_settings
from cosettle.pipeline.store import ATTR, StoreError, open_store
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder
from cosettle.pipeline.transforms import apply_view
from cosettle.pipeline.views import View
from cosettle.trainer import cli as train_cli
from cosettle.trainer.stores import open_stores

TINY = dict(embed_dim=32, depth=2, num_heads=2)
OLD_RULE = "final_norm: expected 'asy-only', found 'all'"
# what stores and caches recorded before token rules existed: "all" backbones record exactly this still
OLD_VIEWS_SETTINGS = {"backbone", "weights", "weights_sha256", "image_size", "grid", "dim", "dtype", "views",
                      "clip_gap", "crop_scale", "crop_ratio", "asy_ratio", "seed", "num_videos", "videos_sha256",
                      "chunk_videos", "compressor"}
OLD_FRAME_KEY = {"format", "backbone", "weights", "weights_sha256", "dim", "depth", "patch_size", "input", "mean",
                 "std", "resize", "dtype"}
OLD_CLIP_KEY = {"format", "backbone", "weights", "weights_sha256", "dim", "depth", "patch_size", "crop", "protocol",
                "text_weights_sha256", "normalisation", "precision", "dtype"}


# ---------------------------------------------------------------- 1. the registry


def test_registered_rules():
    ijepa, variant = BACKBONES["ijepa_vitb"], BACKBONES["ijepa_vitb_norm"]
    assert (ijepa.final_norm, variant.final_norm) == (ASY_ONLY, ALL)
    # the variant is the same release and architecture, only the rule differs
    assert replace(variant, name=ijepa.name, description=ijepa.description, final_norm=ASY_ONLY) == ijepa
    assert {n for n, s in BACKBONES.items() if s.final_norm != ALL} == {"ijepa_vitb"}


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown final_norm 'none'"):
        register(BackboneSpec("ijepa_vitb_none", "vit_base_patch16_224", BACKBONES["ijepa_vitb"].checkpoint,
                              final_norm="none"))
    assert "ijepa_vitb_none" not in BACKBONES


# ---------------------------------------------------------------- 2. tokens against an independent forward


def vit_forward(ref: nn.Module, x: torch.Tensor, patch_pos: torch.Tensor, norm: bool, upto: int | None = None):
    """The authors' ViT forward for a model without prefix tokens (I-JEPA): patch projection, plus
    the patch positions [B or 1, N, D], the blocks (the first ``upto``), then the final norm if asked."""
    t = ref.patch_embed.proj(x).flatten(2).transpose(1, 2) + patch_pos
    for block in ref.blocks[:upto]:
        t = block(t)
    return ref.norm(t) if norm else t


def asy_pos(ref: nn.Module, offsets, ratio: float = 10.0) -> torch.Tensor:
    """[B, 196, D]: the 14 x 14 window at each (oy, ox) of the position grid enlarged to S x S."""
    s = int((1 + ratio) * 14)
    big = F.interpolate(as_grid(ref.pos_embed), size=(s, s), mode="bicubic", align_corners=False)
    return torch.cat([big[..., oy:oy + 14, ox:ox + 14].flatten(2).transpose(1, 2) for oy, ox in offsets])


@pytest.fixture(scope="module")
def ijepa(tmp_path_factory):
    """The fake I-JEPA release, loaded as both backbones, and its timm reference."""
    rel = write_ijepa(tmp_path_factory.mktemp("ijepa"))
    authors = load_backbone("ijepa_vitb", rel.path, arch=rel.arch)
    normed = load_backbone("ijepa_vitb_norm", rel.path, arch=rel.arch)
    assert authors.weights_sha256 == normed.weights_sha256
    return rel, authors, normed


def test_ijepa_ab_and_evaluation_tokens_are_not_normalised(ijepa):
    rel, bb, _ = ijepa
    x = images()
    with torch.no_grad():
        want = vit_forward(rel.ref, x, rel.ref.pos_embed, norm=False)
        normed = rel.ref.norm(want)
    assert bb.final_norm == ASY_ONLY and not bb.norm_plain
    torch.testing.assert_close(bb.patch_features(x), want, **TOL)
    cls, patches = bb.tokens(x)
    assert cls is None
    torch.testing.assert_close(patches, want, **TOL)
    assert (want - normed).abs().max() > 0.5  # the rule is visible: the norm changes the tokens a lot


@pytest.mark.parametrize("offsets", [[(0, 0), (0, 0)], [(140, 0), (37, 91)]])
def test_ijepa_asymmetric_tokens_are_normalised(ijepa, offsets):
    rel, bb, normed = ijepa
    x = images()
    with torch.no_grad():
        want = vit_forward(rel.ref, x, asy_pos(rel.ref, offsets), norm=True)
    torch.testing.assert_close(bb.patch_features(x, asy_offset=torch.tensor(offsets)), want, **TOL)
    torch.testing.assert_close(normed.patch_features(x, asy_offset=torch.tensor(offsets)), want, **TOL)


def test_ijepa_norm_variant_normalises_every_token(ijepa):
    rel, bb, normed = ijepa
    x = images()
    with torch.no_grad():
        want = vit_forward(rel.ref, x, rel.ref.pos_embed, norm=True)
        torch.testing.assert_close(want, rel.ref.forward_features(x), **TOL)  # timm's own forward agrees
        torch.testing.assert_close(normed.patch_features(x), want, **TOL)
        torch.testing.assert_close(normed.tokens(x)[1], want, **TOL)
        # the two rules differ by exactly the final norm
        torch.testing.assert_close(normed.patch_features(x), bb.model.norm(bb.patch_features(x)), **TOL)


def test_ijepa_levels_follow_the_rule(ijepa):
    rel, bb, normed = ijepa
    x = images()
    with torch.no_grad():
        blocks = [vit_forward(rel.ref, x, rel.ref.pos_embed, norm=False, upto=i) for i in (1, 2)]
        got, got_normed = bb.level_vectors(x, (1, 2), "mean"), normed.level_vectors(x, (1, 2), "mean")
        for i, t in enumerate(blocks):
            torch.testing.assert_close(got[:, i], t.mean(1), **TOL)
            torch.testing.assert_close(got_normed[:, i], rel.ref.norm(t).mean(1), **TOL)
        # the last level is the pooled tokens() under either rule
        torch.testing.assert_close(got[:, 1], bb.tokens(x)[1].mean(1), **TOL)
        torch.testing.assert_close(got_normed[:, 1], normed.tokens(x)[1].mean(1), **TOL)


def test_other_backbones_keep_normalising_every_token():
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    x = images()
    assert bb.final_norm == ALL and bb.norm_plain
    with torch.no_grad():
        torch.testing.assert_close(bb.patch_features(x), bb.model.forward_features(x)[:, 1:], **TOL)


# ---------------------------------------------------------------- 3. stores record the rule; old ones are refused


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Four 40-frame folders: two lists of two, for two stores to combine."""
    root = tmp_path_factory.mktemp("rulevideos")
    for i in range(4):
        write_frame_folder(root / f"v{i}", moving_scene(40, 48, 64, 2, seed=i)[0])
    for name, ids in (("first.txt", (0, 1)), ("second.txt", (2, 3))):
        (root / name).write_text("".join(f"v{i}\n" for i in ids))
    return root


def config(videos: Path, out: Path, backbone: str = "ijepa_vitb", listing: str = "first.txt", **kw) -> ExtractConfig:
    base = ExtractConfig(videos=videos / listing, root=videos, out=out, backbone=backbone, weights="random",
                         views=2, chunk_videos=2, workers=0, batch_size=8, arch=TINY)
    return replace(base, **kw)


def age(path: Path, rule: str | None = None) -> None:
    """Make ``path`` look like a store made before the rule was recorded (``rule`` None) or with ``rule``."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    meta = dict(group.attrs[ATTR])
    settings = dict(meta["settings"])
    settings.pop("final_norm", None)
    if rule is not None:
        settings["final_norm"] = rule
    group.attrs[ATTR] = dict(meta, settings=settings)


@pytest.fixture(scope="module")
def stores(videos, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rulestores")
    made = {"ijepa": extract(config(videos, out / "ijepa.zarr")).path,
            "ijepa_second": extract(config(videos, out / "ijepa2.zarr", listing="second.txt")).path,
            "ijepa_norm": extract(config(videos, out / "ijepa_norm.zarr", backbone="ijepa_vitb_norm")).path,
            "dino": extract(config(videos, out / "dino.zarr", backbone="dino_vitb")).path}
    return made


def test_views_stores_record_the_rule(stores, videos):
    assert set(open_store(stores["ijepa"]).settings) == OLD_VIEWS_SETTINGS | {"final_norm"}
    assert open_store(stores["ijepa"]).settings["final_norm"] == ASY_ONLY
    # "all" is not recorded: stores of every other backbone have the settings they always had
    assert set(open_store(stores["ijepa_norm"]).settings) == OLD_VIEWS_SETTINGS
    assert set(open_store(stores["dino"]).settings) == OLD_VIEWS_SETTINGS


def test_views_store_tokens_follow_the_rule(stores, videos):
    """A and B without the final norm, A_asy with it; the norm variant (same random weights) differs
    from ijepa_vitb exactly by the norm on A and B, and not at all on A_asy."""
    store, normed = open_store(stores["ijepa"]), open_store(stores["ijepa_norm"])
    bb = load_backbone("ijepa_vitb", "random", arch=TINY)
    r = next(r for r in store.manifest().to_pylist() if r["video"] == "v1" and r["view"] == 1)
    view = View(**{k: r[k] for k in View.__dataclass_fields__})
    files = sorted((videos / "v1").iterdir())
    pair = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in (r["frame_a"], r["frame_b"])])
    x = apply_view(pair, view, 224)
    with torch.no_grad():
        plain = vit_forward(bb.model, x, bb.model.pos_embed, norm=False)
        asy = vit_forward(bb.model, x[:1], asy_pos(bb.model, [(view.asy_oy, view.asy_ox)]), norm=True)[0]
        want = {"a": plain[0], "b": plain[1], "a_asy": asy}
        want_normed = {"a": bb.model.norm(plain[0]), "b": bb.model.norm(plain[1]), "a_asy": asy}
    for name in ("a", "b", "a_asy"):
        got = torch.from_numpy(store.array(name)[1, r["video_index"]].astype(np.float32))
        torch.testing.assert_close(got, want[name], atol=3e-3, rtol=3e-3)
        got = torch.from_numpy(normed.array(name)[1, r["video_index"]].astype(np.float32))
        torch.testing.assert_close(got, want_normed[name], atol=3e-3, rtol=3e-3)


def test_old_views_store_is_refused_on_resume(stores, videos, tmp_path):
    path = tmp_path / "old.zarr"
    extract(config(videos, path))
    age(path)
    old = zarr.open_group(str(path), mode="r", zarr_format=3).attrs[ATTR]["settings"]
    expected = store_settings(config(videos, path), load_backbone("ijepa_vitb", "random", arch=TINY),
                              ["v0", "v1"]).as_dict()
    assert mismatches(expected, old) == ["final_norm: expected 'asy-only', found None"]
    message = re.escape(f"{path}: made with other settings ({OLD_RULE}); use another path or --overwrite")
    with pytest.raises(StoreError, match=f"^{message}$"):
        extract(config(videos, path, resume=True))
    res = CliRunner().invoke(extract_cli.main, ["--backbone", "ijepa_vitb", "--weights", "random", "--videos",
                                                str(videos / "first.txt"), "--root", str(videos), "--out", str(path),
                                                "--views", "2", "--chunk-videos", "2", "--workers", "0", "--resume"])
    # the CLI has no tiny architecture: its full-size random ViT-B differs in dim too, the rule is named
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "made with other settings (" in res.output and OLD_RULE in res.output
    # the norm variant holds what the old store holds, but under another name: refused too, not adopted
    with pytest.raises(StoreError, match="backbone: expected 'ijepa_vitb_norm', found 'ijepa_vitb'"):
        extract(config(videos, path, backbone="ijepa_vitb_norm", resume=True))
    # a store recorded with the other rule, either way round
    age(path, ALL)
    with pytest.raises(StoreError, match=re.escape(OLD_RULE)):
        extract(config(videos, path, resume=True))
    normed = tmp_path / "normed.zarr"
    extract(config(videos, normed, backbone="ijepa_vitb_norm"))
    age(normed, ASY_ONLY)
    with pytest.raises(StoreError, match=re.escape("final_norm: expected 'all', found 'asy-only'")):
        extract(config(videos, normed, backbone="ijepa_vitb_norm", resume=True))


def test_old_stores_of_other_backbones_stay_valid(stores, videos):
    """A dino store written before rules existed has exactly the settings a new one has (the same keys,
    test_views_stores_record_the_rule): resumed (nothing left to do) and trained on as before."""
    extract(config(videos, stores["dino"], backbone="dino_vitb", resume=True))
    extract(config(videos, stores["ijepa"], resume=True))  # a current ijepa_vitb store too
    assert len(open_stores([stores["dino"]])) == 1


def test_old_store_is_refused_by_training(stores, videos, tmp_path):
    old = tmp_path / "old.zarr"
    extract(config(videos, old, listing="second.txt"))
    age(old)
    new, other = stores["ijepa"], stores["ijepa_second"]
    assert len(open_stores([new, other])) == 2  # two current stores combine
    message = f"{old}: made with other settings ({OLD_RULE}, ijepa_vitb's token rule); extract it again with " \
              "--overwrite"
    for paths in ([new, old], [old, new], [old]):
        with pytest.raises(StoreError) as info:
            open_stores(paths)
        assert str(info.value) == message
    res = CliRunner().invoke(train_cli.main, ["--features", str(new), "--features", str(old), "--out",
                                              str(tmp_path / "run"), "--device", "cpu", "--batch-size", "2"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


def test_clip_stores_record_the_rule_and_refuse_the_old_one(videos, tmp_path):
    clips = dict(layout="clips", plan="cstp", clip_frames=4, levels=(1, 2), pooling="mean", views=1)
    path = tmp_path / "clips.zarr"
    store = extract(config(videos, path, **clips))
    assert open_store(path).settings["final_norm"] == ASY_ONLY
    normed = extract(config(videos, tmp_path / "clips_norm.zarr", backbone="ijepa_vitb_norm", **clips))
    assert "final_norm" not in open_store(normed.path).settings
    # the pooled levels follow the rule: same random weights, the rule alone changes the vectors
    assert not np.allclose(store.array("tokens")[:], normed.array("tokens")[:], atol=1e-2)
    age(path)
    with pytest.raises(StoreError, match=re.escape(f"made with other settings ({OLD_RULE})")):
        extract(config(videos, path, resume=True, **clips))
    with pytest.raises(StoreError, match=re.escape(OLD_RULE)):
        open_stores([path])


# ---------------------------------------------------------------- 4. evaluation caches are keyed by the rule


def old_key(key: dict) -> dict:
    return {k: v for k, v in key.items() if k != "final_norm"}


def test_frame_cache_key_and_old_cache(tmp_path):
    settings = PropagationSettings()
    ijepa = load_backbone("ijepa_vitb", "random", arch=TINY)
    normed = load_backbone("ijepa_vitb_norm", "random", arch=TINY)
    dino = load_backbone("dino_vitb", "random", arch=TINY)
    key = frame_cache_key(ijepa, settings)
    assert key["final_norm"] == ASY_ONLY
    assert "final_norm" not in frame_cache_key(normed, settings) and "final_norm" not in frame_cache_key(dino, settings)
    assert frame_cache_path(key) != frame_cache_path(old_key(key))  # the default cache is another one
    path = tmp_path / "old_frames.zarr"
    FeatureCache(path, old_key(key))  # a cache made before the rule was recorded
    with pytest.raises(CacheError) as info:
        FeatureSource(ijepa, settings, cache=path)
    msg = str(info.value)
    assert "\n" not in msg and "made with other settings (final_norm: expected 'asy-only', found None)" in msg
    # "all" backbones: the key they always had, so their existing caches (and default paths) stay valid
    assert set(frame_cache_key(dino, settings)) == OLD_FRAME_KEY == set(old_key(key))


def test_clip_cache_key_and_old_cache(tmp_path):
    protocol = ClipProtocol(pooling="mean", clips=1, frames=2)
    ijepa = load_backbone("ijepa_vitb", "random", arch=TINY)
    normed = load_backbone("ijepa_vitb_norm", "random", arch=TINY)
    cpu = torch.device("cpu")
    key = clip_cache_key(ijepa, protocol, None, cpu)
    assert key["final_norm"] == ASY_ONLY
    assert set(clip_cache_key(normed, protocol, None, cpu)) == OLD_CLIP_KEY == set(old_key(key))
    assert clip_cache_path(key) != clip_cache_path(old_key(key))
    path = tmp_path / "old_clips.zarr"
    ZarrCache(path, old_key(key), "cosettle_clip_features")
    with pytest.raises(CacheError) as info:
        ClipFeatureSource(ijepa, protocol, cache=path)
    msg = str(info.value)
    assert "\n" not in msg and "made with other settings (final_norm: expected 'asy-only', found None)" in msg
