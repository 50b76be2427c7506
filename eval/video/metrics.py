"""Video-level scores of frozen video vectors (UCF101, HMDB51): retrieval Recall@k, weighted kNN,
linear probe, and the top-k accuracy they share with zero-shot classification.

Every function takes one vector per video (numpy array or torch tensor, rows = videos) and integer
class ids, L2-normalises the vectors itself, and returns fractions on a 0-1 scale.

Ties are never a win: wherever a score or similarity ties with the true class (or with the best
same-class gallery item), the tied competitor is ranked ahead. Exact ties are rare with real
features, but this keeps the scores deterministic and stops a class with no kNN votes at all
(score 0, tied with most others) from counting as a top-5 hit by sort order alone.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Half-decade steps, 1e-3 .. 1e3. The lower end sits below the usual 1e-2 because the probe
# standardises: per dimension its inputs are ~sqrt(768) = 28x larger than raw unit vectors, so the
# same fit needs 28x smaller weights, i.e. a ~800x smaller C (on synthetic 101-class UCF-sized
# data the best C was 1e-2, with 1e-3 close behind).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 3, 13))
DEFAULT_BLOCK = 1024  # query rows per similarity block: 1024 x 10k float32 is 40 MB


def _features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [videos, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not t.is_floating_point():
        t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    return t


def _labels(y, name: str, rows: int, rows_name: str) -> torch.Tensor:
    t = torch.as_tensor(y)
    if t.ndim != 1 or t.shape[0] != rows:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {rows_name} has {rows} rows")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    if rows and int(t.min()) < 0:
        raise ValueError(f"{name} has a negative class id ({int(t.min())})")
    return t.long()


def _same_dim(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{b_name} has dim {b.shape[1]} but {a_name} has dim {a.shape[1]}")


def _ks(ks: Sequence[int], name: str = "ks") -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"{name} must be positive integers, got {ks}")
    return tuple(int(k) for k in ks)


def _dtype(*xs: torch.Tensor) -> torch.dtype:
    # float64 inputs stay float64 (exact tests); anything else (fp16 stores included) runs in float32
    return torch.float64 if all(x.dtype == torch.float64 for x in xs) else torch.float32


def _unit(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return F.normalize(x.to(device=device, dtype=dtype), dim=1)


def _ahead(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, how many other classes score >= the true class (0 = a strict top-1 hit)."""
    true = scores.gather(1, labels[:, None])
    return (scores >= true).sum(1) - 1


