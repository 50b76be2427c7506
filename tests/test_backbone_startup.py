"""Backbone start-up: a model whose weights come from a file is built on the meta device and takes
the file's tensors, so nothing is randomly initialised only to be overwritten; the result is the
same backbone, bit for bit, as building it normally and loading the file strictly.

The release files are written by tests/fake_releases.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from fake_releases import WRITERS, images
from torch.utils._python_dispatch import TorchDispatchMode

import cosettle.pipeline.backbones as backbones
from cosettle.core.provenance import sha256_file
from cosettle.pipeline.backbones import Backbone, create_model, get_spec, load_backbone
from cosettle.pipeline.checkpoints import load_strict, read_state_dict

# in-place ops that write random or constant values into a tensor: what an initialisation does
INIT_OPS = {"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "erfinv_", "fill_", "zero_"}


class InitWrites(TorchDispatchMode):
    """Counts initialisation ops on tensors that have storage (not on the meta device)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in INIT_OPS and isinstance(args[0], torch.Tensor) and not args[0].is_meta:
            self.count += 1
        return func(*args, **(kwargs or {}))


def old_load(name: str, path: Path, arch: dict) -> Backbone:
    """The loading path before meta construction: build (seeded random init), then load strictly."""
    spec = get_spec(name)
    model = create_model(name, arch)
    load_strict(model, read_state_dict(path, spec.checkpoint, model), path, name)
    return Backbone(spec, model, path.name, sha256_file(path))


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = WRITERS[name](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_file_weights_equal_the_old_path_bit_for_bit(name, releases):
    rel = releases(name)
    new = load_backbone(name, rel.path, arch=rel.arch)
    old = old_load(name, rel.path, rel.arch)
    assert (new.weights, new.weights_sha256) == (old.weights, old.weights_sha256)
    new_sd, old_sd = new.model.state_dict(), old.model.state_dict()
    assert list(new_sd) == list(old_sd)
    for k, v in new_sd.items():
        assert v.device.type == "cpu" and not v.is_meta, k
        assert v.dtype == old_sd[k].dtype and v.is_contiguous(), k
        assert torch.equal(v, old_sd[k]), k
    for _, t in list(new.model.named_parameters()) + list(new.model.named_buffers()):
        assert not t.is_meta and not t.requires_grad
    assert not new.model.training
    x = images()
    (nc, np_), (oc, op) = new.tokens(x), old.tokens(x)
    assert torch.equal(np_, op)
    assert (nc is None and oc is None) or torch.equal(nc, oc)
    assert torch.equal(new.patch_features(x, asy_offset=(1, 2), asy_ratio=0.5),
                       old.patch_features(x, asy_offset=(1, 2), asy_ratio=0.5))
    assert torch.equal(new.level_vectors(x, (1, new.depth), "mean"), old.level_vectors(x, (1, new.depth), "mean"))


@pytest.mark.parametrize("name", ["mae_vitb", "clip_vitb", "dinov2_vitb14"])
def test_no_initialisation_runs_on_the_file_path(name, releases):
    rel = releases(name)
    with InitWrites() as file_path:
        load_backbone(name, rel.path, arch=rel.arch)
    assert file_path.count == 0
    with InitWrites() as random_path:  # the detector sees the seeded random initialisation
        load_backbone(name, "random", arch=rel.arch)
    assert random_path.count > 0


def test_file_path_builds_on_the_meta_device(releases, monkeypatch):
    rel = releases("mae_vitb")
    seen = []
    real = backbones.create_model

    def spy(name, arch=None, meta=False):
        model = real(name, arch, meta=meta)
        seen.append((meta, {p.device.type for p in model.parameters()}))
        return model

    monkeypatch.setattr(backbones, "create_model", spy)
    load_backbone("mae_vitb", rel.path, arch=rel.arch)
    assert seen == [(True, {"meta"})]
    seen.clear()
    load_backbone("mae_vitb", "random", arch=rel.arch)
    assert seen == [(False, {"cpu"})]


def test_random_weights_unchanged(releases):
    """``--weights random`` is still the seed-0 initialisation of a normally built model."""
    arch = releases("mae_vitb").arch
    bb = load_backbone("mae_vitb", "random", arch=arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        import timm

        spec = get_spec("mae_vitb")
        ref = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=spec.image_size,
                                dynamic_img_size=True, **arch)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, bb.model.state_dict()[k]), k
    assert (bb.weights, bb.weights_sha256) == ("random", "random")


def test_non_persistent_buffer_falls_back_to_a_real_build(releases, monkeypatch):
    """A tensor no state dict can set (a non-persistent buffer) would stay without values on the
    meta device: such a model is built normally and then loaded, as before."""
    rel = releases("mae_vitb")
    real = backbones.create_model

    def with_buffer(name, arch=None, meta=False):
        model = real(name, arch, meta=meta)
        model.register_buffer("table", torch.arange(5.0), persistent=False)
        return model

    monkeypatch.setattr(backbones, "create_model", with_buffer)
    bb = load_backbone("mae_vitb", rel.path, arch=rel.arch)
    assert torch.equal(bb.model.table, torch.arange(5.0))
    assert not any(t.is_meta for t in bb.model.state_dict().values())


def test_meta_load_casts_and_lays_out_as_a_copy_would():
    """The file's tensors in another dtype or not contiguous become what copying them into the
    allocated parameters gives: the model's dtype, contiguous, equal values."""
    torch.manual_seed(1)
    w = torch.randn(6, 4)
    sd = {"weight": w.t().contiguous().t().half(), "bias": torch.randn(6, dtype=torch.float64)}
    assert not sd["weight"].is_contiguous()
    real = nn.Linear(4, 6)
    load_strict(real, dict(sd), Path("x.pth"), "tiny")
    with torch.device("meta"):
        meta = nn.Linear(4, 6)
    load_strict(meta, dict(sd), Path("x.pth"), "tiny")
    for k, v in meta.state_dict().items():
        assert v.dtype == torch.float32 and v.is_contiguous() and not v.is_meta
        assert torch.equal(v, real.state_dict()[k])
