"""Label propagation: each rule on hand-made cases, a loop-by-loop reference of the protocol text,
and ideal versus shuffled features on a synthetic moving-object video in the DAVIS layout."""
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cosettle.eval.frame.datasets import davis_videos
from cosettle.eval.frame.davis_score import score_davis
from cosettle.eval.frame.propagation import (
    PRESETS,
    first_frame_labels,
    label_image,
    preset,
    propagate,
    segment_video,
    window_mask,
)
from cosettle.eval.frame.synthetic import write_davis
from cosettle.eval.tasks.davis import predict_video

BASE = PRESETS["dino"]


def run(features, first, settings, **kw):
    """All soft maps of a video as numpy [C, h, w] (features [T, h, w, D], first [C, h, w])."""
    feats = [torch.as_tensor(f, dtype=torch.float32) for f in features]
    return [y.numpy() for y in propagate(feats, torch.as_tensor(first, dtype=torch.float32), settings, **kw)]


def reference(features, first, s):
    """The protocol, one target cell and one source at a time, in float64."""
    def unit(f):
        return f / np.linalg.norm(f, axis=-1, keepdims=True)

    t_frames, h, w, _ = features.shape
    r, f0 = s.size_mask_neighborhood, unit(features[0])
    queue = [(f0, first)] * s.n_last_frames if s.pad_first else []
    outputs = []
    for t in range(1, t_frames):
        q = unit(features[t])
        context = [(f0, first, True)] + [(f, y, False) for f, y in queue]
        y_t = np.zeros_like(first)
        for i in range(h):
            for j in range(w):
                candidates = []
                for f, y, is_first in context:
                    for a in range(h):
                        for b in range(w):
                            if r > 0 and (s.window_first or not is_first):
                                dy, dx = abs(a - i), abs(b - j)
                                inside = max(dy, dx) <= r if s.window == "square" else dy * dy + dx * dx < r * r
                                if not inside:
                                    continue
                            candidates.append((math.exp(float(q[i, j] @ f[a, b]) / s.temperature), y[:, a, b]))
                weights = sorted((c[0] for c in candidates), reverse=True)
                kth = weights[min(s.topk, len(weights)) - 1]
                kept = [(wt, lab) for wt, lab in candidates if wt >= kth]
                y_t[:, i, j] = sum(wt * lab for wt, lab in kept) / sum(wt for wt, _ in kept)
        queue.append((q, y_t))
        if len(queue) > s.n_last_frames:
            queue.pop(0)
        outputs.append(y_t)
    return outputs


@pytest.mark.parametrize("settings", [
    replace(BASE, n_last_frames=2, size_mask_neighborhood=1, topk=3),
    replace(BASE, n_last_frames=3, size_mask_neighborhood=2, topk=4, temperature=0.05, window="disk",
            window_first=False, pad_first=True),
    replace(BASE, n_last_frames=0, size_mask_neighborhood=0, topk=1),
    replace(BASE, n_last_frames=4, size_mask_neighborhood=1, topk=40, window="disk"),
])
def test_matches_loop_reference(settings):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 3, 4, 5))
    first = rng.dirichlet(np.ones(3), size=(3, 4)).transpose(2, 0, 1)
    expected = reference(features, first, settings)
    got = run(features, first, settings)
    tiny_blocks = run(features, first, settings, block_bytes=1)  # one target cell per block
    assert len(got) == len(expected) == 5
    for e, g, b in zip(expected, got, tiny_blocks):
        np.testing.assert_allclose(g, e, atol=1e-5)
        np.testing.assert_allclose(b, e, atol=1e-5)


def test_square_window_applies_to_frame_zero():
    # 1 x 4 grid, identical features: each target cell averages the one-hot labels of its window
    features = np.ones((2, 1, 4, 3))
    first = np.eye(4).reshape(4, 1, 4)
    s = replace(BASE, size_mask_neighborhood=1, topk=100)
    (y,) = run(features, first, s)
    expected = np.array([[1 / 2, 1 / 2, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0], [0, 1 / 3, 1 / 3, 1 / 3], [0, 0, 1 / 2, 1 / 2]])
    np.testing.assert_allclose(y[:, 0, :].T, expected, atol=1e-6)
    (y,) = run(features, first, replace(s, window_first=False))
    np.testing.assert_allclose(y[:, 0, :], np.full((4, 4), 0.25), atol=1e-6)


