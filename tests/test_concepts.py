"""The concepts objective's language side: vocabulary files, CLIP text embeddings cached in one
safetensors file with provenance, and the refusals (other vocabulary/weights, towers that do not
match, backbones without a supported text tower). Offline, on ``fake_clip``'s tiny release."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from fake_clip import (
    BACKBONE_ARCH,
    EMBED,
    WIDTH,
    ImageOnlyCLIP,
    randomise,
    save_script,
    write_mismatched_release,
    write_release,
)
from safetensors import safe_open
from safetensors.torch import save_file

import cosettle.pipeline.concepts as concepts_mod
from cosettle.app.cli import main as cli
from cosettle.eval.video.datasets import kinetics400_classes as eval_kinetics400_classes
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.concepts import (
    DEFAULT_ATTRIBUTE_TEMPLATES,
    METADATA_KEY,
    ConceptError,
    build_concepts,
    kinetics400_classes,
    load_concepts,
    read_vocabulary,
    require_concepts_for,
)
from cosettle.pipeline.text_tower import (
    DEFAULT_TEMPLATES,
    ClipText,
    TextTowerError,
    load_clip_text,
    require_same_release,
)

TOL = dict(atol=1e-5, rtol=1e-5)
CLASSES = ["playing guitar", "juggling balls", "riding a bike", "ApplyEyeMakeup", "push up"]
ATTRIBUTES = """# a comment, then a blank line

playing guitar: strumming strings; holding a guitar
juggling balls:  tossing balls into the air ;  catching balls
riding a bike: pedalling; holding a guitar
"""
PHRASES = ["strumming strings", "holding a guitar", "tossing balls into the air", "catching balls", "pedalling"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("clip") / "ViT-B-16.pt", seed=3)


@pytest.fixture(scope="module")
def other_release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("clip2") / "ViT-B-16.pt", seed=8)


@pytest.fixture
def vocab(tmp_path):
    classes, attributes = tmp_path / "classes.txt", tmp_path / "attributes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    attributes.write_text(ATTRIBUTES)
    return classes, attributes


def build(release, out, vocab, **kw):
    return build_concepts(release, out, vocab[0], vocab[1], progress=False, **kw)


def one_line(e: pytest.ExceptionInfo, *fragments) -> str:
    message = str(e.value)
    assert "\n" not in message, message
    for f in fragments:
        assert str(f) in message, message
    return message


def reference(archive, texts_per_item: list[list[str]]) -> torch.Tensor:
    """OpenAI's own encode_text on open_clip-tokenised prompts: normalise, average, renormalise."""
    with torch.no_grad():
        rows = [F.normalize(F.normalize(archive.encode_text(open_clip.tokenize(t)).float(), dim=-1).mean(0), dim=-1)
                for t in texts_per_item]
    return torch.stack(rows)


# ---------------------------------------------------------------- embeddings and file format


def test_embeddings_match_the_archives_own_encode_text(release, vocab, tmp_path):
    out = tmp_path / "concepts.safetensors"
    c = build(release, out, vocab)
    archive = torch.jit.load(str(release))
    names = ["playing guitar", "juggling balls", "riding a bike", "apply eye makeup", "push up"]  # readable names
    want = reference(archive, [[t.format(n) for t in DEFAULT_TEMPLATES] for n in names])
    assert c.classes.shape == (5, EMBED) and c.classes.dtype == torch.float32
    assert torch.allclose(c.classes, want, **TOL)
    want = reference(archive, [[t.format(p) for t in DEFAULT_ATTRIBUTE_TEMPLATES] for p in PHRASES])
    assert torch.allclose(c.attributes, want, **TOL)
    assert torch.allclose(c.attributes.norm(dim=-1), torch.ones(len(PHRASES)), **TOL)
    assert torch.equal(c.visual_proj, archive.visual.proj.float()) and c.visual_proj.shape == (WIDTH, EMBED)

    back = load_concepts(out)
    for name in ("classes", "attributes", "membership", "visual_proj"):
        assert torch.equal(getattr(back, name), getattr(c, name))
    meta = back.meta
    assert meta == c.meta and back.path == out
    assert meta["format"] == 1 and meta["backbone"] == "clip_vitb" and meta["weights"] == "ViT-B-16.pt"
    assert meta["weights_sha256"] == load_clip_text(release).weights_sha256
    assert meta["class_names"] == CLASSES and meta["attributes"] == PHRASES
    assert meta["class_templates"] == list(DEFAULT_TEMPLATES)
    assert meta["attribute_templates"] == list(DEFAULT_ATTRIBUTE_TEMPLATES)
    assert len(meta["vocabulary_sha256"]) == 64 and meta["created"] and "torch" in meta["environment"]
    with safe_open(str(out), "pt") as f:
        raw = json.loads(f.metadata()[METADATA_KEY])
    assert raw == meta
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: nothing left aside


