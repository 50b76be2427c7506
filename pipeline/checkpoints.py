"""Reading official checkpoint files safely and turning them into timm state dicts.

Each backbone declares its release format as a ``CheckpointFormat``; ``read_state_dict`` applies
it. Files are opened with ``torch.load(weights_only=True)`` (TorchScript only through
``torch.jit.load``), so no arbitrary object is ever unpickled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cosettle.core.errors import first_line


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded into the backbone; the message names the file."""


@dataclass(frozen=True)
class CheckpointFormat:
    """How one official release stores its encoder weights.

    The steps run in field order: pick ``container`` from the loaded object, keep only keys under
    ``keep_prefix`` (stripped), apply the ``rename`` regex pairs, resize a DINOv2-style positional
    embedding to the model grid, run timm's ``checkpoint_filter_fn``, drop keys starting with any
    of ``drop``.
    """

    torchscript: bool = False
    container: str | None = None
    keep_prefix: str = ""
    rename: tuple[tuple[str, str], ...] = ()
    dinov2_pos_resize: bool = False
    timm_filter: bool = False
    filter_kwargs: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()


def _load_object(path: Path, torchscript: bool):
    try:
        if torchscript:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = "a TorchScript archive" if torchscript else "a weights-only torch checkpoint"
        raise CheckpointError(f"{path}: not {kind} ({first_line(e)})") from None


def _dinov2_resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """Resize as DINOv2's interpolate_pos_encoding does: bicubic, scale (g + 0.1) / g0, no antialias."""
    old = int(round((pos.shape[1] - prefix) ** 0.5))
    if (old, old) == tuple(grid):
        return pos
    patch = pos[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    scale = ((grid[0] + 0.1) / old, (grid[1] + 0.1) / old)
    patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != tuple(grid):
        raise ValueError(f"positional embedding resized to {tuple(patch.shape[-2:])}, expected {tuple(grid)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:, :prefix], patch], dim=1)


def _check_patch_size(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Refuse a patch-embedding kernel of another size: timm's filter would silently resample it,
    turning e.g. a CLIP ViT-B/32 file into a wrong ViT-B/16."""
    want = tuple(model.patch_embed.patch_size)
    for key in ("patch_embed.proj.weight", "visual.conv1.weight"):  # timm / OpenAI CLIP names
        if key in sd and tuple(sd[key].shape[-2:]) != want:
            raise ValueError(f"{key} has patch size {tuple(sd[key].shape[-2:])}, the backbone needs {want}")


def _convert(sd: dict[str, torch.Tensor], fmt: CheckpointFormat, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layout steps after key selection: DINOv2 position resize, then timm's filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if fmt.dinov2_pos_resize and "pos_embed" in sd:
        sd["pos_embed"] = _dinov2_resize_pos_embed(sd["pos_embed"], model.patch_embed.grid_size, prefix=1)
    if fmt.timm_filter:
        _check_patch_size(sd, model)
        sd = checkpoint_filter_fn(sd, model, **fmt.filter_kwargs)
    return sd


def read_state_dict(path: Path, fmt: CheckpointFormat, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Load ``path`` and convert it to a state dict for ``model`` following ``fmt``."""
    return to_model_names(own_names(_load_object(path, fmt.torchscript), fmt, path), fmt, model, path)


def own_names(obj, fmt: CheckpointFormat, path: Path | str) -> dict[str, torch.Tensor]:
    """The encoder entries of a release file's loaded object under the backbone's own names
    (``fmt``'s container entry and key prefix removed)."""
    if fmt.container is not None:
        if not isinstance(obj, dict) or fmt.container not in obj:
            keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: expected a '{fmt.container}' entry in the checkpoint, found {keys}")
        obj = obj[fmt.container]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: the weights are not a mapping of names to tensors")
    sd = {k[len(fmt.keep_prefix):]: v for k, v in obj.items() if k.startswith(fmt.keep_prefix)}
    if not sd:
        raise CheckpointError(f"{path}: no key starts with '{fmt.keep_prefix}'")
    return sd


def to_model_names(sd: dict[str, torch.Tensor], fmt: CheckpointFormat, model: torch.nn.Module,
                   path: Path | str) -> dict[str, torch.Tensor]:
    """Own-name entries renamed and converted to ``model``'s layout (dropped keys removed)."""
    for pattern, repl in fmt.rename:
        sd = {re.sub(pattern, repl, k): v for k, v in sd.items()}
    try:
        sd = _convert(sd, fmt, model)
    except Exception as e:  # a foreign layout makes the resize or timm's filter fail with a bare shape error
        raise CheckpointError(f"{path}: cannot convert to the backbone's layout ({first_line(e)})") from None
    return {k: v for k, v in sd.items() if not k.startswith(fmt.drop)}


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, backbone: str) -> None:
    """load_state_dict(strict=True), with every missing, unexpected or mis-shaped key named.

    A model on the meta device is materialised with the file's tensors (``assign=True``) after the
    check, so its parameters are never allocated and initialised only to be overwritten."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(sd) & set(own) if sd[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {show(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes: {show(shapes)}")
        raise CheckpointError(f"{path}: does not fit backbone '{backbone}': " + "; ".join(parts))
    if any(t.is_meta for t in own.values()):
        # A model built on the meta device (no storage): it takes the file's tensors, in its own
        # dtype and contiguous, which is what copying them into allocated parameters gives.
        sd = {k: v.to(own[k].dtype).contiguous() for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
    else:
        model.load_state_dict(sd, strict=True)
