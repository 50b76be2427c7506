"""Zero-shot text side: the OpenAI CLIP text tower read from a TorchScript release, offline.

The release is ``tests/fake_clip.py``'s: an OpenAI-layout module (clip/model.py names, tiny width,
real 49408-token vocabulary and 77-token context so open_clip's tokenizer fits) with random weights,
scripted and saved. Its own exported ``encode_text`` / ``encode_image`` are OpenAI's forward pass,
the reference that open_clip's rebuilt model must reproduce.
"""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fake_clip import (
    BACKBONE_ARCH,
    CTX,
    EMBED,
    GRID,
    PATCH,
    VOCAB,
    WIDTH,
    ImageOnlyCLIP,
    fake_clip,
    randomise,
    save_script,
    to_fp16_like_openai,
    write_release,
)
from open_clip.model import CLIP as OpenClipCLIP
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from cosettle.eval.video.text import zeroshot_scores
from cosettle.pipeline.backbones import BACKBONES, load_backbone
from cosettle.pipeline.text_tower import (
    DEFAULT_TEMPLATES,
    ClipText,
    TextTowerError,
    image_embedding,
    load_clip_text,
    readable_class_name,
    require_same_release,
    require_text_tower,
)

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("clip") / "ViT-B-16.pt", seed=3)


@pytest.fixture(scope="module")
def clip_text(release) -> ClipText:
    return load_clip_text(release)


def open_clip_reference(release: Path) -> nn.Module:
    """open_clip's CLIP built from an explicit config (not from the loader's inference), loaded strictly."""
    model = OpenClipCLIP(EMBED, CLIPVisionCfg(layers=1, width=WIDTH, patch_size=PATCH, image_size=PATCH * GRID),
                         CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=WIDTH, heads=1, layers=2),
                         quick_gelu=True)
    sd = torch.jit.load(str(release)).state_dict()
    meta = ("input_resolution", "context_length", "vocab_size")
    model.load_state_dict({k: v for k, v in sd.items() if k not in meta})
    return model.float().eval()


TEXTS = ["a video of a person apply eye makeup.", "a person is brush hair.", "a video of juggling balls."]


# ---------------------------------------------------------------- the release layout and loading


def test_fake_release_has_openai_layout(release):
    keys = set(torch.jit.load(str(release)).state_dict())
    top = {k for k in keys if not k.startswith(("visual.", "transformer."))}
    assert top == {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                   "text_projection", "logit_scale", "input_resolution", "context_length", "vocab_size"}
    assert "transformer.resblocks.1.attn.in_proj_weight" in keys and "visual.proj" in keys


def test_loading_and_encoding_never_touch_the_network(release, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", refuse)
    text = load_clip_text(release)
    assert text.encode(["a person is running."]).shape == (1, EMBED)
    assert text.weights_sha256 == hashlib.sha256(release.read_bytes()).hexdigest()


# ---------------------------------------------------------------- text embeddings


def test_encode_matches_openai_forward_and_open_clip(clip_text, release):
    tokens = open_clip.tokenize(TEXTS)
    assert tokens.shape == (len(TEXTS), CTX) and int(tokens.max()) == VOCAB - 1  # EOT is the highest id
    got = clip_text.encode(TEXTS)
    assert got.shape == (len(TEXTS), EMBED) and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), **TOL)
    with torch.no_grad():
        openai = F.normalize(torch.jit.load(str(release)).encode_text(tokens), dim=-1)
        oc = open_clip_reference(release).encode_text(tokens, normalize=True)
    assert torch.allclose(got, openai, **TOL)
    assert torch.allclose(got, oc, **TOL)


def test_fp16_release_loads_in_float32(tmp_path):
    model = to_fp16_like_openai(fake_clip(seed=4))
    assert model.text_projection.dtype == torch.float16 and model.ln_final.weight.dtype == torch.float32
    path = save_script(model, tmp_path / "ViT-B-16.pt")
    text = load_clip_text(path)
    assert all(p.dtype == torch.float32 for p in text.model.parameters())
    assert torch.equal(text.model.text_projection, model.text_projection.float())
    with torch.no_grad():
        ref = open_clip_reference(path).encode_text(open_clip.tokenize(TEXTS), normalize=True)
    assert torch.allclose(text.encode(TEXTS), ref, **TOL)


def test_identical_strings_agree_and_different_strings_differ(clip_text):
    emb = clip_text.encode(["a person is diving.", "a person is diving.", "a person is fencing."])
    assert torch.equal(emb[0], emb[1])
    assert float(emb[0] @ emb[2]) < 0.999
    assert torch.allclose(clip_text.encode(["a person is diving."])[0], emb[0], **TOL)  # batch-independent


def test_class_embedding_is_normalised_template_mean(clip_text):
    classes = ["ApplyEyeMakeup", "brush_hair"]
    got = clip_text.class_embeddings(classes)
    assert got.shape == (2, EMBED)
    for row, name in zip(got, ["apply eye makeup", "brush hair"]):
        each = clip_text.encode([t.format(name) for t in DEFAULT_TEMPLATES])
        assert torch.allclose(row, F.normalize(each.mean(0), dim=-1), **TOL)
    single = clip_text.class_embeddings(["brush hair"], templates=["a person is {}."], readable=False)
    assert torch.allclose(single[0], clip_text.encode(["a person is brush hair."])[0], **TOL)