def test_window_shapes():
    centre = torch.tensor([2 * 5 + 2])  # cell (2, 2) of a 5 x 5 grid
    square = window_mask(centre, 5, 5, 1, "square")[0].reshape(5, 5).numpy()
    assert square.sum() == 9 and square[1:4, 1:4].all()
    disk = window_mask(centre, 5, 5, 2, "disk")[0].reshape(5, 5).numpy()
    # dy^2 + dx^2 < 4: the 3 x 3 block; (0, +-2) and (+-2, 0) lie exactly on the circle and are out
    assert disk.sum() == 9 and disk[1:4, 1:4].all()
    corner = window_mask(torch.tensor([0]), 5, 5, 2, "square")[0].reshape(5, 5).numpy()
    assert corner.sum() == 9 and corner[:3, :3].all()


def test_topk_keeps_the_k_best_and_renormalises():
    # frame 0 cells at angles 0, 0.5, 1.0 rad; every target cell points at angle 0
    angles = np.array([0.0, 0.5, 1.0])
    f0 = np.stack([np.cos(angles), np.sin(angles)], axis=-1)[None]  # [1, 3, 2]
    f1 = np.tile([1.0, 0.0], (1, 3, 1))
    first = np.eye(3).reshape(3, 1, 3)
    (y,) = run(np.stack([f0, f1]), first, replace(BASE, size_mask_neighborhood=0, topk=2, temperature=0.1))
    w0, w1 = math.exp(1 / 0.1), math.exp(math.cos(0.5) / 0.1)
    expected = np.array([w0, w1, 0.0]) / (w0 + w1)
    for cell in range(3):
        np.testing.assert_allclose(y[:, 0, cell], expected, atol=1e-6)


def window_average(y):
    """Mean of each cell's |dx| <= 1 neighbours on a 1 x w grid, per channel."""
    w = y.shape[-1]
    out = np.empty_like(y)
    for i in range(w):
        out[..., i] = y[..., max(0, i - 1) : i + 2].mean(-1)
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_fifo_holds_frame_zero_and_the_last_n_predictions(n):
    # identical features: every context frame and window cell weighs the same, so frame t's map is
    # the mean over its context frames of their window-averaged maps
    frames = 9
    first = np.zeros((2, 1, 5))
    first[0, 0, 0] = first[1, 0, 1:] = 1
    got = run(np.ones((frames, 1, 5, 3)), first, replace(BASE, n_last_frames=n, size_mask_neighborhood=1, topk=1000))
    maps = [first]
    for t in range(1, frames):
        context = [0] + list(range(max(1, t - n), t))
        maps.append(np.mean([window_average(maps[c]) for c in context], axis=0))
    for t in range(1, frames):
        np.testing.assert_allclose(got[t - 1], maps[t], atol=1e-6)


def test_fifo_length_changes_the_result():
    first = np.zeros((2, 1, 5))
    first[0, 0, 0] = first[1, 0, 1:] = 1
    feats = np.ones((9, 1, 5, 3))
    s = replace(BASE, size_mask_neighborhood=1, topk=1000)
    a, b = run(feats, first, replace(s, n_last_frames=2)), run(feats, first, replace(s, n_last_frames=4))
    assert not np.allclose(a[-1], b[-1])


