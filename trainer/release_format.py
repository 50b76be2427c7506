"""The Co-Settle authors' checkpoint format ("+Ours" ``checkpoint-4.pth``), read safely and mapped
onto cosettle's names.

The release is ``torch.save`` of a dict: ``model`` (the full model state dict), ``optimizer``,
``epoch``, ``scaler`` and ``args`` (an ``argparse.Namespace``). It is read with
``torch.load(weights_only=True)`` with ``argparse.Namespace`` allow-listed and nothing else, so a
file that needs any other class or function is refused before anything in it runs.

``model`` holds two parts:

- the projection ("fusion net") under ``adapter.adapter.``; its key map onto
  :func:`cosettle.trainer.projection.build_projection`'s ``nn.Sequential`` is derived from that
  Sequential itself (:func:`adapter_key_map`), following COSETTLE_METHOD.md section 1 (Linear
  layers in order, tanh between them, LayerNorm last):

  ======================================  ========  ========  ========
  release key (``adapter.adapter.`` +)     linear    mlp2      mlp3
  ======================================  ========  ========  ========
  ``adapter_linear``                       ``0``
  ``adapter_linear1``                                ``0``     ``0``
  ``adapter_linear2``                                ``2``     ``2``
  ``adapter_linear3``                                          ``4``
  ``adapter_layer_norm1``                  ``2``     ``3``     ``5``
  ======================================  ========  ========  ========

  (``.weight`` and ``.bias`` each; the Tanh modules at the odd indices hold no parameters).
- the frozen encoder under the backbone's own module names: the names of the backbone's official
  file (``pipeline.backbones``' ``CheckpointFormat``) without the file's container and without
  its wrapper prefix (``module.`` of DDP, ``module.momentum_encoder.`` of MoCo v3,
  ``visual_encoder.`` of BLIP, ``backbone.`` of the DINOv2 meta-architecture). The format's
  other steps (block-chunk renames, position resizes, timm's filter, dropped heads/decoders) and
  the strict load apply unchanged. CLIP's official file is a TorchScript archive of the whole
  CLIP model, so its names in a release cannot be told from the format: it is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from cosettle.core.errors import first_line
from cosettle.core.provenance import sha256_file
from cosettle.pipeline.backbones import get_spec
from cosettle.pipeline.checkpoints import CheckpointFormat, load_strict, own_names, to_model_names

from .projection import FUSIONS, ProjectionError, build_projection

ADAPTER_PREFIX = "adapter.adapter."
TOLERANCE = 1e-5  # largest |difference| / max(1, max |value|) for encoder tensors that "match"


class ReleaseError(ProjectionError):
    """A release file that cannot be used as asked; the message (one line) names the file."""


@dataclass
class Release:
    """A release file as read: its ``model`` split into encoder and adapter, and its settings."""

    path: Path
    sha256: str
    encoder: dict[str, torch.Tensor]  # the encoder part of ``model``, under the release's names
    adapter: dict[str, torch.Tensor]  # keys under ``adapter.``
    args: dict | None  # vars() of the ``args`` Namespace, None when the file has none
    epoch: int | None
    optimizer: dict | None
    scaler: dict | None


# -- reading --------------------------------------------------------------------------------------

def load_release_object(path: Path):
    """``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseError(f"{path}: no such release file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else first_line(e)
        raise ReleaseError(f"{path}: refused: unpickling it needs {what}, which is not allowed (only tensors, plain "
                           f"containers and argparse.Namespace are read, weights_only=True); nothing in the file "
                           f"was executed") from None
    except Exception as e:
        raise ReleaseError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None


def read_release(path: Path) -> Release:
    """Read and split a release file; refuses what is not the release format."""
    path = Path(path)
    obj = load_release_object(path)
    if not isinstance(obj, dict) or "model" not in obj:
        found = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ReleaseError(f"{path}: not a Co-Settle release: expected a dict with a 'model' entry, found {found}")
    model = obj["model"]
    if not isinstance(model, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in model.items()):
        raise ReleaseError(f"{path}: 'model' is not a mapping of names to tensors")
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = dict(vars(args))
    elif args is not None and not isinstance(args, dict):
        raise ReleaseError(f"{path}: 'args' is a {type(args).__name__}, expected an argparse.Namespace")
    epoch = obj.get("epoch")
    adapter = {k: v for k, v in model.items() if k.startswith("adapter.")}
    encoder = {k: v for k, v in model.items() if not k.startswith("adapter.")}
    return Release(path, sha256_file(path), encoder, adapter, args,
                   int(epoch) if isinstance(epoch, int) else None,
                   obj.get("optimizer") if isinstance(obj.get("optimizer"), dict) else None,
                   obj.get("scaler") if isinstance(obj.get("scaler"), dict) else None)


# -- the projection ---------------------------------------------------------------------------------

def adapter_key_map(fusion: str) -> dict[str, str]:
    """Release key -> key of ``build_projection(dim, fusion)``, read off that Sequential: its
    Linear layers become ``adapter_linear`` (one) or ``adapter_linear1..n``, its LayerNorm
    ``adapter_layer_norm1``."""
    net = build_projection(1, fusion)
    linears = [i for i, m in enumerate(net) if isinstance(m, nn.Linear)]
    norms = [i for i, m in enumerate(net) if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 1 and norms[0] == len(net) - 1, "the projection ends in its one LayerNorm"
    names = {("adapter_linear" if len(linears) == 1 else f"adapter_linear{n}"): i for n, i in enumerate(linears, 1)}
    names["adapter_layer_norm1"] = norms[0]
    return {f"{ADAPTER_PREFIX}{name}.{p}": f"{i}.{p}" for name, i in names.items() for p in ("weight", "bias")}


def _show(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")


def projection_state(release: Release, fusion: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(fusion, the projection's state dict in cosettle's names, float32) of ``release``.

    ``fusion`` (the release's ``args.fusion_net``) names the variant; without it the variant is
    the one whose keys the adapter has exactly.
    """
    path, found = release.path, set(release.adapter)
    if not found:
        raise ReleaseError(f"{path}: no '{ADAPTER_PREFIX}*' keys in 'model': not a '+Ours' release "
                           f"(a base checkpoint?)")
    if fusion is not None and fusion not in FUSIONS:
        raise ReleaseError(f"{path}: args.fusion_net {fusion!r} is not a known variant ({', '.join(FUSIONS)})")
    if fusion is None:
        fusion = max(FUSIONS, key=lambda f: len(found & set(adapter_key_map(f))))
    mapping = adapter_key_map(fusion)
    missing, unexpected = set(mapping) - found, found - set(mapping)
    if missing or unexpected:
        parts = ([f"missing {_show(missing)}"] if missing else []) + ([f"unexpected {_show(unexpected)}"] if unexpected else [])
        raise ReleaseError(f"{path}: the adapter does not match fusion '{fusion}': " + "; ".join(parts))
    state = {mapping[k]: v.detach().to(torch.float32) for k, v in release.adapter.items()}
    dim = state["0.weight"].shape[-1]
    try:
        build_projection(dim, fusion).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ReleaseError(f"{path}: the adapter's tensors do not fit a {dim}-d '{fusion}' projection "
                           f"({first_line(e)})") from None
    return fusion, state


def adapter_state(state: Mapping[str, torch.Tensor], fusion: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`projection_state`: cosettle's projection state in the release's names."""
    inverse = {v: k for k, v in adapter_key_map(fusion).items()}
    if set(state) != set(inverse):
        raise ReleaseError(f"the projection's keys {sorted(state)} are not those of a '{fusion}' projection")
    return {inverse[k]: v.detach().cpu().contiguous() for k, v in state.items()}


# -- the encoder ------------------------------------------------------------------------------------

def release_format(backbone: str) -> CheckpointFormat:
    """How a release names ``backbone``'s encoder: its official format without container and
    wrapper prefix; a backbone whose release names cannot be told from the format is refused."""
    fmt = get_spec(backbone).checkpoint
    if fmt.torchscript:
        raise ReleaseError(f"{backbone}: its official file is a TorchScript archive of the whole model, so the "
                           f"encoder's names inside a release cannot be determined; import refused rather than guessed")
    return replace(fmt, container=None, keep_prefix="")


class _StateOnly:
    """Stands in for a model in ``load_strict``: its checks against a state dict, nothing loaded."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self._state

    def load_state_dict(self, state, strict: bool = True) -> None:
        return None


def encoder_state(release: Release, backbone: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The release's encoder converted as ``backbone``'s format does and checked strictly against
    ``model`` (every missing, unexpected or mis-shaped key named), in ``model``'s dtypes. ``model``
    is only read (timm's filter reads its geometry)."""
    fmt = release_format(backbone)
    where = f"{release.path} (the encoder in 'model')"
    if not release.encoder:
        raise ReleaseError(f"{where}: holds no encoder keys")
    sd = to_model_names(dict(release.encoder), fmt, model, where)
    own = model.state_dict()
    load_strict(_StateOnly(own), sd, where, backbone)
    return {k: v.detach().to(own[k].dtype) for k, v in sd.items()}


def release_own_names(obj, backbone: str, path: Path) -> dict[str, torch.Tensor]:
    """The encoder entries of an official file's loaded object under the backbone's own names."""
    return own_names(obj, release_format(backbone), path)  # release_format refuses TorchScript formats


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every (name, dtype, shape, bytes) in name order: equal tensors, equal digest."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compare_states(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> dict:
    """How two state dicts of the same keys differ: identical tensors, the largest difference,
    and the keys beyond :data:`TOLERANCE`."""
    identical, worst, beyond = 0, 0.0, []
    for k in sorted(ours):
        a, b = ours[k].detach().cpu(), theirs[k].detach().cpu()
        if a.shape == b.shape and torch.equal(a, b):
            identical += 1
            continue
        if a.shape != b.shape:
            beyond.append(k)
            continue
        diff = (a.double() - b.double()).abs().max().item()
        worst = max(worst, diff)
        if diff > TOLERANCE * max(1.0, b.double().abs().max().item()):
            beyond.append(k)
    return {"tensors": len(ours), "identical": identical, "max_abs_diff": worst, "beyond_tolerance": beyond}


def check_same_encoder(match: dict, release: Path, weights: str) -> None:
    """Refuse a release whose embedded encoder is not the evaluated (or named) one."""
    bad = match["beyond_tolerance"]
    if bad:
        raise ReleaseError(f"{release}: its embedded encoder differs from {weights} in {len(bad)} of "
                           f"{match['tensors']} tensors (e.g. {bad[0]}; largest |difference| "
                           f"{match['max_abs_diff']:.3g}): the projection was trained on another encoder")
