"""The concept vocabulary of the ``concepts`` objective and its CLIP text embeddings, in one file.

Vocabulary: action class names (the shipped Kinetics-400 names, or a file of one name a line), each
with attribute phrases from a user-editable file, one line per class::

    # comments and blank lines are skipped
    playing guitar: strumming strings; holding a guitar; moving fingers on a fretboard

A phrase named by several classes is one attribute shared by them; classes without a line have
none. Every class / attribute is embedded with the CLIP text tower of the same local file as the
image side (``cosettle.pipeline.text_tower``): each prompt template filled in (class names through
``readable_class_name``, phrases verbatim), each prompt embedding L2-normalised, averaged over the
templates, renormalised.

The file (safetensors, ``FORMAT`` 1), all tensors float32:

- ``classes`` [K, E], ``attributes`` [A, E] (A may be 0), ``membership`` [K, A] (1 where attribute
  a belongs to class k), ``visual_proj`` [D, E]: the file's ``visual.proj``, mapping class tokens
  after ln_post (the backbone's final norm) into the joint space;
- metadata ``cosettle_concepts``: JSON with ``format``, ``backbone``, ``weights`` (file name),
  ``weights_sha256``, ``class_names``, ``attributes`` (phrases), ``membership`` ({class: [attribute
  indices]}), ``class_templates``, ``attribute_templates``, ``vocabulary_sha256`` (sha256 of the
  canonical JSON of those five), ``environment``, ``created``.

An existing file is reused only for the same vocabulary and weights, refused otherwise (never
mixed); ``overwrite=True`` rebuilds it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from cosettle.core.atomic import write_atomic
from cosettle.core.errors import first_line
from cosettle.core.provenance import digest, environment, now_utc, package_version, sha256_file
from cosettle.pipeline.text_tower import (
    DEFAULT_TEMPLATES,
    ClipText,
    TextTowerError,
    load_clip_text,
    readable_class_name,
    require_text_tower,
)

FORMAT = 1
METADATA_KEY = "cosettle_concepts"
BACKBONE = "clip_vitb"
PURPOSE = "the concepts objective"
TENSORS = ("classes", "attributes", "membership", "visual_proj")
VOCABULARY_FIELDS = ("class_names", "attributes", "membership", "class_templates", "attribute_templates")
KINETICS400_FILE = Path(__file__).resolve().parents[1] / "data_manifests" / "kinetics400_classes.txt"
DEFAULT_ATTRIBUTE_TEMPLATES: tuple[str, ...] = (
    "a video of a person {}.",
    "a photo of a person {}.",
    "a person is {}.",
    "a video showing a person {}.",
)
RETRY = "pass --overwrite or another --out"


class ConceptError(Exception):
    """A vocabulary or concepts file that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True, eq=False)
class Concepts:
    """The embedded vocabulary (CPU float32 tensors) and its provenance ``meta``; ``path`` its file."""

    classes: torch.Tensor  # [K, E]
    attributes: torch.Tensor  # [A, E]
    membership: torch.Tensor  # [K, A]
    visual_proj: torch.Tensor  # [D, E]
    meta: dict
    path: Path | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def attribute_names(self) -> list[str]:
        return list(self.meta["attributes"])

    @property
    def embed_dim(self) -> int:
        return int(self.classes.shape[1])


# ---------------------------------------------------------------- the vocabulary


def _content_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that are neither blank nor '#' comments."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConceptError(f"{path}: cannot read ({getattr(e, 'strerror', None) or first_line(e)})") from None
    lines = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1)]
    return [(i, ln) for i, ln in lines if ln and not ln.startswith("#")]


def read_class_list(path: Path, expect: int | None = None) -> list[str]:
    """Class names, one a line (blank lines and '#' comments skipped), distinct; ``expect`` a count."""
    names: dict[str, int] = {}
    for number, name in _content_lines(path):
        name = " ".join(name.split())
        if name in names:
            raise ConceptError(f"{path}:{number}: class {name!r} already listed at line {names[name]}")
        names[name] = number
    if not names:
        raise ConceptError(f"{path}: no class names")
    if expect is not None and len(names) != expect:
        raise ConceptError(f"{path}: expected {expect} distinct class names, got {len(names)}")
    return list(names)


def kinetics400_classes(path: Path = KINETICS400_FILE) -> list[str]:
    """The 400 Kinetics-400 class names shipped in ``data_manifests/``, line i = label i."""
    return read_class_list(path, expect=400)