def test_frame_zero_labels_outlive_the_fifo():
    # class 0 exists only in frame 0's cell 0; frames 1..5 look like class 1 everywhere, so the
    # FIFO holds class 1 only; frame 6's cell 0 matches frame 0's cell 0 again and must get class 0
    f_first = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    f_middle = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    features = np.stack([f_first] + [f_middle] * 5 + [f_first])
    first = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    y = run(features, first, replace(BASE, n_last_frames=2, size_mask_neighborhood=0, topk=1))
    np.testing.assert_allclose(y[0][:, 0, 0], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(y[-1][:, 0, 0], [1.0, 0.0], atol=1e-6)


def test_label_image_output_rules():
    soft = torch.tensor([[[0.5, 0.9]], [[0.4, 0.0]]])  # [C=2, h=1, w=2]
    # bilinear x2 of [a, b] is [a, .75a+.25b, .25a+.75b, b]; after min-max channel 0 is
    # [0, .25, .75, 1] and channel 1 [1, .75, .25, 0], argmax [1, 1, 0, 0]; PIL NEAREST 4 -> 6
    # samples source columns floor((x + .5) * 4 / 6) = 0, 1, 1, 2, 3, 3
    ids = label_image(soft, 2, (1, 6), BASE)
    np.testing.assert_array_equal(ids, [[1, 1, 1, 0, 0, 0]])
    # without min-max channel 0 wins everywhere
    np.testing.assert_array_equal(label_image(soft, 2, (1, 6), replace(BASE, minmax=False)), np.zeros((1, 6)))
    # straight to 6 columns: sources (x + .5) / 3 - .5 clamped = 0, 0, 1/3, 2/3, 1, 1
    ids = label_image(soft, 2, (1, 6), replace(BASE, upsample="original"))
    np.testing.assert_array_equal(ids, [[1, 1, 1, 0, 0, 0]])
    # a constant positive channel is 0/0 in DINO's norm_mask and wins torch's argmax everywhere
    const = torch.tensor([[[0.3, 0.3]], [[0.0, 1.0]]])
    np.testing.assert_array_equal(label_image(const, 2, (1, 4), BASE), np.zeros((1, 4)))


def test_first_frame_labels():
    ids = np.arange(16, dtype=np.uint8).reshape(4, 4) % 3
    ids[1, 1] = 255  # void counts as background
    labels = first_frame_labels(ids, (2, 2), "nearest").numpy()
    # PIL NEAREST 4 -> 2 samples pixels 1 and 3 of each axis: ids (1,1)=void, (1,3)=1, (3,1)=1, (3,3)=0
    assert labels.shape == (3, 2, 2)
    np.testing.assert_array_equal(labels.argmax(0), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(labels.sum(0), np.ones((2, 2)))
    soft = first_frame_labels(np.array([[0, 1], [1, 2]], np.uint8), (1, 1), "bilinear").numpy()
    np.testing.assert_allclose(soft[:, 0, 0], [0.25, 0.5, 0.25])


def test_input_sizes_and_presets():
    dino, crw, cos = PRESETS["dino"], PRESETS["crw"], PRESETS["cosettle"]
    assert dino.input_size(480, 854) == (480, 832)  # 854 -> 832, as DINO
    assert dino.input_size(480, 910) == (480, 896)  # bike-packing
    assert dino.input_size(480, 1152) == (480, 1152)  # shooting
    assert dino.input_size(854, 480) == (832, 480)
    assert crw.input_size(480, 854) == (480, 848)
    assert cos.input_size(480, 910) == (480, 880)
    assert (cos.topk, cos.size_mask_neighborhood, cos.n_last_frames) == (7, 30, 30)
    assert (dino.n_last_frames, dino.size_mask_neighborhood, dino.topk, dino.temperature, dino.std[0]) == (7, 12, 5, 0.1, 0.228)
    s = preset("dino", topk=3, temperature=None, std=[0.229, 0.224, 0.225])
    assert (s.topk, s.temperature, s.std) == (3, 0.1, (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="unknown propagation setting"):
        preset("dino", top_k=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("stm")
    with pytest.raises(ValueError, match="topk"):
        preset("dino", topk=0)


def test_grid_mismatch_is_an_error():
    feats = [torch.ones(2, 3, 4), torch.ones(2, 2, 4)]
    with pytest.raises(ValueError, match="grid"):
        list(propagate(feats, torch.ones(1, 2, 3), BASE))


# -- ideal features on a moving-object video in the DAVIS layout ------------------------------------

PATCH = 4


def ideal_features(masks: np.ndarray, objects: int) -> list[torch.Tensor]:
    """Per cell, the fraction of the patch covered by each id: features that encode identity."""
    onehot = F.one_hot(torch.from_numpy(masks.astype(np.int64)), objects + 1).permute(0, 3, 1, 2).float()
    return list(F.avg_pool2d(onehot, PATCH).permute(0, 2, 3, 1))


def shuffled(features: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for f in features:
        h, w, d = f.shape
        out.append(f.reshape(h * w, d)[torch.randperm(h * w, generator=gen)].reshape(h, w, d))
    return out


@pytest.fixture(scope="module")
def moving_davis(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("davis")
    masks = write_davis(root, ["orbit", "drift"], frames=12, height=96, width=160, objects=2, seed=3)
    return root, masks


def score_with(root: Path, masks: dict, out: Path, transform) -> dict:
    settings = replace(BASE, size_mask_neighborhood=4)
    for video in davis_videos(root):
        feats = transform(ideal_features(masks[video.name], 2))
        predict_video(video, feats, settings, PATCH, out / "predictions" / video.name)
    return score_davis(root, out / "predictions")


def test_ideal_features_track_the_objects(moving_davis, tmp_path):
    root, masks = moving_davis
    ideal = score_with(root, masks, tmp_path / "ideal", lambda f: f)
    mixed = score_with(root, masks, tmp_path / "shuffled", lambda f: [f[0]] + shuffled(f[1:]))
    assert ideal["J-Mean"] > 0.9
    assert mixed["J-Mean"] < 0.3


def test_segment_video_sizes(moving_davis):
    root, masks = moving_davis
    m = masks["orbit"]
    out = list(segment_video(ideal_features(m, 2)[:3], m[0], BASE, PATCH, [(50, 80), (96, 160)]))
    assert [o.shape for o in out] == [(50, 80), (96, 160)] and all(o.dtype == np.uint8 for o in out)
    assert max(o.max() for o in out) <= m[0].max()


@pytest.mark.parametrize("tied", [2, 4, 10])
def test_ties_at_the_kth_weight_are_all_kept(tied):
    # frame 0 on a 1 x (tied + 2) grid: cell 0 at angle 0, cells 1..tied all at angle 0.3 (the same
    # cosine with the target, exactly), the last cell at angle 1.0; every target cell points at 0.
    # topk = 2: the k-th weight is the tied one, so cell 0 and all tied cells are kept
    n = tied + 2
    angles = np.array([0.0] + [0.3] * tied + [1.0])
    f0 = np.stack([np.cos(angles), np.sin(angles)], axis=-1)[None]  # [1, n, 2]
    f1 = np.tile([1.0, 0.0], (1, n, 1))
    first = np.eye(n).reshape(n, 1, n)
    s = replace(BASE, size_mask_neighborhood=0, topk=2, temperature=0.1)
    (y,) = run(np.stack([f0, f1]), first, s)
    w0, w1 = math.exp(1 / 0.1), math.exp(math.cos(0.3) / 0.1)
    expected = np.array([w0] + [w1] * tied + [0.0]) / (w0 + tied * w1)
    for cell in range(n):
        np.testing.assert_allclose(y[:, 0, cell], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(y, reference(np.stack([f0, f1]), first, s)[0], rtol=1e-5, atol=1e-7)
    # the same tie run through frame 0 and FIFO frames together, with a window
    feats = np.stack([f0, f1, f0])
    expected_all = reference(feats, first, replace(s, size_mask_neighborhood=3, n_last_frames=2))
    got = run(feats, first, replace(s, size_mask_neighborhood=3, n_last_frames=2))
    for e, g in zip(expected_all, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


def test_tie_at_kth_with_fewer_sources_than_k():
    # a 1 x 3 grid with a radius-1 window: corner targets see 2 sources per frame, topk = 5 exceeds
    # them; masked sources weigh 0 and the rule still averages the sources in the window
    features = np.ones((3, 1, 3, 2))
    first = np.eye(3).reshape(3, 1, 3)
    s = replace(BASE, size_mask_neighborhood=1, topk=5, n_last_frames=1)
    for e, g in zip(reference(features, first, s), run(features, first, s)):
        np.testing.assert_allclose(g, e, atol=1e-6)