def test_templates_and_readable_names():
    assert DEFAULT_TEMPLATES[0] == "a video of a person {}."
    assert len(DEFAULT_TEMPLATES) >= 5 and all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    assert readable_class_name("ApplyEyeMakeup") == "apply eye makeup"
    assert readable_class_name("brush_hair") == "brush hair"
    assert readable_class_name("YoYo") == "yo yo"
    assert readable_class_name("apply eye makeup") == "apply eye makeup"  # idempotent


# ---------------------------------------------------------------- zero-shot


def test_zeroshot_picks_the_class_that_built_the_video(clip_text):
    classes = ["Basketball", "Biking", "Diving", "Fencing", "PlayingGuitar"]
    cls = clip_text.class_embeddings(classes)
    g = torch.Generator().manual_seed(0)
    picked = [3, 0, 4]
    # a video whose frames embedded onto the class's text embedding, off by a little noise, at any scale
    videos = 2.5 * (cls[picked] + 1e-3 * F.normalize(torch.randn(3, EMBED, generator=g), dim=-1))
    scores = zeroshot_scores(videos, cls)
    assert scores.shape == (3, len(classes))
    assert scores.argmax(dim=1).tolist() == picked
    assert torch.allclose(zeroshot_scores(cls, cls).diagonal(), torch.ones(len(classes)), **TOL)
    assert float(scores.abs().max()) <= 1 + 1e-6


def test_image_embedding_from_backbone_cls_matches_openai_encode_image(clip_text, release):
    """The backbone's final norm is ln_post; its CLS token after that norm, @ proj, is OpenAI's image embedding."""
    backbone = load_backbone("clip_vitb", release, arch=BACKBONE_ARCH)
    require_same_release(backbone.weights_sha256, clip_text)
    images = torch.randn(2, 3, PATCH * GRID, PATCH * GRID, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = backbone.model.forward_features(images)  # final norm applied, CLS at index 0
        want = F.normalize(torch.jit.load(str(release)).encode_image(images), dim=-1)
        m = backbone.model
        raw = m.blocks(m.norm_pre(m._pos_embed(m.patch_embed(images))))  # last block, before the final norm
    assert torch.allclose(tokens[:, 1:], backbone.patch_features(images), **TOL)  # same forward as the pipeline
    assert torch.allclose(image_embedding(tokens[:, 0], clip_text), want, atol=1e-4)
    assert torch.allclose(image_embedding(raw[:, 0], clip_text, after_final_norm=False), want, atol=1e-4)
    with pytest.raises(ValueError, match="width"):
        image_embedding(torch.zeros(1, WIDTH + 1), clip_text)


def test_text_tower_of_another_release_is_refused(clip_text):
    with pytest.raises(TextTowerError, match="differs"):
        require_same_release("0" * 64, clip_text)


# ---------------------------------------------------------------- refusals


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_non_torchscript_file_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(TextTowerError) as e:
        load_clip_text(path)
    assert_one_line(e, str(path), "not a CLIP TorchScript archive")
    with pytest.raises(TextTowerError) as e:
        load_clip_text(tmp_path / "absent.pt")
    assert_one_line(e, str(tmp_path / "absent.pt"), "no such")


def test_other_torchscript_archive_is_refused(tmp_path):
    path = save_script(nn.Linear(3, 4), tmp_path / "linear.pt")
    with pytest.raises(TextTowerError) as e:
        load_clip_text(path)
    assert_one_line(e, str(path), "no CLIP text tower", "token_embedding.weight")


def test_image_only_archive_is_refused(tmp_path):
    path = save_script(randomise(ImageOnlyCLIP(), seed=5), tmp_path / "ViT-B-16.pt")
    with pytest.raises(TextTowerError) as e:
        load_clip_text(path)
    assert_one_line(e, str(path), "no CLIP text tower", "text_projection")


NO_TEXT = ["mae_vitb", "ijepa_vitb", "mocov3_vitb", "dino_vitb", "ibot_vitb", "dinov2_vitb", "dinov2_vitb14"]


@pytest.mark.parametrize("name", NO_TEXT)
def test_backbones_without_text_tower(name):
    with pytest.raises(TextTowerError) as e:
        require_text_tower(name)
    assert_one_line(e)
    assert str(e.value) == f"{name} has no text encoder; zero-shot needs a CLIP backbone"


def test_blip_is_not_supported_yet_and_clip_passes():
    with pytest.raises(TextTowerError) as e:
        require_text_tower("blip_vitb")
    assert_one_line(e, "blip_vitb", "not supported", "BERT", "tokenizer")
    require_text_tower("clip_vitb")
    assert set(NO_TEXT) | {"blip_vitb", "clip_vitb"} <= set(BACKBONES)
    with pytest.raises(KeyError):
        require_text_tower("nope")