def read_attributes(path: Path, class_names: Sequence[str]) -> dict[str, list[str]]:
    """``class name: phrase; phrase; ...`` lines -> {class: [phrases]} for every class (in class order)."""
    known = set(class_names)
    found: dict[str, tuple[int, list[str]]] = {}
    for number, line in _content_lines(path):
        name, colon, rest = line.partition(":")
        name = " ".join(name.split())
        if not colon or not name:
            raise ConceptError(f"{path}:{number}: expected 'class name: phrase; phrase; ...', got {line[:60]!r}")
        if name not in known:
            raise ConceptError(f"{path}:{number}: {name!r} is not in the class list")
        if name in found:
            raise ConceptError(f"{path}:{number}: class {name!r} already has attributes at line {found[name][0]}")
        phrases = [" ".join(p.split()) for p in rest.split(";")]
        if not all(phrases):
            raise ConceptError(f"{path}:{number}: empty attribute phrase for {name!r}")
        if len(set(phrases)) != len(phrases):
            raise ConceptError(f"{path}:{number}: a phrase is listed twice for {name!r}")
        found[name] = (number, phrases)
    return {c: found[c][1] if c in found else [] for c in class_names}


def read_vocabulary(classes_file: Path | None = None,
                    attributes_file: Path | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """(class names, {class: attribute phrases}); default classes: the shipped Kinetics-400 names."""
    names = read_class_list(Path(classes_file)) if classes_file is not None else kinetics400_classes()
    if attributes_file is None:
        return names, {c: [] for c in names}
    return names, read_attributes(Path(attributes_file), names)


def _check_templates(kind: str, templates: Sequence[str]) -> list[str]:
    if isinstance(templates, str) or not templates:
        raise ConceptError(f"{kind} must be a non-empty list of templates")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ConceptError(f"{kind}: every template needs exactly one '{{}}', got {bad[0]!r}")
    return list(templates)


def vocabulary(class_names: Sequence[str], attributes_by_class: dict[str, list[str]],
               class_templates: Sequence[str] = DEFAULT_TEMPLATES,
               attribute_templates: Sequence[str] = DEFAULT_ATTRIBUTE_TEMPLATES) -> dict:
    """The canonical vocabulary record: ``VOCABULARY_FIELDS``; shared phrases become one attribute."""
    phrases: dict[str, int] = {}
    for c in class_names:
        for p in attributes_by_class.get(c, []):
            phrases.setdefault(p, len(phrases))
    return {"class_names": list(class_names), "attributes": list(phrases),
            "membership": {c: [phrases[p] for p in attributes_by_class.get(c, [])] for c in class_names},
            "class_templates": _check_templates("class_templates", class_templates),
            "attribute_templates": _check_templates("attribute_templates", attribute_templates)}


def membership_matrix(vocab: dict) -> torch.Tensor:
    """[K, A] float32: 1 where attribute a belongs to class k."""
    m = torch.zeros(len(vocab["class_names"]), len(vocab["attributes"]), dtype=torch.float32)
    for k, c in enumerate(vocab["class_names"]):
        m[k, vocab["membership"][c]] = 1.0
    return m


# ---------------------------------------------------------------- building


def _embed(clip: ClipText, items: list[list[str]], progress: bool | None) -> list[torch.Tensor]:
    """Per item (its prompts), the normalised mean of the normalised prompt embeddings [E]."""
    texts = [t for prompts in items for t in prompts]
    step = clip.batch_size
    batches = tqdm(range(0, len(texts), step), desc="text batches", unit="batch",
                   disable=None if progress is None else not progress)  # None: a bar only on a terminal
    out = [clip.encode(texts[i : i + step]).float().cpu() for i in batches]
    flat = torch.cat(out) if out else torch.empty(0, clip.embed_dim)
    rows, start = [], 0
    for prompts in items:
        rows.append(F.normalize(F.normalize(flat[start : start + len(prompts)], dim=-1).mean(0), dim=-1))
        start += len(prompts)
    return rows


def _stack(rows: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.stack(rows).contiguous() if rows else torch.empty(0, dim, dtype=torch.float32)


def _differences(meta: dict, vocab: dict, weights_sha256: str, backbone: str) -> list[str]:
    out = []
    changed = [f for f in VOCABULARY_FIELDS if meta.get(f) != vocab[f]]
    if changed:
        out.append(f"vocabulary ({', '.join(changed)} differ)")
    if meta.get("weights_sha256") != weights_sha256:
        out.append(f"weights ({meta.get('weights')} sha256 {str(meta.get('weights_sha256'))[:12]}, "
                   f"given {weights_sha256[:12]})")
    if meta.get("backbone") != backbone:
        out.append(f"backbone ({meta.get('backbone')}, given {backbone})")
    return out


def build_concepts(weights: Path, out: Path, classes_file: Path | None = None, attributes_file: Path | None = None,
                   class_templates: Sequence[str] = DEFAULT_TEMPLATES,
                   attribute_templates: Sequence[str] = DEFAULT_ATTRIBUTE_TEMPLATES, device: str = "cpu", *,
                   overwrite: bool = False, backbone: str = BACKBONE, progress: bool | None = None) -> Concepts:
    """Embed the vocabulary with the text tower of ``weights`` and write ``out`` atomically.

    An existing ``out`` for the same vocabulary and weights is returned without recomputing; one
    for another vocabulary / weights raises ``ConceptError`` unless ``overwrite``. A backbone or
    file without a usable text tower raises ``TextTowerError``. ``progress``: None = a bar on a TTY.
    """
    require_text_tower(backbone, PURPOSE)
    names, by_class = read_vocabulary(classes_file, attributes_file)
    vocab = vocabulary(names, by_class, class_templates, attribute_templates)
    weights, out = Path(weights), Path(out)
    if not weights.is_file():
        raise TextTowerError(f"{weights}: no such CLIP weights file")
    if out.exists() and not overwrite:
        try:
            existing = load_concepts(out)
        except ConceptError as e:
            raise ConceptError(f"{e}; {RETRY}") from None
        differs = _differences(existing.meta, vocab, sha256_file(weights), backbone)
        if not differs:
            return existing
        raise ConceptError(f"{out}: made for another {'; another '.join(differs)}; {RETRY}")
    clip = load_clip_text(weights, device)
    prompts = [[t.format(readable_class_name(c)) for t in vocab["class_templates"]] for c in names]
    prompts += [[t.format(p) for t in vocab["attribute_templates"]] for p in vocab["attributes"]]
    rows = _embed(clip, prompts, progress)
    tensors = {"classes": _stack(rows[: len(names)], clip.embed_dim),
               "attributes": _stack(rows[len(names):], clip.embed_dim),
               "membership": membership_matrix(vocab),
               "visual_proj": clip.model.visual.proj.detach().float().cpu().contiguous()}
    meta = {"format": FORMAT, "backbone": backbone, "weights": weights.name, "weights_sha256": clip.weights_sha256,
            **vocab, "vocabulary_sha256": digest(vocab),
            "environment": {**environment(), "open_clip_torch": package_version("open_clip_torch")},
            "created": now_utc()}
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, sort_keys=True)
    write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: text}))
    return Concepts(**tensors, meta=meta, path=out)


