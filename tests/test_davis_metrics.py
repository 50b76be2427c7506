"""Official DAVIS measures on hand-made masks (expected values worked out by hand), plus F against
an explicit disk dilation of the official recipe on random masks."""
import math

import numpy as np
import pytest
from scipy import ndimage

from cosettle.eval.frame.davis_metrics import bound_pixels, boundary_map, db_statistics, f_measure, jaccard


def grid(text: str) -> np.ndarray:
    return np.array([[int(c) for c in row.split()] for row in text.strip().splitlines()], dtype=bool)


BOUNDARY_CASES = {
    "interior square": (
        """0 0 0 0 0
           0 1 1 0 0
           0 1 1 0 0
           0 0 0 0 0""",
        """1 1 1 0 0
           1 0 1 0 0
           1 1 1 0 0
           0 0 0 0 0"""),
    # touching the last row and column: the image edge itself is never a boundary
    "bottom-right block": (
        """0 0 0 0 0
           0 0 0 1 1
           0 0 0 1 1
           0 0 0 1 1""",
        """0 0 1 1 1
           0 0 1 0 0
           0 0 1 0 0
           0 0 1 0 0"""),
    "corner pixel": (
        """0 0 0 0 0
           0 0 0 0 0
           0 0 0 0 0
           0 0 0 0 1""",
        """0 0 0 0 0
           0 0 0 0 0
           0 0 0 1 1
           0 0 0 1 0"""),
    "origin pixel": (
        """1 0 0 0 0
           0 0 0 0 0
           0 0 0 0 0
           0 0 0 0 0""",
        """1 0 0 0 0
           0 0 0 0 0
           0 0 0 0 0
           0 0 0 0 0"""),
    "full": ("\n".join(["1 1 1 1 1"] * 4), "\n".join(["0 0 0 0 0"] * 4)),
}


@pytest.mark.parametrize("name", BOUNDARY_CASES)
def test_boundary_map_hand_cases(name):
    mask, expected = (grid(t) for t in BOUNDARY_CASES[name])
    np.testing.assert_array_equal(boundary_map(mask), expected)


def test_boundary_map_works_over_leading_axes():
    masks = np.stack([grid(BOUNDARY_CASES[n][0]) for n in ("interior square", "corner pixel")])
    expected = np.stack([grid(BOUNDARY_CASES[n][1]) for n in ("interior square", "corner pixel")])
    np.testing.assert_array_equal(boundary_map(masks), expected)


def test_jaccard_hand_values_and_void():
    gt = grid("""1 1 0
                 1 1 0
                 0 0 0""")
    pred = grid("""1 1 1
                   0 0 0
                   0 0 0""")
    assert jaccard(gt, pred) == pytest.approx(2 / 5)
    void = grid("""0 0 1
                   0 0 0
                   0 0 0""")
    assert jaccard(gt, pred, void) == pytest.approx(2 / 4)


def test_jaccard_empty_cases():
    empty, some = np.zeros((3, 4), bool), np.eye(3, 4, dtype=bool)
    assert jaccard(empty, empty) == 1.0
    assert jaccard(some, empty) == 0.0  # prediction empty
    assert jaccard(empty, some) == 0.0  # ground truth empty
    assert jaccard(some, some, void=some) == 1.0  # everything left is void


def test_bound_pixels():
    assert bound_pixels(480, 854) == 8  # ceil(0.008 * 979.6)
    assert bound_pixels(480, 910) == 9  # bike-packing: ceil(0.008 * 1028.8)
    assert bound_pixels(6, 6) == 1
    assert bound_pixels(480, 854, bound_th=3) == 3
    with pytest.raises(ValueError, match="whole"):
        bound_pixels(480, 854, bound_th=2.5)


def square(shape, top, left, size):
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_f_measure_shifted_square_radius_one():
    # gt ring = 3x3 block at (0..2, 0..2) minus its centre; pred ring shifted right by 2.
    # pred pixels within 1 of the gt ring: columns 2 and 3 except (1, 3) -> 5 of 8; same for recall.
    gt, pred = square((6, 6), 1, 1, 2), square((6, 6), 1, 3, 2)
    assert f_measure(gt, pred) == pytest.approx(5 / 8)  # default bound_th gives radius 1 on 6x6
    assert f_measure(gt, pred, bound_th=2) == pytest.approx(1.0)


