"""The training loop, top to bottom: stores -> per-epoch plan -> projection -> objective -> AdamW.

``train(config)`` is what ``cosettle-train`` runs, in one process or one per GPU under torchrun.
Nothing here is random except through seeds: the data order is a function of (seed, epoch,
rank), the projection's init of the seed, and the torch RNG is reseeded from (seed, rank, step)
before every optimizer step, so a run resumed from a checkpoint continues exactly as an
uninterrupted one (checkpoints are taken between optimizer steps only).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cosettle.core.devices import resolve_device
from cosettle.core.provenance import environment, now_utc, sha256_file

from .compiled import check_compile, compile_loss
from .config import TrainConfig
from .data import ChunkReader, batches_per_epoch, chunk_table, epoch_plan
from .distributed import World, barrier, close, join, mean_across, world_from_env
from .objective import get_objective
from .run_dir import RunDir
from .run_log import RunLog
from .schedule import build_optimizer, lr_at, scaled_lr, set_lr
from .stores import open_stores, provenance


class TrainingError(Exception):
    """Training cannot go on; the message names the run or store and the problem."""


def pick_device(name: str) -> torch.device:
    """The training device; an explicit ``cuda`` without a GPU is an error, not a CPU fallback."""
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available")
    return resolve_device(name)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Torch seed for one optimizer step of one rank (randomness an objective may draw)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def run_identity(cfg: TrainConfig, stores, dim: int, world: World) -> dict:
    """What a resumed run must share with the run it continues."""
    ident = {"dim": dim, "world_size": world.size, "num_stores": len(stores)}
    ident |= {f"train.{k}": v for k, v in cfg.result_settings().items()}
    for i, s in enumerate(stores):
        ident |= {f"store{i}.{k}": v for k, v in s.settings.items()}
    return ident


def train(cfg: TrainConfig) -> dict | None:
    """Train a projection; returns the summary, or None when stopped early by ``max_steps``."""
    cfg.validate()
    device = pick_device(cfg.device)
    world = world_from_env()
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)  # before joining, so NCCL binds this rank to its own GPU
    join(world, device)
    try:
        with RunDir(cfg.out).writing() if world.main else nullcontext():  # one writer per run dir
            return _train(cfg, world, device)
    finally:
        close(world)


def _train(cfg: TrainConfig, world: World, device: torch.device) -> dict | None:
    amp = device.type == "cuda"  # fp16 autocast + gradient scaling as the release; fp32 on CPU
    if cfg.compile:
        check_compile(device)  # before anything is written: no run directory for a run that cannot start

    # -- data: the stores, their chunks, and how many steps every epoch has --------------------
    stores = open_stores(cfg.features)
    settings = stores[0].settings
    dim, views = settings["dim"], settings["views"]
    spec = get_objective(cfg.objective)
    layout = settings.get("layout", "views")  # stores made before clip stores existed are views stores
    if layout != spec.layout or settings.get("plan") != spec.plan:
        made = f"{layout} store" + (f" of the {settings.get('plan')} plan" if layout == "clips" else "")
        wanted = f"--layout {spec.layout}" + (f" --plan {spec.plan}" if spec.plan else "")
        raise TrainingError(f"{stores[0].path}: a {made}, but objective '{cfg.objective}' trains on stores "
                            f"made with cosettle-extract {wanted}")
    chunks = chunk_table(stores)
    micro_per_epoch = batches_per_epoch(chunks, cfg.epochs, cfg.seed, world.size, cfg.batch_size)
    steps_per_epoch = micro_per_epoch // cfg.accum_iter
    if steps_per_epoch == 0:
        valid = sum(len(c.rows) for c in chunks)
        raise TrainingError(f"{stores[0].path}: {valid} valid videos over {world.size} process(es) do not fill one "
                            f"step of --batch-size {cfg.batch_size} x --accum-iter {cfg.accum_iter}")
    # The release counts leftover micro-batches in its epoch fraction but drops their gradients;
    # here they are not run at all, and the fraction keeps the release's denominator.
    micro_run = steps_per_epoch * cfg.accum_iter
    total_steps = steps_per_epoch * cfg.epochs
    effective_batch = cfg.batch_size * cfg.accum_iter * world.size
    peak_lr = scaled_lr(cfg.blr, effective_batch)

    # -- the run directory: refuse what must not be touched, write the config ------------------
    run = RunDir(cfg.out)
    identity = run_identity(cfg, stores, dim, world)
    run.check(identity, resume=cfg.resume, overwrite=cfg.overwrite)
    barrier(world)  # every rank has looked before rank 0 changes anything
    if cfg.resume and run.finished:
        if world.main:
            print(f"{run.path}: already finished; nothing to resume")
        return run.summary()
    config = {
        "identity": identity, "train": cfg.as_dict(), "dim": dim, "grid": settings.get("grid"),
        "backbone": settings["backbone"], "weights_sha256": settings["weights_sha256"],
        "stores": provenance(stores), "world_size": world.size, "effective_batch": effective_batch,
        "lr": peak_lr, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "device": device.type, "amp": amp, "environment": environment(), "created": now_utc(),
    }
    if world.main:
        run.start(config, overwrite=cfg.overwrite)
        if cfg.epochs > views:
            print(f"note: {cfg.epochs} epochs over {views} stored views; epoch e reuses view e mod {views}")
    barrier(world)

    # -- the projection, its optimizer, and the checkpoint to resume from ---------------------
    projection = spec.build_model(settings, cfg.options, cfg.seed).to(device)
    optimizer = build_optimizer(projection, peak_lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    step = 0
    checkpoint = run.latest_checkpoint() if cfg.resume else None
    if checkpoint is not None:
        weights, state = run.load_checkpoint(checkpoint)
        projection.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if world.main:
            print(f"resuming {run.path} from {checkpoint.name} (step {step} of {total_steps})")
    elif cfg.resume and world.main:
        print(f"{run.path}: no checkpoint yet; starting from step 0")
    if world.main:
        run.truncate_metrics(step)
    log = RunLog(run) if world.main else None
    model = DistributedDataParallel(projection, device_ids=[device.index] if device.type == "cuda" else None) if world.size > 1 else projection
    objective = spec.build_loss(cfg.options)
    if cfg.compile:  # the loss function, not the module: state_dict keys stay those of the module
        objective = compile_loss(objective)
    reader = ChunkReader(stores, chunks, io_threads=cfg.io_threads, window=cfg.shuffle_chunks, pin_memory=amp)
    weights_meta = {"dim": str(dim), "objective": cfg.objective} | {k: str(v) for k, v in cfg.options.items()}

    def save_checkpoint() -> None:
        if world.main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
            run.save_checkpoint(step, projection.state_dict(), weights_meta | {"step": str(step)}, state)

    # -- the loop ------------------------------------------------------------------------------
    bar = tqdm(total=total_steps * effective_batch, initial=step * effective_batch, unit="sample",
               unit_scale=True, dynamic_ncols=True, disable=not world.main)
    started, start_step = time.perf_counter(), step
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        plan = epoch_plan(chunks, epoch, cfg.seed, world.rank, world.size, cfg.batch_size, cfg.shuffle_chunks)
        plan = plan[:micro_run]
        first = (step - epoch * steps_per_epoch) * cfg.accum_iter
        sums: dict[str, float] = {}
        tick = time.perf_counter()
        batches = reader.batches(plan, epoch % views, start=first)
        for i, batch in enumerate(batches, start=first):
            if i % cfg.accum_iter == 0:  # per-iteration schedule, as the release
                torch.manual_seed(step_seed(cfg.seed, world.rank, step))
                lr = lr_at(epoch + i / micro_per_epoch, peak_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
                set_lr(optimizer, lr)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            stepping = (i + 1) % cfg.accum_iter == 0
            with nullcontext() if stepping or world.size == 1 else model.no_sync():
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    out = objective(model, batch)
                scaler.scale(out["loss"] / cfg.accum_iter).backward()
            values = torch.stack([v.detach().float() for v in out.values()]).tolist()  # one device sync
            for k, v in zip(out, values):
                sums[k] = sums.get(k, 0.0) + v / cfg.accum_iter
            if not stepping:
                continue

            metrics, sums = mean_across(world, sums, device), {}
            if not math.isfinite(metrics["loss"]):
                kept = run.latest_checkpoint()
                raise TrainingError(f"{run.path}: non-finite loss ({metrics['loss']}) at epoch {epoch}, step {step + 1}; "
                                    f"stopped, last good checkpoint kept: {kept.name if kept else 'none'}")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            now = time.perf_counter()
            rate, tick = effective_batch / (now - tick), now
            bar.update(effective_batch)
            shown = {k: f"{v:.3f}" for k, v in metrics.items() if k.startswith("acc")}
            bar.set_postfix(epoch=epoch, loss=f"{metrics['loss']:.4f}", **dict(list(shown.items())[-1:]))
            epoch_end = step % steps_per_epoch == 0
            if world.main:
                log.step({"step": step, "epoch": epoch, "lr": lr, **metrics, "samples_per_s": rate})
                if epoch_end:  # before the checkpoint, so a resumed run never lacks a finished epoch
                    log.end_epoch(epoch, step)
            stopping = cfg.max_steps is not None and step >= cfg.max_steps and step < total_steps
            if epoch_end or stopping or step % cfg.checkpoint_every == 0:
                save_checkpoint()
            if stopping:
                batches.close()  # stops the reader's threads now rather than at garbage collection
                bar.close()
                barrier(world)
                if world.main:
                    log.plot()
                    print(f"stopped after step {step} of {total_steps}; continue with --resume")
                return None
    bar.close()

    # -- final outputs -------------------------------------------------------------------------
    wall = time.perf_counter() - started
    summary = None
    if world.main:
        final = run.save_final_weights(projection.state_dict(), weights_meta | {"step": str(step)})
        log.plot()
        summary = {
            "run": str(run.path), "steps": step, "epochs": cfg.epochs, "effective_batch": effective_batch,
            "lr": peak_lr, "final_epoch": log.epochs[-1], "weights": final.name,
            "weights_sha256": sha256_file(final), "session_wall_s": wall,
            "session_samples_per_s": (step - start_step) * effective_batch / wall, "finished": now_utc(),
        }
        run.write_summary(summary)
    barrier(world)
    return summary
