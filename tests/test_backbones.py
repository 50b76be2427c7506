"""Backbone loading: every official release layout, strict refusal of wrong files, positional embeddings.

The release files, in each original repository's key layout, and the references they must reproduce
are written by tests/fake_releases.py.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fake_releases import (
    CLIP,
    GEOMETRY,
    TINY,
    TOL,
    WRITERS,
    D,
    Release,
    as_grid,
    cat_pos,
    images,
    randomise,
    release,
    set_pos,
    tokens_of,
    write_clip,
    write_dinov2_reg,
    write_mae,
)

from cosettle.pipeline.backbones import BACKBONES, load_backbone
from cosettle.pipeline.checkpoints import CheckpointError


@pytest.fixture(scope="module")
def shared_release(tmp_path_factory) -> Callable[[str], Release]:
    """Releases written once per module, for tests that only read them."""
    cache: dict[str, Release] = {}

    def get(name: str) -> Release:
        if name not in cache:
            cache[name] = release(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


# ---------------------------------------------------------------- 1. official releases


def test_every_registered_backbone_has_a_release_test():
    assert set(BACKBONES) == set(WRITERS)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_official_release_gives_reference_patch_tokens(name, tmp_path):
    rel = release(name, tmp_path)
    bb = load_backbone(name, rel.path, arch=rel.arch)
    patch, grid, prefix = GEOMETRY[name]
    assert (bb.patch_size, bb.grid, bb.num_prefix, bb.dim, bb.image_size) == (patch, grid, prefix, D, patch * grid)
    assert bb.weights == rel.path.name
    assert bb.weights_sha256 == hashlib.sha256(rel.path.read_bytes()).hexdigest()
    x = images((bb.image_size, bb.image_size))
    with torch.no_grad():
        expected = rel.reference(x)
    got = bb.patch_features(x)
    assert got.shape == (2, grid * grid, D)
    torch.testing.assert_close(got, expected, **TOL)


def test_dinov2_block_chunked_checkpoint(tmp_path):
    rel = write_dinov2_reg(tmp_path, chunked=True)
    assert any(k.startswith("backbone.blocks.1.3.") for k in torch.load(rel.path, weights_only=True)["teacher"])
    x = images()
    with torch.no_grad():
        expected = rel.reference(x)
    torch.testing.assert_close(load_backbone("dinov2_vitb", rel.path, arch=rel.arch).patch_features(x), expected, **TOL)


def test_random_weights_are_recorded_as_random():
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    assert (bb.weights, bb.weights_sha256) == ("random", "random")


# ---------------------------------------------------------------- 2. strict loading


def assert_refused(name: str, path: Path, *fragments: str, arch: dict = TINY) -> str:
    with pytest.raises(CheckpointError) as info:
        load_backbone(name, path, arch=arch)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@pytest.mark.parametrize("file_of, given_to, fragments", [
    ("dino_vitb", "mocov3_vitb", ["'state_dict'", "cls_token"]),
    ("mocov3_vitb", "ibot_vitb", ["missing", "unexpected", "module.base_encoder."]),
    ("blip_vitb", "mae_vitb", ["missing", "blocks.0.attn.qkv.weight", "unexpected", "image_queue"]),
    ("dinov2_vitb14", "dino_vitb", ["unexpected", "mask_token", "wrong shapes", "patch_embed.proj.weight"]),
    ("mocov3_vitb", "dino_vitb", ["not a mapping of names to tensors"]),
    ("mae_vitb", "blip_vitb", ["visual_encoder."]),
    ("dinov2_vitb", "ijepa_vitb", ["'encoder'"]),
    ("dino_vitb", "clip_vitb", ["TorchScript"]),
    ("clip_vitb", "dino_vitb", ["weights-only"]),
    ("dino_vitb", "dinov2_vitb14", ["patch size (16, 16)"]),
])
def test_wrong_release_is_refused(file_of, given_to, fragments, tmp_path):
    assert_refused(given_to, release(file_of, tmp_path).path, *fragments)


# the entry holding the weights in each release that is not a raw state dict
CONTAINER = {"mae_vitb": "model", "ijepa_vitb": "encoder", "ijepa_vitb_norm": "encoder", "mocov3_vitb": "state_dict",
             "blip_vitb": "model", "ibot_vitb": "state_dict", "dinov2_vitb": "teacher"}


def edited_release(name: str, tmp: Path, edit: Callable[[dict], object]) -> Path:
    """A release file whose weight mapping went through ``edit`` (in place)."""
    path = release(name, tmp).path
    obj = torch.load(path, weights_only=True)
    edit(obj[CONTAINER[name]] if name in CONTAINER else obj)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name, key, shown", [
    ("dino_vitb", "blocks.1.mlp.fc2.bias", "blocks.1.mlp.fc2.bias"),
    ("mocov3_vitb", "module.momentum_encoder.norm.weight", "norm.weight"),
    ("blip_vitb", "visual_encoder.blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.bias"),
    ("dinov2_vitb", "backbone.blocks.0.ls2.gamma", "blocks.0.ls2.gamma"),
    ("dinov2_vitb14", "blocks.1.ls1.gamma", "blocks.1.ls1.gamma"),
])
def test_missing_key_is_named(name, key, shown, tmp_path):
    assert_refused(name, edited_release(name, tmp_path, lambda w: w.pop(key)), f"missing 1 keys: {shown}")


def test_missing_key_in_torchscript_release_is_named(tmp_path):
    model = randomise(CLIP(), seed=10)
    del model.visual.ln_post.bias
    model.visual.ln_post.register_parameter("bias", None)
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    assert_refused("clip_vitb", path, "missing 1 keys: norm.bias")


@pytest.mark.parametrize("name", ["dino_vitb", "ibot_vitb", "dinov2_vitb"])
def test_extra_key_is_named(name, tmp_path):
    key = ("backbone." if name == "dinov2_vitb" else "") + "blocks.0.attn.q_norm.weight"
    path = edited_release(name, tmp_path, lambda w: w.update({key: torch.ones(32)}))
    assert_refused(name, path, "unexpected 1 keys: blocks.0.attn.q_norm.weight")


@pytest.mark.parametrize("name, key, shown", [
    ("dino_vitb", "norm.weight", "norm.weight (65,) vs (64,)"),
    ("ijepa_vitb", "module.blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc1.bias (65,) vs (256,)"),
])
def test_wrong_shape_is_named(name, key, shown, tmp_path):
    path = edited_release(name, tmp_path, lambda w: w.update({key: torch.zeros(65)}))
    assert_refused(name, path, "wrong shapes", shown)


def clip_b32(tmp: Path) -> Path:
    """OpenAI ViT-B-32.pt: ViT-B/16's widths and depth with 32 px patches."""
    return write_clip(tmp, patch=32, grid=7).path


