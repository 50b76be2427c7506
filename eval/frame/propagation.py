"""Label propagation through frame features (EVAL_PROTOCOLS.md), vectorised in torch.

For each target frame the context is frame 0 (its ground truth, always kept) plus a FIFO of the
last ``n_last_frames`` predicted soft maps. Every target cell weighs every context cell by
exp(cos / temperature) on L2-normalised features, zeroes the sources outside its local window,
keeps the ``topk`` largest weights over all context frames together (ties at the k-th value are
kept, as DINO's threshold does), renormalises them to sum 1 and averages the source labels.
The FIFO stores that soft grid map. The output stage turns a soft map into an id image.

Three presets: ``dino`` (DINO's eval_video_segmentation.py), ``crw`` (CRW's test.py: frame-0
padding, Euclidean radius on short-term frames only, bilinear first labels, no min-max) and
``cosettle`` (the 480x880 DINO-style protocol of RSP/CropMAE/SiamMAE, the Co-Settle input size).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cosettle.pipeline.transforms import IMAGENET_MEAN

VOID = 255
WINDOWS = ("square", "disk")
FIRST_LABELS = ("nearest", "bilinear")
UPSAMPLES = ("patch", "original")


def _opt(default, help: str, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class PropagationSettings:
    """Everything that decides a propagation result: input size, normalisation and the rule."""

    n_last_frames: int = _opt(7, "Predicted frames kept in the FIFO context (frame 0 is always added).")
    size_mask_neighborhood: int = _opt(12, "Local window radius in grid cells, for every context frame; 0 = no window.")
    topk: int = _opt(5, "Sources kept per target cell, over all context frames together.")
    temperature: float = _opt(0.1, "Affinity exp(cos / temperature).")
    short_side: int = _opt(480, "Input short side in pixels (ignored with --size).")
    multiple: int = _opt(64, "Input long side = floor(long * short_side / short / multiple) * multiple.")
    size: tuple[int, int] | None = _opt(None, "Fixed input HxW (aspect not kept), e.g. 480x880.")
    mean: tuple[float, float, float] = _opt(IMAGENET_MEAN, "Normalisation mean (RGB).")
    std: tuple[float, float, float] = _opt((0.228, 0.224, 0.225), "Normalisation std (RGB); DINO writes 0.228.")
    window: str = _opt("square", "Window shape: square (|dy|,|dx| <= r) or disk (dy^2 + dx^2 < r^2, CRW).", WINDOWS)
    window_first: bool = _opt(True, "Apply the window to frame 0 too (DINO) or to short-term frames only (CRW).")
    pad_first: bool = _opt(False, "Start the FIFO full of copies of frame 0 (CRW pads the video so).")
    first_labels: str = _opt("nearest", "Frame-0 labels on the grid: nearest (resize, one-hot) or bilinear (one-hot, resize).",
                             FIRST_LABELS)
    minmax: bool = _opt(True, "Per-channel min-max normalisation of the upsampled map before the argmax.")
    upsample: str = _opt("patch", "patch: bilinear x patch, argmax, NEAREST to the original size; original: bilinear to it.",
                         UPSAMPLES)

    def __post_init__(self):
        checks = [
            (self.n_last_frames >= 0, f"n_last_frames must be >= 0, got {self.n_last_frames}"),
            (self.size_mask_neighborhood >= 0, f"size_mask_neighborhood must be >= 0, got {self.size_mask_neighborhood}"),
            (self.topk >= 1, f"topk must be >= 1, got {self.topk}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (self.short_side >= 1 and self.multiple >= 1, "short_side and multiple must be positive"),
            (self.size is None or (len(self.size) == 2 and min(self.size) >= 1), f"size must be (H, W), got {self.size}"),
            (len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "mean and std need 3 values, std > 0"),
            (self.window in WINDOWS, f"window must be one of {WINDOWS}, got {self.window!r}"),
            (self.first_labels in FIRST_LABELS, f"first_labels must be one of {FIRST_LABELS}, got {self.first_labels!r}"),
            (self.upsample in UPSAMPLES, f"upsample must be one of {UPSAMPLES}, got {self.upsample!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def with_overrides(self, **overrides) -> PropagationSettings:
        """A copy with the given settings replaced; ``None`` values leave a setting as it is."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown propagation setting(s): {', '.join(unknown)}")
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
        return replace(self, **given)

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (H, W) for a frame of ``height`` x ``width``, as DINO's read_frame sizes it.

        The short side becomes ``short_side``; the other is scaled and floored to ``multiple``.
        A square frame counts as landscape (DINO's ``if h > w ... else``).
        """
        if self.size is not None:
            return tuple(self.size)
        if height > width:
            return int(self.short_side * height / width // self.multiple * self.multiple), self.short_side
        return self.short_side, int(self.short_side * width / height // self.multiple * self.multiple)


PRESETS: dict[str, PropagationSettings] = {
    "dino": PropagationSettings(),
    "crw": PropagationSettings(
        n_last_frames=20, size_mask_neighborhood=12, topk=10, temperature=0.05, multiple=16,
        std=(0.229, 0.224, 0.225), window="disk", window_first=False, pad_first=True,
        first_labels="bilinear", minmax=False, upsample="original",
    ),
    "cosettle": PropagationSettings(n_last_frames=30, size_mask_neighborhood=30, topk=7, size=(480, 880)),
}


def preset(name: str, **overrides) -> PropagationSettings:
    """The named preset with individual settings overridden (``None`` = keep the preset's)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides)


# -- frame-0 labels --------------------------------------------------------------------------------

def first_frame_labels(ids: np.ndarray, grid_hw: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Label map [C, h, w] (float32) of a frame-0 id image [H, W] on the feature grid.

    C = largest id + 1 (channel 0 = background); void (255) counts as background. ``nearest``
    (DINO): PIL NEAREST resize of the ids to the grid, then one-hot. ``bilinear`` (CRW): one-hot
    at full resolution, then bilinear resize (align_corners False, no antialiasing) to the grid.
    """
    ids = np.where(np.asarray(ids) == VOID, 0, ids).astype(np.uint8)
    h, w = grid_hw
    channels = int(ids.max()) + 1
    if mode == "nearest":
        small = np.asarray(Image.fromarray(ids).resize((w, h), Image.NEAREST))
        return F.one_hot(torch.from_numpy(small.astype(np.int64)), channels).permute(2, 0, 1).float()
    if mode == "bilinear":
        onehot = F.one_hot(torch.from_numpy(ids.astype(np.int64)), channels).permute(2, 0, 1).float()
        return F.interpolate(onehot[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    raise ValueError(f"first_labels must be one of {FIRST_LABELS}, got {mode!r}")


# -- the propagation rule --------------------------------------------------------------------------

def window_mask(targets: torch.Tensor, h: int, w: int, radius: int, shape: str) -> torch.Tensor:
    """Bool [len(targets), h*w]: which grid cells lie in the window of each target cell index."""
    ty, tx = targets.div(w, rounding_mode="floor"), targets % w
    cells = torch.arange(h * w, device=targets.device)
    dy = (ty[:, None] - cells.div(w, rounding_mode="floor")[None]).abs()
    dx = (tx[:, None] - (cells % w)[None]).abs()
    if shape == "square":
        return (dy <= radius) & (dx <= radius)
    if shape == "disk":
        return dy * dy + dx * dx < radius * radius
    raise ValueError(f"window must be one of {WINDOWS}, got {shape!r}")


class _Context:
    """Frame 0 plus a ring buffer of the last n predicted frames: features [hw, D], labels [hw, C]."""

    def __init__(self, feats0: torch.Tensor, labels0: torch.Tensor, n: int, pad: bool):
        hw, dim = feats0.shape
        self.feats = feats0.new_empty(1 + n, hw, dim)
        self.labels = labels0.new_empty(1 + n, hw, labels0.shape[1])
        self.feats[0], self.labels[0] = feats0, labels0
        self.n, self.count, self.next = n, 0, 0
        if pad:
            self.feats[1:], self.labels[1:] = feats0, labels0
            self.count = n

    def push(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        if self.n == 0:
            return
        self.feats[1 + self.next], self.labels[1 + self.next] = feats, labels
        self.next = (self.next + 1) % self.n
        self.count = min(self.count + 1, self.n)

    @property
    def size(self) -> int:
        """Context frames in use: slot 0 is frame 0, slots 1..count the FIFO (order is irrelevant)."""
        return 1 + self.count


def _blocks(h: int, w: int, s: PropagationSettings, block_bytes: int, device) -> list[tuple[slice, torch.Tensor | None]]:
    """Blocks of target cells, each with its outside-the-window mask [rows, hw] (None without a window).

    One [rows, (1 + n) * hw] float32 affinity plus top-k's scratch live at once; rows are sized to
    fit ``block_bytes``. The masks are built once per video, not once per frame.
    """
    hw = h * w
    rows = max(1, block_bytes // (2 * 4 * (1 + s.n_last_frames) * hw))
    blocks = []
    for lo in range(0, hw, rows):
        hi = min(hw, lo + rows)
        outside = None
        if s.size_mask_neighborhood > 0:
            outside = ~window_mask(torch.arange(lo, hi, device=device), h, w, s.size_mask_neighborhood, s.window)
        blocks.append((slice(lo, hi), outside))
    return blocks


# extra candidates taken beyond the k-th, so that ties at the k-th weight are seen without a second pass
_TIE_MARGIN = 3


def _topk_weights(dots: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept sources of each row of masked dot products [rows, n]: (weights, indices), both [rows, k'].

    The rule (EVAL_PROTOCOLS.md): weights exp(cos / T) relative to the row max, keep every weight
    >= the k-th largest (ties at the k-th are kept), renormalise. exp and the division by T are
    monotone, so the kept set is a prefix of the sources sorted by dot product: top-k is taken on
    the dot products themselves and exp is evaluated on the k' = k + margin candidates only;
    weights not kept are 0. Rows whose tie run reaches past the k' candidates are redone with a
    larger k'. Whole-row passes: the top-k only.
    """
    n = dots.shape[1]
    kk = min(k + _TIE_MARGIN, n)
    while True:
        vals, idx = dots.topk(kk, dim=1, sorted=False)  # sorting the k' candidates after is cheaper
        vals, order = vals.sort(dim=1, descending=True)
        idx = idx.gather(1, order)
        logits = vals.div_(temperature)
        aff = logits.sub_(logits[:, :1].clone()).exp_()
        kth = aff[:, k - 1 : k]
        aff.masked_fill_(aff < kth, 0.0)
        # the last candidate kept with a positive weight: the ties may go on beyond it
        if kk == n or not bool((aff[:, -1] > 0).any()):
            return aff.div_(aff.sum(dim=1, keepdim=True)), idx
        kk = min(2 * kk, n)


def _propagate_frame(query: torch.Tensor, ctx: _Context, blocks: list, s: PropagationSettings) -> torch.Tensor:
    """Soft labels [hw, C] of one target frame (``query`` [hw, D], L2-normalised)."""
    m, hw = ctx.size, query.shape[0]
    keys = ctx.feats[:m].reshape(m * hw, -1)
    values = ctx.labels[:m].reshape(m * hw, -1)
    out = query.new_empty(hw, values.shape[1])
    first_windowed = 0 if s.window_first else 1
    k = min(s.topk, m * hw)
    for rows, outside in blocks:
        dots = query[rows] @ keys.T
        if outside is not None and first_windowed < m:
            dots.view(-1, m, hw)[:, first_windowed:].masked_fill_(outside[:, None], float("-inf"))
        weights, idx = _topk_weights(dots, k, s.temperature)
        out[rows] = torch.einsum("rk,rkc->rc", weights, values[idx])
    return out


def propagate(features: Iterable[torch.Tensor], first: torch.Tensor, settings: PropagationSettings,
              block_bytes: int = 256 * 2**20) -> Iterator[torch.Tensor]:
    """Yield the soft label map [C, h, w] of frames 1, 2, ... of a video.

    ``features`` yields each frame's features [h, w, D] in order, frame 0 first, all on one
    device; ``first`` is frame 0's label map [C, h, w] on the grid. Features are L2-normalised
    here. Work per frame is split into blocks of target cells so that the affinity temporaries
    stay under about ``block_bytes``.
    """
    frames = iter(features)
    try:
        f0 = next(frames)
    except StopIteration:
        raise ValueError("propagate needs the features of frame 0") from None
    h, w, _ = f0.shape
    if tuple(first.shape[1:]) != (h, w):
        raise ValueError(f"frame-0 labels are {tuple(first.shape[1:])} but the feature grid is {(h, w)}")
    labels0 = first.to(device=f0.device, dtype=torch.float32).flatten(1).T.contiguous()
    ctx = _Context(F.normalize(f0.float().reshape(h * w, -1), dim=1), labels0, settings.n_last_frames,
                   settings.pad_first)
    blocks = _blocks(h, w, settings, block_bytes, f0.device)
    for f in frames:
        if tuple(f.shape[:2]) != (h, w):
            raise ValueError(f"a frame's feature grid is {tuple(f.shape[:2])}, frame 0's is {(h, w)}")
        query = F.normalize(f.float().reshape(h * w, -1), dim=1)
        soft = _propagate_frame(query, ctx, blocks, settings)
        ctx.push(query, soft)
        yield soft.T.reshape(-1, h, w)


# -- output stage ----------------------------------------------------------------------------------

def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """DINO's norm_mask: each channel with max > 0 is shifted to min 0 and scaled to max 1.

    A constant positive channel becomes 0/0 = NaN in DINO, and torch's argmax picks the first NaN
    channel everywhere; +inf reproduces exactly that choice without NaNs.
    """
    lo, hi = torch.aminmax(maps.flatten(1), dim=1)
    span = (hi - lo)[:, None, None]
    scaled = torch.where(span > 0, (maps - lo[:, None, None]) / span.clamp_min(1e-30), torch.inf)
    return torch.where((hi > 0)[:, None, None], scaled, maps)


def label_image(soft: torch.Tensor, patch: int, out_hw: tuple[int, int], settings: PropagationSettings) -> np.ndarray:
    """Id image uint8 [H, W] at ``out_hw`` from a soft grid map [C, h, w].

    ``patch``: bilinear upsampling by the patch size (align_corners False), optional min-max,
    argmax, then NEAREST resize to ``out_hw`` (DINO). ``original``: bilinear straight to ``out_hw``,
    optional min-max, argmax (CRW). The argmax over channels runs on a channels-last copy, along
    contiguous memory (same ids as over [C, H, W]: the first maximum wins either way).
    """
    _, h, w = soft.shape
    size = (h * patch, w * patch) if settings.upsample == "patch" else tuple(out_hw)
    maps = F.interpolate(soft[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if settings.minmax:
        maps = _minmax(maps)
    ids = maps.permute(1, 2, 0).contiguous().argmax(dim=-1).to(torch.uint8).cpu().numpy()
    if ids.shape != tuple(out_hw):
        ids = np.asarray(Image.fromarray(ids).resize((out_hw[1], out_hw[0]), Image.NEAREST))
    return ids


def grid_size(input_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """Feature grid (h, w) of an input size; both sides must be multiples of the patch."""
    hh, ww = input_hw
    if hh % patch or ww % patch:
        raise ValueError(f"input size {hh}x{ww} is not a multiple of the patch size {patch}; "
                         f"set --size, --short-side or --multiple accordingly")
    return hh // patch, ww // patch


def segment_video(features: Iterable[torch.Tensor], first_ids: np.ndarray, settings: PropagationSettings,
                  patch: int, out_sizes: Iterable[tuple[int, int]] | None = None,
                  block_bytes: int = 256 * 2**20) -> Iterator[np.ndarray]:
    """Id images uint8 of frames 1, 2, ... propagated from frame 0's ids [H, W].

    ``features`` as for :func:`propagate`; ``out_sizes`` gives each output frame's (H, W) and
    defaults to frame 0's size for all. The largest predicted id is the largest id of frame 0.
    """
    frames = iter(features)
    try:
        f0 = next(frames)
    except StopIteration:
        raise ValueError("segment_video needs the features of frame 0") from None
    first = first_frame_labels(first_ids, tuple(f0.shape[:2]), settings.first_labels)
    sizes = itertools.repeat(tuple(first_ids.shape)) if out_sizes is None else out_sizes
    for soft, out_hw in zip(propagate(itertools.chain([f0], frames), first, settings, block_bytes), sizes):
        yield label_image(soft, patch, out_hw, settings)
