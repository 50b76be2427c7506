"""Chunk-aware reading of cached tokens: whole chunks, seeded shuffles, background prefetch.

An epoch's order is a pure function of (seed, epoch, rank, world size): the chunk order is
shuffled per epoch, rank r takes every world-th chunk of it (ranks never read the same chunk),
and windows of ``shuffle_chunks`` consecutive chunks are shuffled in memory (rows that do not
fill a batch carry over into the next window). The epoch's *plan* (the (chunk, row) pairs of
every batch) is computed without reading tokens, so a resumed run skips straight to its step
and reads only the chunks it still needs. Rows whose ``valid`` flag is False never enter a plan.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cosettle.core.errors import first_line
from cosettle.pipeline.store import FeatureStore, StoreError

_DONE = object()


@dataclass(frozen=True)
class Chunk:
    """One block of one store: ``rows`` are its valid rows, as offsets inside the block."""

    store: int
    block: int
    rows: np.ndarray


def chunk_table(stores: list[FeatureStore]) -> list[Chunk]:
    """Every chunk of every store, stores in the given order."""
    table = []
    for index, store in enumerate(stores):
        valid = store.valid()
        for block in range(store.num_blocks):
            lo, hi = store.block_rows(block)
            table.append(Chunk(index, block, np.flatnonzero(valid[lo:hi])))
    return table


def rank_chunks(num_chunks: int, epoch: int, seed: int, rank: int, world: int) -> np.ndarray:
    """Chunk ids rank ``rank`` reads in ``epoch``, in reading order (disjoint across ranks)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_chunks)
    return order[rank::world]


def batches_per_epoch(chunks: list[Chunk], epochs: int, seed: int, world: int, batch_size: int) -> int:
    """Batches every rank can fill in every epoch (DDP ranks must take the same number of steps)."""
    sizes = np.array([len(c.rows) for c in chunks])
    return int(min(
        sizes[rank_chunks(len(chunks), e, seed, r, world)].sum() // batch_size
        for e in range(epochs) for r in range(world)
    ))


def epoch_plan(chunks: list[Chunk], epoch: int, seed: int, rank: int, world: int,
               batch_size: int, shuffle_chunks: int) -> np.ndarray:
    """The (chunk id, row) pairs of every batch this rank takes in ``epoch``: int64 [n, batch, 2]."""
    rng = np.random.default_rng([seed, epoch, rank, 1])
    mine = rank_chunks(len(chunks), epoch, seed, rank, world)
    carry = np.empty((0, 2), dtype=np.int64)
    batches = [np.empty((0, batch_size, 2), dtype=np.int64)]
    for w in range(0, len(mine), shuffle_chunks):
        pool = [carry] + [np.stack([np.full(len(chunks[c].rows), c), chunks[c].rows], axis=1)
                          for c in mine[w : w + shuffle_chunks]]
        pool = np.concatenate(pool).astype(np.int64)
        pool = pool[rng.permutation(len(pool))]
        full = len(pool) // batch_size * batch_size
        batches.append(pool[:full].reshape(-1, batch_size, 2))
        carry = pool[full:]
    plan = np.concatenate(batches)
    # Within a batch order is immaterial; sorted by (chunk, row), each chunk fills one slice of it.
    keys = plan[:, :, 0] * (1 + plan[:, :, 1].max(initial=0)) + plan[:, :, 1]
    return np.take_along_axis(plan, np.argsort(keys, axis=1)[:, :, None], axis=1)


class ChunkReader:
    """Yields the batches of a plan as tensors, reading whole chunks ahead on background threads.

    A producer thread walks the plan, keeps up to two shuffle windows of chunks being read or
    held (more when a batch needs them), so the next window is read while the current one is
    consumed; it assembles each batch from the chunks in memory, drops a chunk after its last
    row is used, and hands batches over through a bounded queue.
    """

    def __init__(self, stores: list[FeatureStore], chunks: list[Chunk], *, window: int, io_threads: int = 4,
                 prefetch_batches: int = 4, pin_memory: bool = False):
        self.stores = stores
        self.chunks = chunks
        self.arrays = [{name: s.array(name) for name in s.batch_arrays} for s in stores]
        self.io_threads = io_threads
        self.lookahead = 2 * window
        self.prefetch_batches = prefetch_batches
        self.pin_memory = pin_memory

    def read_chunk(self, chunk_id: int, view: int) -> dict[str, np.ndarray]:
        """All token arrays of one chunk at one view: name -> [rows in block, T, D]."""
        chunk = self.chunks[chunk_id]
        store = self.stores[chunk.store]
        lo, hi = store.block_rows(chunk.block)
        out = {}
        for name, arr in self.arrays[chunk.store].items():
            try:
                out[name] = arr[view, lo:hi]
            except (ValueError, RuntimeError, OSError) as e:  # zarr names the decode step that failed, not the file
                key = arr.metadata.encode_chunk_key((view, chunk.block) + (0,) * (arr.ndim - 2))
                raise StoreError(f"{store.path / name / key}: damaged chunk, cannot be read ({first_line(e)}); "
                                 "extract the store again") from None
        return out

    def batches(self, plan: np.ndarray, view: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``plan[start:]`` of store view ``view``: name -> tokens [batch, T, D]."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(plan[start:], view, q, stop), daemon=True)
        producer.start()
        try:
            while (item := q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            producer.join()

    def _produce(self, plan: np.ndarray, view: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            first_use: dict[int, int] = {}  # insertion order = the order the plan first needs chunks
            last_use: dict[int, int] = {}
            for i, batch in enumerate(plan):
                for c in np.unique(batch[:, 0]).tolist():
                    first_use.setdefault(c, i)
                    last_use[c] = i
            order = list(first_use)
            held: dict[int, Future] = {}
            nxt = 0
            with ThreadPoolExecutor(self.io_threads, thread_name_prefix="chunk-read") as pool:
                for i, batch in enumerate(plan):
                    while nxt < len(order) and (len(held) < self.lookahead or first_use[order[nxt]] <= i):
                        held[order[nxt]] = pool.submit(self.read_chunk, order[nxt], view)
                        nxt += 1
                    item = self._gather(batch, held)
                    for c in np.unique(batch[:, 0]).tolist():
                        if last_use[c] == i:
                            del held[c]
                    if not self._put(q, item, stop):
                        pool.shutdown(cancel_futures=True)
                        return
            self._put(q, _DONE, stop)
        except BaseException as e:  # handed to the consumer, which re-raises it in the training loop
            self._put(q, e, stop)

    def _gather(self, batch: np.ndarray, held: dict[int, Future]) -> dict[str, torch.Tensor]:
        """One batch from the chunks in memory; the plan sorts it by chunk, so one copy per slice."""
        cids, starts = np.unique(batch[:, 0], return_index=True)
        bounds = list(zip(cids.tolist(), starts.tolist(), starts[1:].tolist() + [len(batch)]))
        out = {}
        for name in self.arrays[0]:
            sample = held[bounds[0][0]].result()[name]
            buf = np.empty((len(batch),) + sample.shape[1:], dtype=sample.dtype)
            for c, lo, hi in bounds:
                np.take(held[c].result()[name], batch[lo:hi, 1], axis=0, out=buf[lo:hi])
            t = torch.from_numpy(buf)
            out[name] = t.pin_memory() if self.pin_memory else t
        return out

    @staticmethod
    def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
        """Put unless the consumer has gone away; True if the item was handed over."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