def dinov2_reg_patch14(tmp: Path) -> Path:
    """A DINOv2 ViT-B/14 training checkpoint in place of the authors' ViT-B/16 run."""
    kernel14 = {"backbone.patch_embed.proj.weight": torch.zeros(D, 3, 14, 14)}
    return edited_release("dinov2_vitb", tmp, lambda w: w.update(kernel14))


def dinov2_vitb14_reg4(tmp: Path) -> Path:
    """Official dinov2_vitb14_reg4_pretrain.pth in place of dinov2_vitb14_pretrain.pth."""
    return edited_release("dinov2_vitb14", tmp, lambda w: w.update({"register_tokens": torch.zeros(1, 4, D)}))


def blip_non_square_positions(tmp: Path) -> Path:
    key = "visual_encoder.pos_embed"
    return edited_release("blip_vitb", tmp, lambda w: w.update({key: w[key][:, :-3]}))


@pytest.mark.parametrize("name, make, fragments", [
    ("clip_vitb", clip_b32, ["visual.conv1.weight has patch size (32, 32)"]),
    ("dinov2_vitb", dinov2_reg_patch14, ["patch_embed.proj.weight has patch size (14, 14)"]),
    ("dinov2_vitb14", dinov2_vitb14_reg4, ["cannot convert"]),
    ("blip_vitb", blip_non_square_positions, ["cannot convert"]),
])
def test_files_timm_would_resample_or_choke_on_are_refused(name, make, fragments, tmp_path):
    """timm's checkpoint filter resamples foreign patch kernels silently and fails with bare shape
    errors on foreign position grids; both must surface as a CheckpointError naming the file."""
    assert_refused(name, make(tmp_path), *fragments)


