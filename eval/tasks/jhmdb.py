"""JHMDB pose propagation (CRW protocol): the 15 joints of frame 0 propagated as Gaussian label
maps, decoded per frame, scored with PCK at alpha 0.1 and 0.2 (0-1 scale).

Writes ``per_joint.csv``, ``summary.json`` and ``keypoints.npz`` (predicted [T, 15, 2] (x, y)
per video, NaN where invisible) into ``<out>``.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from cosettle.core.atomic import write_atomic, write_csv
from cosettle.eval.cli_options import CONTEXT, one_line_errors
from cosettle.eval.frame.datasets import DatasetError, Video, jhmdb_videos
from cosettle.eval.frame.features import FeatureSource
from cosettle.eval.frame.keypoints import decode_keypoints, joint_heatmaps, pck, pck_distances, read_jhmdb_joints
from cosettle.eval.frame.propagation import PropagationSettings, propagate
from cosettle.eval.frame.propagation_task import config_from_cli, propagation_options, propagation_task
from cosettle.eval.frame.run import EvalConfig, open_source, write_json, write_record
from cosettle.eval.task import REQUIRED, register

# The task's defaults (CRW's protocol: 320x320, aspect not kept).
DEFAULT_PRESET = "crw"
INPUT_SIZE = (320, 320)

JOINTS = ("neck", "belly", "face", "right shoulder", "left shoulder", "right hip", "left hip", "right elbow",
          "left elbow", "right knee", "left knee", "right wrist", "left wrist", "right ankle", "left ankle")
ALPHAS = (0.1, 0.2)


def predict_keypoints(video: Video, source: FeatureSource, settings: PropagationSettings) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, ground-truth) joints [T, 15, 2] of one video, T = its annotated frames.

    Frame 0's joints, scaled to the grid, become one Gaussian map per joint; every propagated
    map is decoded back to frame pixels (frame 0's own map is decoded the same way).
    """
    gt = read_jhmdb_joints(video.joints)
    if len(video.frames) < len(gt):
        raise DatasetError(f"{video.joints}: {len(gt)} annotated frames but {video.frames[0].parent} "
                           f"holds {len(video.frames)}")
    frames = source.features("jhmdb", video, num_frames=len(gt))
    f0 = next(frames)
    h, w = f0.shape[:2]
    src_h, src_w = source.backbone_features("jhmdb", video).attrs["source_hw"]
    first = joint_heatmaps(gt[0] * np.array([w / src_w, h / src_h]), (h, w))
    coords = [decode_keypoints(first, (src_h, src_w))]
    for soft in propagate(itertools.chain([f0], frames), torch.from_numpy(first).float(), settings):
        coords.append(decode_keypoints(soft, (src_h, src_w)))
    return np.stack(coords), gt


def per_joint_pck(preds: list[np.ndarray], gts: list[np.ndarray], alphas=ALPHAS) -> dict[str, np.ndarray]:
    """PCK of each joint [15] pooled over all scored frames of all videos, keyed "PCK@<alpha>"."""
    errors = np.concatenate([pck_distances(p, g) for p, g in zip(preds, gts)], axis=0)
    scored = ~np.isnan(errors)
    with np.errstate(invalid="ignore"):
        return {f"PCK@{a:g}": ((errors <= a) & scored).sum(0) / scored.sum(0) for a in alphas}


def evaluate_jhmdb(cfg: EvalConfig, split: Path, number: int = 1) -> dict:
    """Propagate the joints of every video of ``split`` (see :func:`datasets.jhmdb_split`), score PCK."""
    videos = jhmdb_videos(cfg.root, split, number)
    source, record = open_source(cfg)
    preds, gts = [], []
    for video in tqdm(videos, desc="JHMDB", unit="video", disable=None):
        pred, gt = predict_keypoints(video, source, cfg.settings)
        preds.append(pred)
        gts.append(gt)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    def save_keypoints(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a name, numpy would append ".npz" to it
            np.savez_compressed(f, **{v.name: p for v, p in zip(videos, preds)})

    write_atomic(out / "keypoints.npz", save_keypoints)
    joints = per_joint_pck(preds, gts)
    write_csv(out / "per_joint.csv", [["joint", *joints],
                                      *([name, *(float(joints[k][j]) for k in joints)] for j, name in enumerate(JOINTS))])
    # a joint never scored has no PCK (null in the JSON)
    per_joint = {k: {j: (float(x) if np.isfinite(x) else None) for j, x in zip(JOINTS, v)} for k, v in joints.items()}
    summary = {**pck(preds, gts, ALPHAS), "per_joint": per_joint,
               "videos": len(videos)}
    write_json(out / "summary.json", summary)
    write_record(out, "jhmdb", {**record, "split": str(Path(split).resolve()), "split_number": number}, summary)
    return summary


def format_table(summary: dict) -> str:
    """Per-joint PCK and the mean (PCK@0.1, PCK@0.2), 3 decimals."""
    keys = [f"PCK@{a:g}" for a in ALPHAS]
    width = max(len(j) for j in JOINTS + ("mean",))
    lines = [" " * width + "".join(k.rjust(10) for k in keys)]
    for j in JOINTS:
        values = [summary["per_joint"][k][j] for k in keys]
        lines.append(j.ljust(width) + "".join("n/a".rjust(10) if v is None else f"{v:10.3f}" for v in values))
    lines.append("mean".ljust(width) + "".join(f"{summary[k]:10.3f}" for k in keys))
    return "\n".join(lines)


@click.command(context_settings=CONTEXT)
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="JHMDB folder (Rename_Images/, joint_positions/).")
@click.option("--split", required=True, type=click.Path(exists=True, path_type=Path),
              help="Test list (class/video per line, e.g. data_manifests/jhmdb_split1_test.txt) or the official splits/ folder.")
@click.option("--split-number", default=1, type=click.IntRange(1, 3), help="With a splits/ folder: which split's test videos.")
@propagation_options
@one_line_errors
def command(**kw) -> None:
    """JHMDB pose propagation (CRW protocol, 320x320): PCK@0.1 and PCK@0.2 per joint and mean."""
    split, number = kw.pop("split"), kw.pop("split_number")
    summary = evaluate_jhmdb(config_from_cli(kw, DEFAULT_PRESET, {"size": INPUT_SIZE}), split, number)
    click.echo(format_table(summary))


register(propagation_task("jhmdb", "JHMDB pose propagation (PCK)", command, evaluate_jhmdb, DEFAULT_PRESET,
                          {"size": INPUT_SIZE}, {"split": REQUIRED}, ("split",)))
