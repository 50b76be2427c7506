"""Video-level scores: Recall@k on hand-placed vectors (ranks worked out by hand), weighted kNN
against a plain loop over rows, linear probe on separable / random-label data, top-k accuracy
on a hand-made score matrix, and one-line errors for bad shapes."""
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cosettle.eval.video.metrics import _split, knn_classify, linear_probe, recall_at_k, topk_accuracy


def at_angles(degrees, norms=None) -> np.ndarray:
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    vec = np.stack([np.cos(rad), np.sin(rad)], 1)
    return vec if norms is None else vec * np.asarray(norms, dtype=np.float64)[:, None]


# ---------------------------------------------------------------- Recall@k

def test_recall_2d_tie_free_and_class_at_rank_3():
    # gallery at 0, 30, 60, 90, 180 degrees with classes 0 1 2 0 1; lengths differ so that raw dot
    # products would rank differently (q2: 10 * cos 70 > 2 * cos 40 puts g3 first)
    gallery = at_angles([0, 30, 60, 90, 180], norms=[1, 0.5, 2, 10, 3])
    gallery_labels = [0, 1, 2, 0, 1]
    # q0 at 5 deg (class 0): g0 first -> rank 1
    # q1 at 40 deg (class 2): g1 (10 deg) then g2 (20 deg) -> rank 2
    # q2 at 20 deg (class 2): g1 (10), g0 (20), g2 (40) -> its class first at rank 3
    queries = at_angles([5, 40, 20], norms=[1, 4, 0.1])
    got = recall_at_k(queries, [0, 2, 2], gallery, gallery_labels, ks=(1, 2, 3, 5, 10))
    assert got == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0, "R@5": 1.0, "R@10": 1.0})


def test_recall_3d_absent_class_tie_and_clamped_k():
    gallery = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=np.float64)
    gallery_labels = np.array([0, 1, 2, 1, 3])
    queries = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 1], [1, 2, 2]], dtype=np.float64)
    # a (class 2): cos .949 g0, .894 g3, .316 g1, .224 g4, 0 g2 -> rank 5
    # b (class 3): g4 has cos .949, the largest -> rank 1
    # c (class 4): no gallery item of class 4 -> never, not even at k = 50 (clamped to 5)
    # d (class 2): .943 g4, .707 g3, then g1 and g2 both 2/3; the tie goes against d -> rank 4
    query_labels = np.array([2, 3, 4, 2])
    expected = {"R@1": 1 / 4, "R@3": 1 / 4, "R@4": 2 / 4, "R@5": 3 / 4, "R@50": 3 / 4}
    for block_size in (1, 3, 1024):
        got = recall_at_k(queries, query_labels, gallery, gallery_labels, ks=(1, 3, 4, 5, 50), block_size=block_size)
        assert got == pytest.approx(expected)
    # the same in float32 torch tensors
    got = recall_at_k(torch.tensor(queries, dtype=torch.float32), torch.tensor(query_labels),
                      torch.tensor(gallery, dtype=torch.float32), torch.tensor(gallery_labels), ks=(1, 3, 4, 5, 50))
    assert got == pytest.approx(expected)