def test_f_measure_uses_a_disk_not_a_square():
    # single pixels: boundaries are the 2x2 blocks ending at them; (3,3)->(2,2) is sqrt(2) > 1 away
    gt, pred = square((6, 6), 2, 2, 1), square((6, 6), 3, 3, 1)
    assert f_measure(gt, pred, bound_th=1) == pytest.approx(3 / 4)


def test_f_measure_radius_eight_on_a_davis_frame():
    gt = square((480, 854), 100, 200, 100)
    assert f_measure(gt, np.roll(gt, 8, axis=1)) == pytest.approx(1.0)  # every pixel within 8
    # shifted by 9, rings of 101x101 (400 pixels) at columns 199..299 and 208..308: matched are
    # 100 of each 101-pixel top/bottom row, 16 of the 99 left-column pixels (within 8 rows of the
    # other ring's top or bottom row) and none of the right column; by symmetry R = P.
    expected = (100 + 100 + 16) / 400
    assert f_measure(gt, np.roll(gt, 9, axis=1)) == pytest.approx(expected)


def test_f_measure_empty_cases():
    empty, some = np.zeros((6, 6), bool), square((6, 6), 1, 1, 2)
    assert f_measure(empty, empty) == 1.0  # both empty: P = R = 1
    assert f_measure(some, empty) == 0.0  # prediction empty: P = 1, R = 0
    assert f_measure(empty, some) == 0.0  # ground truth empty: P = 0, R = 1
    full = np.ones((6, 6), bool)
    assert f_measure(full, full) == 1.0  # full masks have empty boundaries
    assert f_measure(some, full) == 0.0


def test_f_measure_void_clears_predicted_boundary():
    gt = square((8, 8), 1, 1, 2)
    pred = gt | square((8, 8), 5, 5, 2)
    void = square((8, 8), 4, 4, 4)
    assert f_measure(gt, pred) < 1.0
    assert f_measure(gt, pred, void) == 1.0


def test_db_statistics_official_bins():
    values = np.array([1.0, 0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1])
    mean, recall, decay = db_statistics(values)
    assert mean == pytest.approx(4.3 / 8)
    assert recall == pytest.approx(4 / 8)
    # bins for 8 frames: 0..2, 2..4, 4..5, 5..7 (inclusive); decay = 0.9 - 0.2
    assert decay == pytest.approx(0.7)


def test_db_statistics_nan_frames():
    mean, recall, decay = db_statistics(np.array([1.0, np.nan, 0.0, 1.0]))
    assert mean == pytest.approx(2 / 3)
    assert recall == pytest.approx(0.5)  # the NaN frame is a miss
    assert decay == pytest.approx(1.0 - 0.5)  # bins 0..1 and 2..3


def test_db_statistics_single_frame():
    assert db_statistics(np.array([0.7])) == pytest.approx((0.7, 1.0, 0.0))
    assert math.isnan(db_statistics(np.array([np.nan]))[0])


def reference_f(gt, pred, radius):
    """The official recipe written out: dilate each boundary with an explicit disk footprint."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = x * x + y * y <= radius * radius
    gt_b, pred_b = boundary_map(gt), boundary_map(pred)
    n_gt, n_pred = gt_b.sum(), pred_b.sum()
    if n_gt == 0 or n_pred == 0:
        p, r = float(n_pred == 0), float(n_gt == 0)
    else:
        p = (pred_b & ndimage.binary_dilation(gt_b, structure=disk)).sum() / n_pred
        r = (gt_b & ndimage.binary_dilation(pred_b, structure=disk)).sum() / n_gt
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_f_measure_equals_disk_dilation_on_random_masks():
    rng = np.random.default_rng(0)
    for case in range(100):
        h, w = rng.integers(2, 40, size=2)
        gt = ndimage.binary_opening(rng.random((h, w)) < rng.random())
        pred = np.roll(gt, rng.integers(-6, 7), axis=1) ^ (rng.random((h, w)) < 0.05)
        radius = [1, 2, 3, 5][case % 4]
        assert f_measure(gt, pred, bound_th=radius) == pytest.approx(reference_f(gt, pred, radius), abs=1e-12)
