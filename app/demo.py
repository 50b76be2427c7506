"""``cosettle demo``: the whole pipeline on a synthetic world, with a randomly initialised backbone.

It writes training videos (mp4 files and JPEG frame folders) and a DAVIS-2017-layout evaluation set,
then runs extract -> train -> eval for the frozen baseline and for the trained projection, and
reports both side by side. Every stage resumes or reuses what a previous run left in ``out``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from cosettle.core.devices import resolve_device  # noqa: E402
from cosettle.eval.frame.analysis_report import analyse  # noqa: E402
from cosettle.eval.frame.propagation import preset  # noqa: E402
from cosettle.eval.frame.run import EvalConfig  # noqa: E402
from cosettle.eval.frame.synthetic import write_davis  # noqa: E402
from cosettle.eval.tasks.davis import evaluate_davis  # noqa: E402
from cosettle.eval.video.action_eval import ActionEvalConfig, evaluate_action  # noqa: E402
from cosettle.eval.video.clip_features import ClipProtocol  # noqa: E402
from cosettle.eval.video.synthetic import write_action_world  # noqa: E402
from cosettle.pipeline.backbones import load_backbone  # noqa: E402
from cosettle.pipeline.extract import ExtractConfig, extract  # noqa: E402
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder, write_video_file  # noqa: E402
from cosettle.trainer.config import TrainConfig  # noqa: E402
from cosettle.trainer.train import train  # noqa: E402
from cosettle.trainer.trained import load_trained  # noqa: E402

# (label, where it comes from, key) of the before/after table; higher is better for all but distances.
ROWS = (
    ("DAVIS J&F-Mean", "davis", "J&F-Mean"),
    ("DAVIS J-Mean", "davis", "J-Mean"),
    ("DAVIS F-Mean", "davis", "F-Mean"),
    ("cycle accuracy", "analysis", "cycle_accuracy"),
    ("intra-video distance (/diam@95)", "analysis", "intra_video_distance/diameter@95"),
    ("inter-video distance (/diam@95)", "analysis", "inter_video_distance/diameter@95"),
    ("actions kNN top-1 (UCF101 layout)", "actions", "top1"),
)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the synthetic world and of the three stages (defaults: about 5-10 min on 2 CPU cores)."""

    out: Path = Path("cosettle-demo")
    backbone: str = "dino_vitb"
    train_videos: int = 32
    train_frames: int = 24
    video_size: tuple[int, int] = (144, 192)
    views: int = 5
    eval_sequences: int = 4
    eval_frames: int = 16
    eval_objects: int = 3
    eval_short_side: int = 224
    analysis_videos: int = 6
    # The video-level row: a UCF101-layout world of motion-only action classes, kNN on mean-pooled clips.
    action_classes: int = 4
    action_train: int = 4  # videos per class
    action_test: int = 2
    action_frames: int = 16
    action_size: tuple[int, int] = (64, 64)  # H.264 frame sides stay multiples of 16
    clips: int = 2
    clip_frames: int = 4
    # The synthetic training set is tiny (160 samples), so the demo takes more, smaller steps than the
    # recipe's 5 epochs x 512: 20 epochs over the 5 stored views (each view seen 4 times), batch 4.
    epochs: int = 20
    batch_size: int = 4
    blr: float = 0.5
    seed: int = 0
    device: str = "auto"
    arch: dict | None = None  # a tiny architecture, for the test of the demo itself