def topk_accuracy(scores, labels, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose true class is among the k highest of ``scores`` [N, C], for each k.

    Keys "top1", "top5", ...; k larger than C is clamped to C. A class scoring the same as the
    true class is ranked ahead of it (a tie is never a win).
    """
    s = torch.as_tensor(scores)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"scores must be 2-D [rows, classes], got shape {tuple(s.shape)}")
    if bool(torch.isnan(s).any()):
        raise ValueError("scores has NaN values")
    y = _labels(labels, "labels", s.shape[0], "scores")
    if s.shape[0] and int(y.max()) >= s.shape[1]:
        raise ValueError(f"labels has class id {int(y.max())} but scores has {s.shape[1]} columns")
    ks = _ks(ks)
    ahead = _ahead(s, y.to(s.device))
    n = max(s.shape[0], 1)
    return {f"top{k}": int((ahead < min(k, s.shape[1])).sum()) / n for k in ks}


def recall_at_k(queries, query_labels, gallery, gallery_labels, ks: Sequence[int] = (1, 5, 10, 20, 50), *,
                block_size: int = DEFAULT_BLOCK, device: str | torch.device = "cpu") -> dict[str, float]:
    """Video retrieval Recall@k as in VCOP and its successors (queries = test split, gallery = train).

    Vectors are L2-normalised and ranked by cosine similarity; a query counts at k when ANY of its
    k nearest gallery items has the query's class. Keys "R@1", "R@5", ...; a k larger than the
    gallery is clamped to the gallery size (so it asks whether the class is in the gallery at
    all). A different-class item tied with the best same-class item ranks ahead of it. No item is
    excluded as the query itself: pass disjoint splits.
    """
    q = _features(queries, "queries")
    g = _features(gallery, "gallery")
    _same_dim(q, "queries", g, "gallery")
    ql = _labels(query_labels, "query_labels", q.shape[0], "queries")
    gl = _labels(gallery_labels, "gallery_labels", g.shape[0], "gallery")
    ks = _ks(ks)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device, dtype = torch.device(device), _dtype(q, g)
    g, gl = _unit(g, device, dtype), gl.to(device)
    # The rank of the first same-class item answers every k at once, so no top-k and no sort.
    ahead = torch.empty(q.shape[0], dtype=torch.long)
    for lo in range(0, q.shape[0], block_size):
        sim = _unit(q[lo : lo + block_size], device, dtype) @ g.T
        same = ql[lo : lo + block_size, None].to(device) == gl[None]
        best = sim.masked_fill(~same, -math.inf).amax(1, keepdim=True)  # -inf: class not in gallery
        ahead[lo : lo + block_size] = ((sim >= best) & ~same).sum(1).cpu()
    return {f"R@{k}": int((ahead < min(k, g.shape[0])).sum()) / q.shape[0] for k in ks}


def knn_classify(train, train_labels, test, test_labels, num_classes: int, k: int = 20, temperature: float = 0.07,
                 *, block_size: int = DEFAULT_BLOCK, device: str | torch.device = "cpu") -> dict[str, float]:
    """Weighted kNN top-1 / top-5 of DINO's ``knn_classifier`` (eval_knn.py), as used by SVT.

    L2-normalise, take the k most cosine-similar train vectors of each test vector, weight each by
    exp(sim / temperature), sum the weights per class; the classes ranked by summed weight are the
    prediction. "top5" is the true class among the min(5, num_classes) best. k larger than the
    train split is clamped. Ties between neighbours at rank k go as ``torch.topk`` breaks them (as
    in DINO); a class tied with the true class ranks ahead of it.
    """
    tr = _features(train, "train")
    te = _features(test, "test")
    _same_dim(tr, "train", te, "test")
    trl = _labels(train_labels, "train_labels", tr.shape[0], "train")
    tel = _labels(test_labels, "test_labels", te.shape[0], "test")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for y, name in ((trl, "train_labels"), (tel, "test_labels")):
        if int(y.max()) >= num_classes:
            raise ValueError(f"{name} has class id {int(y.max())} >= num_classes {num_classes}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device, dtype = torch.device(device), _dtype(tr, te)
    tr, trl = _unit(tr, device, dtype), trl.to(device)
    k = min(int(k), tr.shape[0])
    top_n = min(5, num_classes)
    ahead = torch.empty(te.shape[0], dtype=torch.long)
    for lo in range(0, te.shape[0], block_size):
        sim, idx = (_unit(te[lo : lo + block_size], device, dtype) @ tr.T).topk(k, dim=1)
        # Dividing every weight of a row by its largest (exp(max / T)) keeps a small T from
        # overflowing float32 and leaves the class ranking as DINO's.
        weight = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype, device=device)
        votes.scatter_add_(1, trl[idx], weight)
        ahead[lo : lo + block_size] = _ahead(votes, tel[lo : lo + block_size].to(device)).cpu()
    n = te.shape[0]
    return {"top1": int((ahead < 1).sum()) / n, "top5": int((ahead < top_n).sum()) / n}


def _split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the training split; stratified whenever that is possible."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_val = min(max(int(round(val_fraction * n)), 1), n - 1)
    counts = np.bincount(y)
    n_cls = int((counts > 0).sum())
    stratify = counts[counts > 0].min() >= 2 and n_val >= n_cls and n - n_val >= n_cls
    fit, val = train_test_split(np.arange(n), test_size=n_val, random_state=seed,
                                stratify=y if stratify else None)
    return np.sort(fit), np.sort(val)


def linear_probe(train, train_labels, test, test_labels, *, cs: Sequence[float] = DEFAULT_CS,
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000) -> dict:
    """Logistic-regression probe on frozen, L2-normalised video vectors; C chosen on train data only.

    Solver: scikit-learn ``LogisticRegression`` (lbfgs, L2 penalty; multinomial softmax for more
    than two classes, the logistic loss for two). After L2 normalisation each feature is
    standardised with the mean / std of the rows being fitted, as the BatchNorm-without-affine of
    MAE-style linear probes: frozen ViT features are anisotropic, and standardising gives lbfgs a
    well-conditioned problem and makes the C grid less dependent on each backbone's feature scale.

    Each C of ``cs`` is fitted on a held-out split of the TRAINING rows (``val_fraction`` of them
    for validation; stratified when every class has >= 2 rows and each part can hold every class,
    else a seeded random split) and scored by validation top-1; the best C (ties: the smallest,
    i.e. the most regularised) is refitted on the whole training split and scored on the test
    split. Test classes absent from training can never be predicted.

    Returns "top1", "top5" (top-min(5, classes)), "C", "val_top1" (f"{C:.6g}" -> accuracy) and
    "converged" (False when some fit stopped at ``max_iter``; the ConvergenceWarning is silenced).
    """
    # scikit-learn is imported here so that retrieval and kNN users do not pay for it
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr = _features(train, "train")
    te = _features(test, "test")
    _same_dim(tr, "train", te, "test")
    ytr = _labels(train_labels, "train_labels", tr.shape[0], "train").cpu().numpy()
    yte = _labels(test_labels, "test_labels", te.shape[0], "test").cpu().numpy()
    cs = tuple(float(c) for c in cs)
    if not cs or not all(math.isfinite(c) and c > 0 for c in cs):
        raise ValueError(f"cs must be finite values > 0, got {cs}")
    keys = [f"{c:.6g}" for c in cs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"cs has duplicate values: {keys}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if len(np.unique(ytr)) < 2:
        raise ValueError("train_labels has a single class; a linear probe needs at least two")
    xtr = F.normalize(tr.cpu().double(), dim=1).numpy()
    xte = F.normalize(te.cpu().double(), dim=1).numpy()
    fit_rows, val_rows = _split(ytr, val_fraction, seed)
    if len(np.unique(ytr[fit_rows])) < 2:
        raise ValueError("train_labels: the fitting part of the validation split has a single class; "
                         "lower val_fraction or change seed")

    converged = True

    def fit(x: np.ndarray, y: np.ndarray, c: float):
        nonlocal converged
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
        converged &= bool(np.all(model[-1].n_iter_ < max_iter))
        return model

    val_top1 = {}
    for key, c in zip(keys, cs):
        model = fit(xtr[fit_rows], ytr[fit_rows], c)
        val_top1[key] = float(np.mean(model.predict(xtr[val_rows]) == ytr[val_rows]))
    best = max(range(len(cs)), key=lambda i: (val_top1[keys[i]], -cs[i]))

    model = fit(xtr, ytr, cs[best])
    num_classes = int(max(ytr.max(), yte.max())) + 1
    scores = np.full((len(yte), num_classes), -1.0)  # below any probability: unseen classes lose
    scores[:, model[-1].classes_] = model.predict_proba(xte)
    acc = topk_accuracy(scores, yte, ks=(1, 5))
    return {"top1": acc["top1"], "top5": acc["top5"], "C": cs[best], "val_top1": val_top1, "converged": converged}