# ---------------------------------------------------------------- reading and checking


def _check_file(path: Path, meta: dict, t: dict[str, torch.Tensor]) -> None:
    """Raise ConceptError (one line) unless tensors and metadata agree."""
    def fail(what: str):
        raise ConceptError(f"{path}: not a valid concepts file ({what})")

    if meta.get("format") != FORMAT:
        raise ConceptError(f"{path}: concepts format {meta.get('format')!r}, this version reads {FORMAT}")
    missing = [k for k in (*VOCABULARY_FIELDS, "backbone", "weights_sha256", "vocabulary_sha256") if k not in meta]
    if missing or [k for k in TENSORS if k not in t]:
        fail(f"missing {', '.join(missing + [k for k in TENSORS if k not in t])}")
    if any(v.dtype != torch.float32 or v.ndim != 2 for v in t.values()):
        fail("tensors must be 2-D float32")
    k, a, e = len(meta["class_names"]), len(meta["attributes"]), t["classes"].shape[1]
    shapes = {"classes": (k, e), "attributes": (a, e), "membership": (k, a),
              "visual_proj": (t["visual_proj"].shape[0], e)}
    bad = [f"{n} {tuple(t[n].shape)}, expected {s}" for n, s in shapes.items() if tuple(t[n].shape) != s]
    if bad:
        fail(bad[0])
    vocab = {f: meta[f] for f in VOCABULARY_FIELDS}
    if digest(vocab) != meta["vocabulary_sha256"]:
        fail("vocabulary_sha256 does not match the recorded vocabulary")
    try:
        same = torch.equal(membership_matrix(vocab), t["membership"])
    except Exception:  # indices that do not fit the class / attribute lists
        same = False
    if not same:
        fail("membership tensor does not match the recorded membership")


def load_concepts(path: Path) -> Concepts:
    """Read a concepts file written by ``build_concepts``; anything else raises ``ConceptError``."""
    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"{path}: no such concepts file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys() if k in TENSORS}
    except Exception as e:
        raise ConceptError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    if raw is None:
        raise ConceptError(f"{path}: not a cosettle concepts file (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConceptError(f"{path}: unreadable '{METADATA_KEY}' metadata ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise ConceptError(f"{path}: '{METADATA_KEY}' metadata is not a JSON object")
    _check_file(path, meta, tensors)
    return Concepts(**{k: tensors[k] for k in TENSORS}, meta=meta, path=path)


def require_concepts_for(concepts: Concepts, backbone_name: str, weights_sha256: str) -> None:
    """Refuse (one line) concepts made for another backbone or weights file than the image side's;
    a backbone without a supported text tower raises ``TextTowerError`` naming the reason."""
    require_text_tower(backbone_name, PURPOSE)
    where = concepts.path or "concepts"
    meta = concepts.meta
    if meta.get("backbone") != backbone_name:
        raise ConceptError(f"{where}: concepts made for {meta.get('backbone')}, the backbone is {backbone_name}")
    if meta.get("weights_sha256") != weights_sha256:
        raise ConceptError(f"{where}: concepts made from {meta.get('weights')} (sha256 "
                           f"{str(meta.get('weights_sha256'))[:12]}), the backbone's weights are sha256 "
                           f"{str(weights_sha256)[:12]}; rebuild them with cosettle concepts --weights <that file>")