def make_world(cfg: DemoConfig) -> tuple[Path, Path, Path]:
    """Training videos (half mp4, half frame folders), a DAVIS tree and an action world; kept if already there."""
    videos, davis, actions = cfg.out / "world" / "train_videos", cfg.out / "world" / "DAVIS", cfg.out / "world" / "actions"
    h, w = cfg.video_size
    if not (videos / ".complete").exists():
        for i in range(cfg.train_videos):
            frames, _ = moving_scene(cfg.train_frames, h, w, 1 + i % 3, seed=1000 + i)
            if i % 2:
                write_video_file(videos / f"clip{i:03d}.mp4", frames)
            else:
                write_frame_folder(videos / f"clip{i:03d}", frames)
        (videos / ".complete").touch()
    if not (davis / ".complete").exists():
        names = [f"demo-{i:02d}" for i in range(cfg.eval_sequences)]
        write_davis(davis, names, frames=cfg.eval_frames, height=h, width=w, objects=cfg.eval_objects, seed=2000)
        (davis / ".complete").touch()
    if not (actions / ".complete").exists():
        write_action_world(actions, classes=cfg.action_classes, train_per_class=cfg.action_train,
                           test_per_class=cfg.action_test, frames=cfg.action_frames, height=cfg.action_size[0], width=cfg.action_size[1], seed=3000)
        (actions / ".complete").touch()
    return videos, davis, actions


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage and return {"baseline": {...}, "cosettle": {...}} of the table's metrics."""
    out = Path(cfg.out)
    videos, davis, actions = make_world(cfg)
    store = out / "features.zarr"
    extract(ExtractConfig(videos=videos, out=store, backbone=cfg.backbone, weights="random", views=cfg.views,
                          seed=cfg.seed, device=cfg.device, resume=True, arch=cfg.arch, chunk_videos=8,
                          batch_size=16))
    run = out / "runs" / "cosettle"
    train(TrainConfig(features=(str(store),), out=str(run), epochs=cfg.epochs, batch_size=cfg.batch_size,
                      blr=cfg.blr, seed=cfg.seed, device=cfg.device, resume=True))

    settings = preset("dino", short_side=cfg.eval_short_side, multiple=16)
    base = EvalConfig(root=davis, out=out / "results" / "baseline", backbone=cfg.backbone, weights="random",
                      settings=settings, device=cfg.device, cache=out / "eval_cache.zarr", arch=cfg.arch)
    davis_scores = {
        "baseline": evaluate_davis(base),
        "cosettle": evaluate_davis(replace(base, out=out / "results" / "cosettle", projection=run)),
    }
    device = resolve_device(cfg.device)
    backbone = load_backbone(cfg.backbone, "random", device=device, arch=cfg.arch)
    projection, _ = load_trained(run, device)
    clips = sorted(p for p in videos.iterdir() if not p.name.startswith("."))[: cfg.analysis_videos]
    analysis = analyse(clips, backbone, projection, device)
    action = ActionEvalConfig(dataset="ucf101", root=actions / "videos", lists=actions / "splits",
                              out=out / "results" / "actions_baseline", backbone=cfg.backbone, weights="random",
                              task="knn", protocol=ClipProtocol(clips=cfg.clips, frames=cfg.clip_frames, pooling="mean"),
                              device=cfg.device, cache=out / "clip_cache.zarr", batch_size=16, arch=cfg.arch)
    actions_scores = {"baseline": evaluate_action(action),
                      "cosettle": evaluate_action(replace(action, out=out / "results" / "actions_cosettle", projection=run))}
    sources = {name: {"davis": davis_scores[name], "analysis": analysis[column], "actions": actions_scores[name]}
               for name, column in (("baseline", "baseline"), ("cosettle", "projection"))}
    results = {name: {label: float(src[where][key]) for label, where, key in ROWS} for name, src in sources.items()}
    (out / "demo_results.json").write_text(json.dumps({"config": _jsonable(cfg), "results": results}, indent=2) + "\n")
    plot_results(results, out / "demo.png")
    return results


def _jsonable(cfg: DemoConfig) -> dict:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    return d


def format_results(results: dict) -> str:
    """The before/after table as aligned text."""
    width = max(len(label) for label, _, _ in ROWS)
    lines = [f"{'':{width}}  {'frozen':>9}  {'+Co-Settle':>10}  {'change':>8}"]
    for label, _, _ in ROWS:
        b, c = results["baseline"][label], results["cosettle"][label]
        lines.append(f"{label:{width}}  {b:9.4f}  {c:10.4f}  {c - b:+8.4f}")
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> None:
    """Grouped bars, frozen vs +Co-Settle, one group per metric."""
    labels = [label for label, _, _ in ROWS]
    x = torch.arange(len(labels)).numpy()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(x - 0.2, [results["baseline"][k] for k in labels], 0.4, label="frozen backbone")
    ax.bar(x + 0.2, [results["cosettle"][k] for k in labels], 0.4, label="+ Co-Settle projection")
    ax.set_xticks(x, [k.replace(" (", "\n(") for k in labels], fontsize=8)
    ax.set_title("cosettle demo: synthetic videos, RANDOM-weight ViT (not paper numbers)")
    ax.set_ylim(0, 1.25 * max(max(r.values()) for r in results.values()))
    ax.legend(loc="upper right", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
