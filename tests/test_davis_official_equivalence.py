"""Our J and F against an independent reference computed the way davis2017-evaluation does it
(metrics.py): boundaries dilated by cv2.dilate with a skimage.morphology.disk footprint of radius
ceil(bound_th * ||shape||). Random and structured masks, DAVIS frame sizes included."""
import cv2
import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import disk

from cosettle.eval.frame.davis_metrics import bound_pixels, f_measure, jaccard

DAVIS_SIZES = [(480, 854), (480, 910), (480, 1152)]  # radii 8, 9, 10
THRESHOLDS = [0.008, 0.02, 0.05, 1, 2, 3, 5]


def official_radius(shape, bound_th):
    """The tool's dilation radius: bound_th itself from 1 up, else ceil(bound_th * norm(shape))."""
    return bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(shape))


def official_boundary(mask):
    """seg2bmap: a pixel differing from its east, south or south-east neighbour.

    Padding with a copy of the last row and column makes the neighbours beyond the image equal to
    the pixel itself, which is the tool's rule: last row compares east only, last column south
    only, and the bottom-right pixel never is a boundary.
    """
    s = np.asarray(mask, bool)
    padded = np.pad(s, ((0, 1), (0, 1)), mode="edge")
    return (s != padded[:-1, 1:]) | (s != padded[1:, :-1]) | (s != padded[1:, 1:])


def official_f(gt, pred, void, bound_th):
    """F as the tool computes it: cv2.dilate of each uint8 boundary by disk(radius), then P, R, F."""
    keep = np.ones_like(gt) if void is None else ~void
    gt_b, pred_b = official_boundary(gt & keep), official_boundary(pred & keep)
    footprint = disk(official_radius(gt.shape, bound_th)).astype(np.uint8)
    gt_dil = cv2.dilate(gt_b.astype(np.uint8), footprint)
    pred_dil = cv2.dilate(pred_b.astype(np.uint8), footprint)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    # (prediction boundary empty, ground-truth boundary empty) -> (precision, recall)
    empty_rules = {(True, False): (1.0, 0.0), (False, True): (0.0, 1.0), (True, True): (1.0, 1.0)}
    if (n_pred == 0, n_gt == 0) in empty_rules:
        precision, recall = empty_rules[(n_pred == 0, n_gt == 0)]
    else:
        precision = float(np.sum(pred_b * gt_dil)) / n_pred
        recall = float(np.sum(gt_b * pred_dil)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def official_j(gt, pred, void):
    """Jaccard over non-void pixels, 1 when that union is empty."""
    keep = np.ones_like(gt) if void is None else ~void
    union = np.sum((gt | pred) & keep)
    return 1.0 if union == 0 else np.sum(gt & pred & keep) / union


def blob(rng, shape, sigma=None, fill=None):
    """A smooth random region: thresholded Gaussian-filtered noise."""
    sigma = rng.uniform(1, max(shape) / 8 + 1) if sigma is None else sigma
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1 - (rng.uniform(0.05, 0.6) if fill is None else fill))