@pytest.mark.parametrize("name, fragment", [("dino_vitb", "weights-only"), ("clip_vitb", "TorchScript")])
def test_garbage_file_is_refused(name, fragment, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(os.urandom(4096))
    assert_refused(name, path, fragment)


def test_missing_file_is_refused(tmp_path):
    assert_refused("dino_vitb", tmp_path / "nowhere.pth", "no such weights file")


class MkdirOnUnpickle:
    """Unpickling this object runs os.mkdir: what a malicious checkpoint would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


@pytest.mark.parametrize("payload", ["namespace", "code"])
def test_pickled_objects_are_refused_unexecuted(payload, tmp_path):
    rel = write_mae(tmp_path)
    obj = torch.load(rel.path, weights_only=True)
    marker = tmp_path / "executed"
    obj["args"] = argparse.Namespace(lr=1e-3) if payload == "namespace" else MkdirOnUnpickle(marker)
    torch.save(obj, rel.path)
    assert_refused("mae_vitb", rel.path, "weights-only")
    assert not marker.exists()


# ---------------------------------------------------------------- 3. asymmetric positional window

# (backbone, positions before the patch positions in pos_embed); A_asy is after the final norm for
# every token rule, ijepa_vitb's "asy-only" included
ASY_CASES = [("dino_vitb", 1), ("dinov2_vitb", 0), ("ijepa_vitb", 0), ("ijepa_vitb_norm", 0)]


def with_patch_pos(ref: nn.Module, pos_prefix: int, grid: torch.Tensor) -> nn.Module:
    """A copy of ``ref`` whose patch positional embedding is ``grid`` [1, D, h, w]."""
    out = copy.deepcopy(ref)
    if tuple(grid.shape[-2:]) != tuple(out.patch_embed.grid_size):
        out.set_input_size(img_size=(grid.shape[-2] * out.patch_embed.patch_size[0],
                                     grid.shape[-1] * out.patch_embed.patch_size[1]))
    set_pos(out, cat_pos(ref.pos_embed[:, :pos_prefix], grid))
    return out


def asy_expected(rel: Release, pos_prefix: int, prefix: int, x: torch.Tensor, offsets, ratio: float) -> torch.Tensor:
    """Per image: the 14 x 14 window at (oy, ox) of the patch grid resized bicubically to S x S."""
    s = int((1 + ratio) * 14)
    big = F.interpolate(as_grid(rel.ref.pos_embed[:, pos_prefix:]), size=(s, s), mode="bicubic", align_corners=False)
    outs = []
    for img, (oy, ox) in zip(x, offsets):
        model = with_patch_pos(rel.ref, pos_prefix, big[..., oy:oy + 14, ox:ox + 14])
        with torch.no_grad():
            outs.append(model.forward_features(img[None])[:, prefix:])
    return torch.cat(outs)


@pytest.mark.parametrize("name, pos_prefix", ASY_CASES)
@pytest.mark.parametrize("ratio, offset", [(10.0, (0, 0)), (10.0, (140, 140)), (10.0, (0, 140)), (10.0, (37, 91)),
                                           (0.5, (7, 7)), (0.5, (3, 5))])
def test_asymmetric_window_single_offset(name, pos_prefix, ratio, offset, shared_release):
    rel = shared_release(name)
    bb = load_backbone(name, rel.path, arch=rel.arch)
    x = images()
    expected = asy_expected(rel, pos_prefix, GEOMETRY[name][2], x, [offset] * 2, ratio)
    torch.testing.assert_close(bb.patch_features(x, asy_offset=offset, asy_ratio=ratio), expected, **TOL)


@pytest.mark.parametrize("name, pos_prefix", ASY_CASES)
def test_asymmetric_window_per_sample_offsets(name, pos_prefix, shared_release):
    rel = shared_release(name)
    bb = load_backbone(name, rel.path, arch=rel.arch)
    x = images(batch=3)
    offsets = torch.tensor([[0, 140], [140, 0], [12, 77]])
    got = bb.patch_features(x, asy_offset=offsets)
    one_by_one = torch.cat([bb.patch_features(x[i:i + 1], asy_offset=tuple(o.tolist())) for i, o in enumerate(offsets)])
    torch.testing.assert_close(got, one_by_one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, asy_expected(rel, pos_prefix, GEOMETRY[name][2], x, offsets.tolist(), 10.0), **TOL)


@pytest.mark.parametrize("offset, ratio", [((-1, 0), 10.0), ((0, 141), 10.0), ((141, 3), 10.0), ((8, 0), 0.5)])
def test_asymmetric_offset_out_of_range_raises(offset, ratio):
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    with pytest.raises(ValueError, match="offsets"):
        bb.patch_features(images(), asy_offset=offset, asy_ratio=ratio)
    with pytest.raises(ValueError, match="offsets"):
        bb.patch_features(images(), asy_offset=torch.tensor([[0, 0], list(offset)]), asy_ratio=ratio)


def test_asymmetric_window_needs_training_size():
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    with pytest.raises(ValueError, match="224"):
        bb.patch_features(images((448, 448)), asy_offset=(0, 0))


# ---------------------------------------------------------------- 4. other input sizes


@pytest.mark.parametrize("name, pos_prefix", ASY_CASES + [("dinov2_vitb14", 1)])
@pytest.mark.parametrize("scale", [(2, 2), (1, 2), (0.5, 1)])
def test_other_sizes_interpolate_positions_bicubically(name, pos_prefix, scale, shared_release):
    """Plain bicubic resize of the native grid (align_corners=False, no antialias) to h x w; the final
    norm as the backbone's token rule says (none for ijepa_vitb)."""
    rel = shared_release(name)
    bb = load_backbone(name, rel.path, arch=rel.arch)
    patch, grid, prefix = GEOMETRY[name]
    h, w = int(grid * scale[0]), int(grid * scale[1])
    pos = F.interpolate(as_grid(rel.ref.pos_embed[:, pos_prefix:]), size=(h, w), mode="bicubic", align_corners=False)
    x = images((h * patch, w * patch))
    with torch.no_grad():
        expected = tokens_of(with_patch_pos(rel.ref, pos_prefix, pos), prefix, rel.final_norm)(x)
    got = bb.patch_features(x)
    assert got.shape == (2, h * w, D)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("size", [(225, 224), (224, 232), (100, 100)])
def test_size_not_multiple_of_patch_raises(size):
    bb = load_backbone("dino_vitb", "random", arch=TINY)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb.patch_features(images(size))
