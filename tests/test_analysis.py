"""Analysis metrics on tiny tensors whose answers can be worked out by hand."""
import math

import numpy as np
import pytest
import torch

from cosettle.eval.frame.analysis import (
    cycle_accuracy,
    diameter,
    effective_rank,
    inter_video_distance,
    intra_video_distance,
)


def test_diameter_percentiles():
    feats = np.array([[-1.0, 5.0], [1.0, 5.0], [-3.0, 5.0], [3.0, 5.0]])  # centre (0, 5), radii 1 1 3 3
    assert diameter(feats, 100) == pytest.approx(6.0)
    assert diameter(feats, 90) == pytest.approx(6.0)  # position 2.7 of [1, 1, 3, 3]
    assert diameter(feats, 50) == pytest.approx(4.0)  # halfway between 1 and 3
    assert diameter(torch.tensor(feats), 60) == pytest.approx(2 * (1 + 0.8 * 2))  # position 1.8


def test_inter_video_distance():
    constant = np.stack([np.full((6, 3), float(i)) for i in range(3)])  # video i: every patch (i, i, i)
    # pairs (0,1), (0,2), (1,2): distances sqrt(3) * (1, 2, 1) whatever the positions
    assert inter_video_distance(constant, num_positions=4) == pytest.approx(math.sqrt(3) * 4 / 3)
    two = np.array([[[0.0], [0.0]], [[1.0], [3.0]]])
    assert inter_video_distance(two, num_positions=2) == pytest.approx(2.0)  # (1 + 3) / 2
    with pytest.raises(ValueError, match="8 positions of 6 patches"):
        inter_video_distance(constant)
    with pytest.raises(ValueError, match="at least 2 videos"):
        inter_video_distance(two[:1], num_positions=2)


def test_intra_video_distance_identical_frames_is_zero():
    frame = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert intra_video_distance(frame.expand(10, 16, 8)) == pytest.approx(0.0, abs=1e-6)


def test_intra_video_distance_uses_frames_3_to_t_minus_4():
    feats = np.full((9, 2, 1), 1000.0)  # frames outside 3..5 are far away and must not count
    feats[3, :, 0] = [0, 10]
    feats[4, :, 0] = [1, 13]  # nearest distances 1 and 3, smallest half -> 1
    feats[5, :, 0] = [3, 15]  # from frame 4: 2 and 2 -> 2
    assert intra_video_distance(feats) == pytest.approx((1 + 2) / 2)
    with pytest.raises(ValueError, match="at least 8 frames"):
        intra_video_distance(feats[:7])


def test_effective_rank():
    assert effective_rank(np.eye(4, 6)) == pytest.approx(1.0)  # 4 equal singular values
    assert effective_rank(np.eye(4, 6)[[0, 0, 1, 1]]) == pytest.approx(2 / 4)  # two equal ones
    scaled = np.array([[1.0, 0.0], [0.0, 3.0]])  # s = (3, 1) -> p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(scaled) == pytest.approx(math.exp(entropy) / 2)


BLOCKS = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]  # 2x2 blocks of a 4x4 grid


def frame_from_blocks(block_vectors):
    """[16, D] patches of a 4x4 grid whose 2x2 block b holds block_vectors[b] in every patch."""
    frame = np.zeros((16, len(block_vectors[0])))
    for block, vector in zip(BLOCKS, block_vectors):
        frame[block] = vector
    return frame


def test_cycle_accuracy_identical_frames():
    frame = frame_from_blocks(np.eye(4))
    assert cycle_accuracy(np.stack([frame] * 10)) == 1.0
    assert cycle_accuracy(np.stack([frame * 100] * 10)) == 1.0


def test_cycle_accuracy_collapsed_frame_uses_floor_of_fraction():
    frames = np.stack([frame_from_blocks(np.eye(4))] * 10)
    frames[4] = frame_from_blocks([np.eye(4)[0]] * 4)  # every node of frame 4 is node 0
    # pair (0.25, 0.4) of 10 frames is (2, 4): every walk ends on node 0, only node 0 is right
    assert cycle_accuracy(frames, pairs=((0.25, 0.4),)) == pytest.approx(0.25)
    assert cycle_accuracy(frames, pairs=((0.25, 0.4), (0.5, 0.6))) == pytest.approx((0.25 + 1) / 2)


def test_cycle_accuracy_normalises_patches_before_pooling():
    eye = np.eye(4)
    a = frame_from_blocks(eye)
    a[[0, 1, 4]] = eye[0]
    a[5] = 10 * eye[1]  # block 0: three e0 patches and one long e1 patch
    b = frame_from_blocks(eye)
    # normalised then pooled, node 0 of a is 0.75 e0 + 0.25 e1 and every walk returns (accuracy 1);
    # pooled first it would lean to e1 and node 1's walk would end on node 0 (accuracy 0.75)
    assert cycle_accuracy(np.stack([a, b]), pairs=((0.0, 0.5),)) == 1.0


def test_cycle_accuracy_needs_a_square_grid():
    with pytest.raises(ValueError, match="square grid"):
        cycle_accuracy(np.ones((4, 12, 3)))