def shifted(mask, dy, dx):
    """The mask moved by (dy, dx), zero-filled (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    dy, dx = int(np.clip(dy, -h, h)), int(np.clip(dx, -w, w))
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def perturbed(rng, gt, radius):
    """A prediction near ``gt``: shifted around the match radius, grown, shrunk, noisy or unrelated."""
    kind = rng.integers(5)
    if kind == 0:
        r = int(radius)
        return shifted(gt, *rng.integers(-r - 2, r + 3, size=2))
    if kind == 1:
        return ndimage.binary_dilation(gt, iterations=int(rng.integers(1, 4)))
    if kind == 2:
        return ndimage.binary_erosion(gt, iterations=int(rng.integers(1, 4)))
    if kind == 3:
        return gt ^ (rng.random(gt.shape) < 0.03)
    return blob(rng, gt.shape)


def thin(rng, shape):
    """One-pixel structures: lines, a diagonal, scattered pixels or a checkerboard patch."""
    h, w = shape
    mask = np.zeros(shape, bool)
    kind = rng.integers(4)
    if kind == 0:
        mask[rng.integers(h, size=3), :] = True
        mask[:, rng.integers(w, size=3)] = True
    elif kind == 1:
        k = int(rng.integers(-h + 1, w))
        mask |= np.eye(h, w, k, dtype=bool) | np.fliplr(np.eye(h, w, k // 2, dtype=bool))
    elif kind == 2:
        mask = rng.random(shape) < rng.uniform(0.005, 0.3)
    else:
        yy, xx = np.indices(shape)
        mask = ((yy + xx) % 2 == 0) & (yy < h // 2) & (xx < w // 2)
    return mask


def at_far_edges(rng, shape):
    """Masks touching the last row and/or column, where the boundary rule is special."""
    h, w = shape
    mask = np.zeros(shape, bool)
    kind = rng.integers(5)
    if kind == 0:
        mask[rng.integers(h):, rng.integers(w):] = True  # bottom-right block
    elif kind == 1:
        mask[-rng.integers(1, 3):, :] = True  # bottom rows
    elif kind == 2:
        mask[:, -rng.integers(1, 3):] = True  # right columns
    elif kind == 3:
        mask[-1, -1] = True  # the corner pixel alone
    else:
        mask = blob(rng, shape) & ~blob(rng, shape, fill=0.3)
        mask[-1, :] |= rng.random(w) < 0.5
        mask[:, -1] |= rng.random(h) < 0.5
    return mask


def maybe_void(rng, shape):
    """None half of the time, else a random rectangle of void pixels."""
    if rng.random() < 0.5:
        return None
    h, w = shape
    top, left = rng.integers(h), rng.integers(w)
    void = np.zeros(shape, bool)
    void[top:top + rng.integers(1, h + 1), left:left + rng.integers(1, w + 1)] = True
    return void


def small_shape(rng):
    return tuple(int(n) for n in rng.integers(1, 90, size=2))


def blob_cases(rng):
    for _ in range(120):
        shape, bound_th = small_shape(rng), THRESHOLDS[rng.integers(len(THRESHOLDS))]
        gt = blob(rng, shape)
        yield gt, perturbed(rng, gt, official_radius(shape, bound_th)), maybe_void(rng, shape), bound_th


def thin_cases(rng):
    for _ in range(80):
        shape, bound_th = small_shape(rng), THRESHOLDS[rng.integers(len(THRESHOLDS))]
        gt = thin(rng, shape)
        pred = thin(rng, shape) if rng.random() < 0.5 else perturbed(rng, gt, official_radius(shape, bound_th))
        yield gt, pred, maybe_void(rng, shape), bound_th


def edge_cases(rng):
    for _ in range(80):
        shape, bound_th = small_shape(rng), THRESHOLDS[rng.integers(len(THRESHOLDS))]
        gt = at_far_edges(rng, shape)
        pred = at_far_edges(rng, shape) if rng.random() < 0.5 else perturbed(rng, gt, official_radius(shape, bound_th))
        yield gt, pred, maybe_void(rng, shape), bound_th


def empty_cases(rng):
    for shape in [(1, 1), (1, 7), (7, 1), (6, 9), (480, 854)]:
        empty, full = np.zeros(shape, bool), np.ones(shape, bool)
        some = at_far_edges(rng, shape) if min(shape) > 1 else rng.random(shape) < 0.5
        for gt, pred in [(empty, empty), (empty, some), (some, empty), (full, full), (full, empty),
                         (empty, full), (full, some), (some, some)]:
            for void in [None, full, some]:
                yield gt, pred, void, 0.008


def davis_size_cases(rng):
    for shape in DAVIS_SIZES:
        r = int(official_radius(shape, 0.008))
        gt = blob(rng, shape, sigma=20, fill=0.15)
        for dy, dx in [(0, r - 1), (r, 0), (0, r + 1), (r // 2, r // 2 + 2), (-r - 1, 1)]:
            yield gt, shifted(gt, dy, dx), None, 0.008
        yield gt, at_far_edges(rng, shape), None, 0.008
        yield thin(rng, shape), thin(rng, shape), None, 0.008
        yield gt, perturbed(rng, gt, r), maybe_void(rng, shape), 0.008
    yield blob(rng, (854, 480), sigma=15), blob(rng, (854, 480), sigma=15), None, 0.008  # portrait


FAMILIES = {"blobs": blob_cases, "thin": thin_cases, "far edges": edge_cases, "empty": empty_cases,
            "davis sizes": davis_size_cases}


@pytest.mark.parametrize("family", FAMILIES)
def test_j_and_f_equal_the_official_recipe(family):
    rng = np.random.default_rng(sorted(FAMILIES).index(family))
    mismatches, count = [], 0
    for i, (gt, pred, void, bound_th) in enumerate(FAMILIES[family](rng)):
        count += 1
        ours = (jaccard(gt, pred, void), f_measure(gt, pred, void, bound_th=bound_th))
        official = (official_j(gt, pred, void), official_f(gt, pred, void, bound_th))
        if not np.allclose(ours, official, rtol=0, atol=1e-12):
            mismatches.append(f"case {i} {gt.shape} bound_th={bound_th} void={void is not None}: "
                              f"ours J,F={ours}, official J,F={official}")
    assert count >= 20  # the family really produced cases
    assert not mismatches, "\n".join(mismatches)


def test_bound_pixels_equals_the_official_radius_on_many_shapes():
    rng = np.random.default_rng(0)
    shapes = [(int(h), int(w)) for h, w in rng.integers(1, 2000, size=(3000, 2))] + DAVIS_SIZES
    for bound_th in [0.008, 0.001, 0.0125, 0.05, 1, 4]:
        ours = [bound_pixels(h, w, bound_th) for h, w in shapes]
        official = [float(official_radius((h, w), bound_th)) for h, w in shapes]
        assert ours == official, bound_th