def test_membership_from_attributes_file(release, vocab, tmp_path):
    c = build(release, tmp_path / "c.safetensors", vocab)
    want = torch.tensor([[1, 1, 0, 0, 0],   # playing guitar
                         [0, 0, 1, 1, 0],   # juggling balls
                         [0, 1, 0, 0, 1],   # riding a bike: 'holding a guitar' is shared, one attribute
                         [0, 0, 0, 0, 0],   # ApplyEyeMakeup: no line, no attributes
                         [0, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(c.membership, want)
    assert c.meta["membership"] == {"playing guitar": [0, 1], "juggling balls": [2, 3], "riding a bike": [4, 1],
                                    "ApplyEyeMakeup": [], "push up": []}
    none = build_concepts(release, tmp_path / "none.safetensors", vocab[0], None, progress=False)
    assert none.attributes.shape == (0, EMBED) and none.membership.shape == (5, 0)
    assert load_concepts(tmp_path / "none.safetensors").attributes.shape == (0, EMBED)


def test_default_vocabulary_is_kinetics_and_example_file_parses():
    names, by_class = read_vocabulary(None, None)
    assert names == kinetics400_classes() == eval_kinetics400_classes() and len(names) == 400
    assert all(v == [] for v in by_class.values())
    example = concepts_mod.KINETICS400_FILE.parent / "concept_attributes_example.txt"
    names, by_class = read_vocabulary(None, example)
    with_attrs = {c: a for c, a in by_class.items() if a}
    assert 8 <= len(with_attrs) <= 12 and all(len(a) >= 2 for a in with_attrs.values())
    assert with_attrs["playing guitar"][0] == "strumming strings"


# ---------------------------------------------------------------- the cache: reuse, refuse, rebuild


def test_same_vocabulary_reuses_the_file_without_encoding(release, vocab, tmp_path, monkeypatch):
    out = tmp_path / "c.safetensors"
    first = build(release, out, vocab)
    data = out.read_bytes()

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(concepts_mod, "load_clip_text", boom)
    monkeypatch.setattr(ClipText, "encode", boom)
    again = build(release, out, vocab)
    assert out.read_bytes() == data and torch.equal(again.classes, first.classes) and again.meta == first.meta


@pytest.mark.parametrize("change, fragment", [
    ("class_templates", "vocabulary (class_templates differ)"),
    ("attribute_templates", "vocabulary (attribute_templates differ)"),
    ("attributes", "vocabulary (attributes differ)"),
    ("classes", "vocabulary (class_names, membership differ)"),
    ("weights", "weights (ViT-B-16.pt sha256"),
])
def test_changed_vocabulary_or_weights_is_refused_then_overwritten(release, other_release, vocab, tmp_path,
                                                                   change, fragment):
    out = tmp_path / "c.safetensors"
    build(release, out, vocab)
    data = out.read_bytes()
    kw, weights = {}, release
    if change == "class_templates":
        kw["class_templates"] = ("a clip of {}.",)
    elif change == "attribute_templates":
        kw["attribute_templates"] = ("someone {}.",)
    elif change == "attributes":
        vocab[1].write_text(ATTRIBUTES.replace("pedalling", "pedalling a bike"))
    elif change == "classes":
        vocab[0].write_text("\n".join(CLASSES + ["cooking egg"]) + "\n")
    else:
        weights = other_release
    with pytest.raises(ConceptError) as e:
        build(weights, out, vocab, **kw)
    one_line(e, out, "made for another", fragment, "pass --overwrite or another --out")
    assert out.read_bytes() == data  # never mixed
    rebuilt = build(weights, out, vocab, overwrite=True, **kw)
    assert out.read_bytes() != data and load_concepts(out).meta == rebuilt.meta
    assert build(weights, out, vocab, **kw).meta == rebuilt.meta  # and now reused


def test_existing_foreign_file_at_out_is_refused(release, vocab, tmp_path):
    out = tmp_path / "c.safetensors"
    save_file({"w": torch.zeros(3)}, str(out))
    with pytest.raises(ConceptError) as e:
        build(release, out, vocab)
    one_line(e, out, "not a cosettle concepts file", "--overwrite")
    assert build(release, out, vocab, overwrite=True).classes.shape == (5, EMBED)


# ---------------------------------------------------------------- malformed vocabulary files


@pytest.mark.parametrize("text, fragment", [
    ("playing guitar: strumming\n\n# c\ndancing tango: stepping\n", ":4: 'dancing tango' is not in the class list"),
    ("playing guitar strumming strings\n", ":1: expected 'class name: phrase; phrase; ...'"),
    ("playing guitar: a\njuggling balls: b\nplaying guitar: c\n",
     ":3: class 'playing guitar' already has attributes at line 1"),
    ("playing guitar: strumming;; holding\n", ":1: empty attribute phrase"),
    ("push up: lowering; lowering\n", ":1: a phrase is listed twice"),
])
def test_malformed_attributes_file_names_file_and_line(release, vocab, tmp_path, text, fragment):
    vocab[1].write_text(text)
    with pytest.raises(ConceptError) as e:
        build(release, tmp_path / "c.safetensors", vocab)
    assert one_line(e, fragment).startswith(f"{vocab[1]}:")
    assert not (tmp_path / "c.safetensors").exists()


def test_malformed_class_list_and_templates(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("a\nb\n\na\n")
    with pytest.raises(ConceptError) as e:
        read_vocabulary(path, None)
    one_line(e, f"{path}:4: class 'a' already listed at line 1")
    path.write_text("# nothing\n")
    with pytest.raises(ConceptError, match="no class names"):
        read_vocabulary(path, None)
    with pytest.raises(ConceptError, match="exactly one"):
        concepts_mod.vocabulary(["a"], {}, class_templates=("no placeholder",))


# ---------------------------------------------------------------- backbones and towers


NO_TEXT = ["mae_vitb", "ijepa_vitb", "mocov3_vitb", "dino_vitb", "ibot_vitb", "dinov2_vitb", "dinov2_vitb14"]


@pytest.mark.parametrize("name", NO_TEXT + ["blip_vitb"])
def test_backbones_without_supported_text_tower_are_refused(release, vocab, tmp_path, name):
    with pytest.raises(TextTowerError) as e:
        build(release, tmp_path / "c.safetensors", vocab, backbone=name)
    message = one_line(e, name, "the concepts objective")
    if name == "blip_vitb":
        assert "not supported" in message and "BERT" in message and "tokenizer" in message
    else:
        assert message == f"{name} has no text encoder; the concepts objective needs a CLIP backbone"
    c = build(release, tmp_path / "ok.safetensors", vocab)
    with pytest.raises(TextTowerError) as e:
        require_concepts_for(c, name, c.meta["weights_sha256"])
    one_line(e, name)


def test_release_without_text_tower_is_refused(vocab, tmp_path):
    path = save_script(randomise(ImageOnlyCLIP(), seed=5), tmp_path / "ViT-B-16.pt")
    with pytest.raises(TextTowerError) as e:
        build(path, tmp_path / "c.safetensors", vocab)
    one_line(e, path, "no CLIP text tower", "text_projection")
    with pytest.raises(TextTowerError) as e:
        build(tmp_path / "absent.pt", tmp_path / "c.safetensors", vocab)
    one_line(e, tmp_path / "absent.pt", "no such")


def test_release_whose_text_width_mismatches_visual_proj_is_refused(vocab, tmp_path):
    path = write_mismatched_release(tmp_path / "ViT-B-16.pt", proj_width=EMBED + 16)
    for call in (lambda: load_clip_text(path), lambda: build(path, tmp_path / "c.safetensors", vocab)):
        with pytest.raises(TextTowerError) as e:
            call()
        one_line(e, path, "text tower does not match the image tower", f"({WIDTH}, {EMBED})",
                 f"({WIDTH}, {EMBED + 16})")
    assert not (tmp_path / "c.safetensors").exists()


def test_text_tower_and_concepts_must_come_from_the_backbones_file(release, other_release, vocab, tmp_path):
    backbone = load_backbone("clip_vitb", release, arch=BACKBONE_ARCH)
    require_same_release(backbone.weights_sha256, load_clip_text(release))
    with pytest.raises(TextTowerError) as e:
        require_same_release(backbone.weights_sha256, load_clip_text(other_release))
    one_line(e, other_release, "differs")
    c = build(release, tmp_path / "c.safetensors", vocab)
    require_concepts_for(c, "clip_vitb", backbone.weights_sha256)
    other = load_backbone("clip_vitb", other_release, arch=BACKBONE_ARCH)
    with pytest.raises(ConceptError) as e:
        require_concepts_for(c, "clip_vitb", other.weights_sha256)
    one_line(e, tmp_path / "c.safetensors", "concepts made from ViT-B-16.pt", other.weights_sha256[:12])


# ---------------------------------------------------------------- reading foreign files


def test_load_concepts_refuses_other_files(release, vocab, tmp_path):
    random_st = tmp_path / "random.safetensors"
    save_file({"classes": torch.randn(3, 4), "x": torch.randn(2)}, str(random_st), metadata={"a": "b"})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    for path, fragment in ((random_st, "not a cosettle concepts file"), (junk, "not a readable safetensors file"),
                           (tmp_path / "absent.safetensors", "no such concepts file")):
        with pytest.raises(ConceptError) as e:
            load_concepts(path)
        one_line(e, path, fragment)
    # a concepts file whose tensors were swapped for ones that disagree with its metadata
    c = build(release, tmp_path / "c.safetensors", vocab)
    bad = tmp_path / "bad.safetensors"
    meta = json.dumps(c.meta)
    tensors = {"classes": c.classes, "attributes": c.attributes, "membership": torch.zeros_like(c.membership),
               "visual_proj": c.visual_proj}
    save_file(tensors, str(bad), metadata={METADATA_KEY: meta})
    with pytest.raises(ConceptError) as e:
        load_concepts(bad)
    one_line(e, bad, "membership")
    meta2 = meta.replace('"format": 1', '"format": 2')
    save_file(dict(tensors, membership=c.membership), str(bad), metadata={METADATA_KEY: meta2})
    with pytest.raises(ConceptError) as e:
        load_concepts(bad)
    one_line(e, bad, "format 2")


# ---------------------------------------------------------------- command line


def test_cli_builds_reuses_and_refuses(release, vocab, tmp_path):
    out = tmp_path / "concepts.safetensors"
    args = ["concepts", "--weights", str(release), "--classes", str(vocab[0]), "--attributes", str(vocab[1]),
            "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"{out}: 5 classes, 5 attributes, embedding width {EMBED}" in result.output
    assert CliRunner().invoke(cli, args).exit_code == 0  # reused
    result = CliRunner().invoke(cli, args[:-6] + ["--out", str(out)])  # Kinetics-400 classes, no attributes
    assert result.exit_code == 1 and "made for another vocabulary" in result.output
    assert "Traceback" not in result.output
