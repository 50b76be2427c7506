"""Process-group setup for torchrun (one process per GPU; gloo on CPU) and the few collectives used."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes, and its rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """This process's place in the torchrun world (a single process without its variables)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def join(world: World, device: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs); a no-op for a single process."""
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier(world: World) -> None:
    """Wait for every rank; a no-op for a single process."""
    if world.size > 1:
        dist.barrier()


def mean_across(world: World, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks."""
    if world.size == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world.size).tolist()))


def close(world: World) -> None:
    """Leave the process group; a no-op for a single process."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
