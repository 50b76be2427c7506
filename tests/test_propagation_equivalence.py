"""The vectorised propagation rule and output stage against their previous implementation (exp over
whole affinity rows, then top-k; argmax over a channel-first map), kept here as a reference copy,
on random inputs of several sizes and on inputs full of exact ties: the same soft maps up to float
rounding and the same ids (bar rounding-level channel ties); the output stage alone, exactly."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cosettle.eval.frame.propagation import PRESETS, _Context, label_image, propagate, window_mask


def _old_blocks(h, w, s, block_bytes, device):
    hw = h * w
    rows = max(1, block_bytes // (3 * 4 * (1 + s.n_last_frames) * hw))
    blocks = []
    for lo in range(0, hw, rows):
        hi = min(hw, lo + rows)
        mask = None
        if s.size_mask_neighborhood > 0:
            mask = window_mask(torch.arange(lo, hi, device=device), h, w, s.size_mask_neighborhood, s.window)
        blocks.append((slice(lo, hi), mask))
    return blocks


def _old_propagate_frame(query, ctx, blocks, s):
    """The per-frame path before top-k moved onto the dot products: exp over whole rows, then top-k."""
    m, hw = ctx.size, query.shape[0]
    keys = ctx.feats[:m].reshape(m * hw, -1)
    values = ctx.labels[:m].reshape(m * hw, -1)
    out = query.new_empty(hw, values.shape[1])
    first_windowed = 0 if s.window_first else 1
    for rows, inside in blocks:
        logits = (query[rows] @ keys.T).div_(s.temperature).view(-1, m, hw)
        if inside is not None and first_windowed < m:
            logits[:, first_windowed:].masked_fill_(~inside[:, None], float("-inf"))
        logits = logits.view(-1, m * hw)
        aff = logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
        kth = aff.topk(min(s.topk, m * hw), dim=1).values[:, -1:]
        aff.masked_fill_(aff < kth, 0.0)
        aff.div_(aff.sum(dim=1, keepdim=True))
        out[rows] = aff @ values
    return out


def old_propagate(features, first, settings, block_bytes=256 * 2**20):
    f0, *rest = features
    h, w, _ = f0.shape
    labels0 = first.float().flatten(1).T.contiguous()
    ctx = _Context(F.normalize(f0.float().reshape(h * w, -1), dim=1), labels0, settings.n_last_frames,
                   settings.pad_first)
    blocks = _old_blocks(h, w, settings, block_bytes, f0.device)
    for f in rest:
        query = F.normalize(f.float().reshape(h * w, -1), dim=1)
        soft = _old_propagate_frame(query, ctx, blocks, settings)
        ctx.push(query, soft)
        yield soft.T.reshape(-1, h, w)


def _old_maps(soft, patch, out_hw, settings):
    _, h, w = soft.shape
    size = (h * patch, w * patch) if settings.upsample == "patch" else tuple(out_hw)
    maps = F.interpolate(soft[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if settings.minmax:
        flat = maps.flatten(1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        span = (hi - lo)[:, None, None]
        scaled = torch.where(span > 0, (maps - lo[:, None, None]) / span.clamp_min(1e-30), torch.inf)
        maps = torch.where((hi > 0)[:, None, None], scaled, maps)
    return maps


def _to_size(ids, out_hw):
    if ids.shape != tuple(out_hw):
        ids = np.asarray(Image.fromarray(ids).resize((out_hw[1], out_hw[0]), Image.NEAREST))
    return ids


def old_label_image(soft, patch, out_hw, settings):
    return _to_size(_old_maps(soft, patch, out_hw, settings).argmax(dim=0).to(torch.uint8).numpy(), out_hw)


def assert_same_ids_up_to_rounding(new_soft, old_soft, patch, out_hw, settings):
    """Ids of the new soft map equal the old ones, except where the old map's best two channels
    are within float rounding of each other (the soft maps agree to ~1 ulp, not bit for bit:
    the weighted sums run in another order)."""
    got, expected = label_image(new_soft, patch, out_hw, settings), old_label_image(old_soft, patch, out_hw, settings)
    differ = got != expected
    if differ.any():
        maps = _old_maps(old_soft, patch, out_hw, settings)
        top2 = maps.topk(2, dim=0).values
        margin = _to_size(((top2[0] - top2[1]) / top2[0].abs().clamp_min(1)).numpy().astype(np.float32), out_hw)
        assert differ.sum() <= 3 and (margin[differ] < 1e-5).all(), (differ.sum(), margin[differ])
def compare_with_old(features, first, settings, patch, out_hw, block_bytes=256 * 2**20):
    new_soft = list(propagate(iter(features), first, settings, block_bytes))
    old_soft = list(old_propagate(features, first, settings, block_bytes))
    assert len(new_soft) == len(old_soft) == len(features) - 1
    for n, o in zip(new_soft, old_soft):
        torch.testing.assert_close(n, o, rtol=1e-5, atol=1e-6)
        assert_same_ids_up_to_rounding(n, o, patch, out_hw, settings)
        # the output stage alone: the same ids bit for bit
        np.testing.assert_array_equal(label_image(o, patch, out_hw, settings), old_label_image(o, patch, out_hw, settings))


@pytest.mark.parametrize("name", ["dino", "crw", "cosettle"])
@pytest.mark.parametrize("t, h, w, d, channels", [(6, 3, 4, 5, 2), (10, 7, 9, 16, 3), (12, 12, 20, 32, 5), (5, 30, 52, 64, 4)])
def test_matches_previous_implementation(name, t, h, w, d, channels):
    gen = torch.Generator().manual_seed(h * 1000 + w)
    features = list(torch.randn(t, h, w, d, generator=gen))
    first = torch.softmax(3 * torch.randn(channels, h, w, generator=gen), dim=0)
    s = PRESETS[name]
    compare_with_old(features, first, s, 4, (h * 4 + 3, w * 4 - 1))
    if h * w <= 63:
        compare_with_old(features, first, s, 4, (h * 4, w * 4), block_bytes=1)


@pytest.mark.parametrize("name", ["dino", "crw"])
def test_matches_previous_implementation_with_many_ties(name):
    # features from {-1, 0, 1}^3: many sources share the exact same cosine with a target
    gen = torch.Generator().manual_seed(5)
    features = list(torch.randint(-1, 2, (8, 6, 7, 3), generator=gen).float() + 0.01 * torch.tensor([1.0, 0, 0]))
    first = torch.softmax(2 * torch.randn(3, 6, 7, generator=gen), dim=0)
    for topk in (1, 2, 5, 17):
        compare_with_old(features, first, replace(PRESETS[name], topk=topk, size_mask_neighborhood=2), 2, (12, 14))