def test_recall_exact_tie_counts_against_the_query():
    # both gallery items are at 90 degrees from the query; the other class takes rank 1 either way
    query = at_angles([0])
    for gallery, labels in ((at_angles([90, -90]), [1, 0]), (at_angles([-90, 90]), [0, 1])):
        assert recall_at_k(query, [0], gallery, labels, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_recall_matches_a_plain_loop_on_random_vectors():
    rng = np.random.default_rng(3)
    gallery, queries = rng.standard_normal((40, 6)), rng.standard_normal((25, 6))
    gallery_labels, query_labels = rng.integers(0, 5, 40), rng.integers(0, 5, 25)
    ks = (1, 2, 5, 10)
    hits = dict.fromkeys(ks, 0)
    for q, y in zip(queries, query_labels):
        sims = [float(q @ g) / (np.linalg.norm(q) * np.linalg.norm(g)) for g in gallery]
        order = sorted(range(len(gallery)), key=lambda j: -sims[j])
        for k in ks:
            hits[k] += any(gallery_labels[j] == y for j in order[:k])
    got = recall_at_k(queries, query_labels, gallery, gallery_labels, ks=ks, block_size=7)
    assert got == pytest.approx({f"R@{k}": hits[k] / 25 for k in ks})
    assert 0 < got["R@1"] < got["R@10"] < 1


# ---------------------------------------------------------------- weighted kNN

def knn_loop(train, train_labels, test, test_labels, num_classes, k, temperature):
    """DINO's rule, one test row at a time, in plain Python."""
    top1 = top5 = 0
    for x, y in zip(test, test_labels):
        sims = [float(x @ t) / (np.linalg.norm(x) * np.linalg.norm(t)) for t in train]
        nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[train_labels[j]] += math.exp(sims[j] / temperature)
        ahead = sum(1 for c in range(num_classes) if c != y and votes[c] >= votes[y])
        top1 += ahead < 1
        top5 += ahead < min(5, num_classes)
    return {"top1": top1 / len(test), "top5": top5 / len(test)}


def clustered(rng, classes, per_class, dim, spread):
    means = rng.standard_normal((classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return means[labels] + spread * rng.standard_normal((len(labels), dim)), labels, means


def test_knn_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    train, train_labels, means = clustered(rng, 8, 15, 10, 1.2)  # 15 train vectors per class
    test_labels = rng.integers(0, 8, 60)
    test = means[test_labels] + 1.2 * rng.standard_normal((60, 10))
    by_temperature = {}
    for k in (5, 40):  # below and above the class size
        for temperature in (0.02, 0.07, 1.0):
            want = knn_loop(train, train_labels, test, test_labels, 8, k, temperature)
            got = knn_classify(train, train_labels, test, test_labels, 8, k=k, temperature=temperature, block_size=16)
            assert got == pytest.approx(want)
            got32 = knn_classify(train.astype(np.float32), train_labels, test.astype(np.float32), test_labels, 8,
                                 k=k, temperature=temperature)
            assert got32 == pytest.approx(want)
            by_temperature[k, temperature] = got["top1"]
    assert 0.2 < by_temperature[5, 0.07] < 1
    assert by_temperature[40, 0.02] != by_temperature[40, 1.0]
    # a tiny temperature leaves all the weight on the nearest neighbour: 1-NN whatever k (and the
    # weights, exp(1 / 0.001) unscaled, must not overflow)
    one_nn = knn_classify(train, train_labels, test, test_labels, 8, k=1)["top1"]
    assert knn_classify(train, train_labels, test, test_labels, 8, k=40, temperature=1e-3)["top1"] == one_nn
    assert one_nn != by_temperature[40, 1.0]


def test_knn_temperature_flips_a_hand_made_vote():
    # one class-0 neighbour at cos 0.99, two class-1 neighbours at cos 0.9, a far class-2 vector
    # T = 0.07: e^(0.99/0.07) = e^14.14 vs 2 e^(0.9/0.07) = 2 e^12.86 -> class 0 (ratio e^1.29 / 2 = 1.8)
    # T = 1:    e^0.99 = 2.69 vs 2 e^0.9 = 4.92 -> class 1
    s = math.sqrt(1 - 0.99**2), math.sqrt(1 - 0.9**2)
    train = np.array([[0.99, s[0], 0], [0.9, -s[1], 0], [0.9, 0, s[1]], [-1, 0, 0]])
    train_labels = [0, 1, 1, 2]
    query = np.array([[1.0, 0, 0]])
    assert knn_classify(train, train_labels, query, [0], 3, k=3, temperature=0.07)["top1"] == 1.0
    assert knn_classify(train, train_labels, query, [0], 3, k=3, temperature=1.0)["top1"] == 0.0
    assert knn_classify(train, train_labels, query, [1], 3, k=3, temperature=1.0)["top1"] == 1.0


def test_knn_unvoted_class_is_not_a_top5_hit_and_k_is_clamped():
    train = np.array([[1.0, 0], [0, 1.0]])
    # one neighbour, class 1; the true class 0 gets no vote and ties with 8 other empty classes
    assert knn_classify(train, [1, 2], [[1.0, 0.1]], [0], 10, k=1) == {"top1": 0.0, "top5": 0.0}
    # fewer than 5 classes: top5 is top-3, always a hit
    assert knn_classify(train, [1, 2], [[1.0, 0.1]], [0], 3, k=1) == {"top1": 0.0, "top5": 1.0}
    rng = np.random.default_rng(1)
    train, labels, _ = clustered(rng, 3, 4, 5, 1.0)
    test = rng.standard_normal((9, 5))
    test_labels = rng.integers(0, 3, 9)
    assert knn_classify(train, labels, test, test_labels, 3, k=500) == knn_classify(train, labels, test, test_labels, 3, k=12)


# ---------------------------------------------------------------- linear probe

def orthogonal_clusters(rng, classes, per_class, dim, spread):
    labels = np.repeat(np.arange(classes), per_class)
    return 4.0 * np.eye(dim)[labels] + spread * rng.standard_normal((len(labels), dim)), labels


def test_linear_probe_separable_clusters():
    rng = np.random.default_rng(0)
    train, train_labels = orthogonal_clusters(rng, 10, 20, 24, 0.5)
    test, test_labels = orthogonal_clusters(rng, 10, 10, 24, 0.5)
    got = linear_probe(train, train_labels, test, test_labels)
    assert got["top1"] >= 0.98 and got["top5"] == 1.0
    assert got["converged"]
    assert len(got["val_top1"]) == 13 and min(got["val_top1"].values()) == 1.0
    assert got["C"] == 1e-3  # every C ties on validation: the most regularised wins


def test_linear_probe_random_labels_is_near_chance():
    rng = np.random.default_rng(1)
    train, test = rng.standard_normal((300, 24)), rng.standard_normal((300, 24))
    got = linear_probe(train, rng.integers(0, 10, 300), test, rng.integers(0, 10, 300))
    assert got["top1"] < 0.2  # chance 0.1, sd 0.017 over 300 rows
    assert got["top5"] < 0.65  # chance 0.5


def test_linear_probe_chooses_c_without_looking_at_test_data():
    rng = np.random.default_rng(2)
    train, train_labels = orthogonal_clusters(rng, 6, 20, 30, 2.5)
    test, test_labels = orthogonal_clusters(rng, 6, 20, 30, 2.5)
    cs = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    base = linear_probe(train, train_labels, test, test_labels, cs=cs)
    assert len(set(base["val_top1"].values())) > 1  # the choice is not trivial
    best = max(base["val_top1"].values())
    assert base["C"] == min(c for c in cs if base["val_top1"][f"{c:.6g}"] == best)
    shuffled = linear_probe(train, train_labels, test, rng.permutation(test_labels), cs=cs)
    other_test = linear_probe(train, train_labels, rng.standard_normal(test.shape), test_labels, cs=cs)
    for run in (shuffled, other_test):
        assert run["C"] == base["C"] and run["val_top1"] == base["val_top1"]
    assert shuffled["top1"] < base["top1"] - 0.2
    # the reported scores are those of the chosen C refitted on the whole training split
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    model = make_pipeline(StandardScaler(), LogisticRegression(C=base["C"], max_iter=1000))
    model.fit(unit(train), train_labels)
    assert base["top1"] == pytest.approx(np.mean(model.predict(unit(test)) == test_labels))


def test_validation_split_is_stratified_when_possible():
    y = np.repeat(np.arange(5), 10)
    fit, val = _split(y, 0.2, seed=0)
    assert np.bincount(y[val]).tolist() == [2] * 5 and len(fit) == 40
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(50))
    y = np.concatenate([y, [5]])  # class 5 has one row: seeded random split
    fit, val = _split(y, 0.2, seed=0)
    assert len(val) == 10 and len(fit) == 41
    assert _split(y, 0.2, seed=0)[1].tolist() == val.tolist()
    got = linear_probe(*orthogonal_clusters(np.random.default_rng(4), 6, 8, 10, 0.5), *orthogonal_clusters(
        np.random.default_rng(5), 6, 4, 10, 0.5), cs=(0.1, 1.0))
    assert got["top1"] > 0.9


# ---------------------------------------------------------------- top-k accuracy

def test_topk_accuracy_hand_made_scores():
    scores = np.array([
        [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],  # true 3: first
        [0.8, 0.1, 0.7, 0.6, 0.5, 0.2],  # true 2: second
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # true 0: last (sixth)
        [0.4, 0.4, 0.1, 0.0, 0.0, 0.0],  # true 1: tied with class 0 -> second
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # true 5: tied with all -> sixth
    ])
    labels = [3, 2, 0, 1, 5]
    expected = {"top1": 1 / 5, "top2": 3 / 5, "top5": 3 / 5, "top10": 1.0}
    assert topk_accuracy(scores, labels, ks=(1, 2, 5, 10)) == pytest.approx(expected)
    assert topk_accuracy(torch.tensor(scores), torch.tensor(labels)) == pytest.approx({"top1": 0.2, "top5": 0.6})


# ---------------------------------------------------------------- errors

X4, X3 = np.ones((4, 3)), np.ones((3, 3))


@pytest.mark.parametrize("call, message", [
    (lambda: recall_at_k(X4, [0, 1, 2], X3, [0, 1, 2]), r"query_labels has shape \(3,\) but queries has 4 rows"),
    (lambda: recall_at_k(X4, [0] * 4, np.ones((3, 2)), [0, 1, 2]), "gallery has dim 2 but queries has dim 3"),
    (lambda: recall_at_k(np.ones(3), [0], X3, [0, 1, 2]), "queries must be 2-D"),
    (lambda: recall_at_k(X4, [0] * 4, X3, [0, 1]), "gallery_labels has shape"),
    (lambda: recall_at_k(X4, [0] * 4, X3, [0, 1, 2], ks=(0,)), "ks must be positive"),
    (lambda: recall_at_k(X4, [0.0] * 4, X3, [0, 1, 2]), "query_labels must hold integer"),
    (lambda: knn_classify(X4, [0, 1, 2], X3, [0, 1, 2], 3), "train_labels has shape"),
    (lambda: knn_classify(X4, [0] * 4, np.ones((3, 5)), [0, 1, 2], 3), "test has dim 5 but train has dim 3"),
    (lambda: knn_classify(X4, [0] * 4, X3, [0, 1, 3], 3), "test_labels has class id 3 >= num_classes 3"),
    (lambda: knn_classify(X4, [0] * 4, X3, [0, 1, 2], 3, k=0), "k must be"),
    (lambda: knn_classify(X4, [0] * 4, X3, [0, 1, 2], 3, temperature=0), "temperature must be"),
    (lambda: knn_classify(X4 * np.nan, [0] * 4, X3, [0, 1, 2], 3), "train has NaN"),
    (lambda: linear_probe(X4, [0, 1, 0, 1], X3, [0, 1]), "test_labels has shape"),
    (lambda: linear_probe(X4, [0, 1, 0, 1], np.ones((3, 4)), [0, 1, 0]), "test has dim 4 but train has dim 3"),
    (lambda: linear_probe(X4, [0, 1, 0, 1], X3, [0, 1, 0], val_fraction=1.0), "val_fraction"),
    (lambda: linear_probe(X4, [0, 0, 0, 0], X3, [0, 1, 0]), "single class"),
    (lambda: topk_accuracy(np.ones((3, 4)), [0, 1]), r"labels has shape \(2,\) but scores has 3 rows"),
    (lambda: topk_accuracy(np.ones(4), [0]), "scores must be 2-D"),
    (lambda: topk_accuracy(np.ones((2, 4)), [0, 4]), "labels has class id 4 but scores has 4 columns"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
