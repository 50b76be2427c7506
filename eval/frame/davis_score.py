"""Score DAVIS-2017 semi-supervised predictions (indexed PNGs) with the official J&F protocol.

Frames 1..N-2 of every sequence are scored for each object k = 1..K (K = largest id in the
first annotation; void 255 counts as background). Per-object statistics come from
:func:`db_statistics`; the global means pool all objects of all sequences, as the official tool.
Nothing is cached: every call reads and scores the files anew.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cosettle.core.atomic import write_atomic, write_csv
from cosettle.eval.frame.davis_metrics import db_statistics, f_measure, jaccard
from cosettle.eval.frame.palette import read_indexed_png

VOID = 255
STATISTICS = ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
SUMMARY_KEYS = ("J&F-Mean",) + STATISTICS


def read_split(root: Path, split: str = "val", year: str = "2017") -> list[str]:
    """Sequence names listed in ``root/ImageSets/<year>/<split>.txt``."""
    path = Path(root) / "ImageSets" / year / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: split list is empty")
    return names


def _frame_stems(root: Path, resolution: str, sequence: str) -> list[str]:
    """Frame names of a sequence (from its JPEG folder), each checked to have an annotation."""
    images = Path(root) / "JPEGImages" / resolution / sequence
    stems = sorted(p.stem for p in images.glob("*.jpg"))
    if not stems:
        raise FileNotFoundError(f"{images}: missing sequence {sequence!r} (no .jpg frames)")
    if len(stems) < 3:
        raise ValueError(f"{images}: sequence {sequence!r} has {len(stems)} frames, scoring needs at least 3")
    annotations = Path(root) / "Annotations" / resolution / sequence
    for stem in stems:
        if not (annotations / f"{stem}.png").is_file():
            raise FileNotFoundError(f"{annotations / f'{stem}.png'}: missing annotation of frame {stem}")
    return stems


def _read_prediction(path: Path, gt_path: Path, gt_shape: tuple[int, ...], num_objects: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing predicted frame")
    pred = read_indexed_png(path)
    if pred.shape != gt_shape:
        raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]} but ground truth "
                         f"{gt_path} is {gt_shape[1]}x{gt_shape[0]}")
    if pred.max() > num_objects:
        raise ValueError(f"{path}: predicted id {pred.max()} exceeds the {num_objects} object(s) of the first annotation")
    return pred


def score_sequence(root: Path, predictions: Path, sequence: str, resolution: str = "480p") -> tuple[np.ndarray, np.ndarray]:
    """Per-frame J and F of one sequence, each [K, N - 2] (objects x scored frames 1..N-2)."""
    stems = _frame_stems(root, resolution, sequence)
    annotations = Path(root) / "Annotations" / resolution / sequence
    pred_dir = Path(predictions) / sequence
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: missing predictions of sequence {sequence!r}")
    first = read_indexed_png(annotations / f"{stems[0]}.png")
    num_objects = int(np.where(first == VOID, 0, first).max())
    if num_objects == 0:
        raise ValueError(f"{annotations / f'{stems[0]}.png'}: first annotation holds no object")
    j = np.empty((num_objects, len(stems) - 2))
    f = np.empty_like(j)
    for t, stem in enumerate(stems[1:-1]):
        gt_path = annotations / f"{stem}.png"
        gt = read_indexed_png(gt_path)
        pred = _read_prediction(pred_dir / f"{stem}.png", gt_path, gt.shape, num_objects)
        # void (255) is never equal to an object id, so it falls to background as in the official tool
        for k in range(1, num_objects + 1):
            j[k - 1, t] = jaccard(gt == k, pred == k)
            f[k - 1, t] = f_measure(gt == k, pred == k)
    return j, f


def score_davis(root: Path, predictions: Path, out: Path | None = None, split: str = "val",
                year: str = "2017", resolution: str = "480p") -> dict:
    """J&F of ``predictions/<seq>/<frame>.png`` against ``root`` (a DAVIS folder), 0-1 scale.

    Returns {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}, each
    the mean over all objects of all sequences. With ``out``, writes ``summary.json``,
    ``per_object.csv`` and ``per_sequence.csv`` (means over each sequence's objects) there.
    """
    objects = []
    for sequence in tqdm(read_split(root, split, year), desc="J&F", unit="seq", disable=None):
        j, f = score_sequence(root, predictions, sequence, resolution)
        for k in range(j.shape[0]):
            values = db_statistics(j[k]) + db_statistics(f[k])
            objects.append({"sequence": sequence, "object": k + 1, **dict(zip(STATISTICS, values))})
    summary = _with_jf({name: float(np.mean([o[name] for o in objects])) for name in STATISTICS})
    if out is not None:
        _write(Path(out), summary, objects)
    return summary


def _with_jf(stats: dict) -> dict:
    return {"J&F-Mean": (stats["J-Mean"] + stats["F-Mean"]) / 2, **stats}


def _per_sequence(objects: list[dict]) -> list[dict]:
    rows = []
    for sequence in dict.fromkeys(o["sequence"] for o in objects):
        mine = [o for o in objects if o["sequence"] == sequence]
        stats = {name: float(np.mean([o[name] for o in mine])) for name in STATISTICS}
        rows.append({"sequence": sequence, "objects": len(mine), **_with_jf(stats)})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    write_csv(path, [list(rows[0]), *(list(r.values()) for r in rows)])


def _write(out: Path, summary: dict, objects: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    _write_csv(out / "per_object.csv", objects)
    _write_csv(out / "per_sequence.csv", _per_sequence(objects))


def format_table(summary: dict) -> str:
    """Two aligned lines (names, values with 3 decimals) of the global J&F measures."""
    widths = [max(len(name), 6) for name in SUMMARY_KEYS]
    header = "  ".join(name.rjust(w) for name, w in zip(SUMMARY_KEYS, widths))
    values = "  ".join(f"{summary[name]:.3f}".rjust(w) for name, w in zip(SUMMARY_KEYS, widths))
    return f"{header}\n{values}"
