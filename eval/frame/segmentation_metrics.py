"""VIP semantic part propagation: class names, confusion matrix and mean IoU."""
from __future__ import annotations

import numpy as np

VIP_CLASSES = (
    "background", "hat", "hair", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
    "gloves", "scarf", "skirt", "torso-skin", "face", "right-arm", "left-arm", "right-leg",
    "left-leg", "right-shoe", "left-shoe",
)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int = 20) -> np.ndarray:
    """int64 [C, C] pixel counts, rows = ground-truth class, columns = predicted class.

    Pixels whose ground truth lies outside [0, C) are ignored; a counted pixel predicted outside
    [0, C) is an error. Sum the matrices of all frames and videos before :func:`miou`.
    """
    gt, pred = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has {gt.size} pixels but prediction {pred.size}")
    counted = (gt >= 0) & (gt < num_classes)
    gt, pred = gt[counted].astype(np.int64), pred[counted].astype(np.int64)
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted class outside [0, {num_classes}): {pred.min()}..{pred.max()}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(conf: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-class IoU [C], mean IoU): IoU_c = TP / (GT_c + Pred_c - TP), NaN for a class absent
    from both ground truth and prediction; the mean skips NaN classes."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (conf.sum(1) + conf.sum(0) - tp)
    return iou, float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")
