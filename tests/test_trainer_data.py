"""Chunk-aware reading: plans, rank assignment, skipped rows, exact batches, one read per chunk."""
import numpy as np
import pytest

from cosettle.pipeline.store import open_store
from cosettle.trainer.data import ChunkReader, batches_per_epoch, chunk_table, epoch_plan, rank_chunks
from cosettle.trainer.synthetic import write_synthetic_store

INVALID = (3, 17, 30)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "s.zarr"
    # 45 videos in blocks of 8: the last block is short, as real stores' are.
    write_synthetic_store(path, num_videos=45, views=3, grid=4, dim=8, chunk_videos=8, invalid=INVALID)
    return open_store(path)


def test_chunk_table_skips_invalid_rows(store):
    chunks = chunk_table([store])
    assert len(chunks) == 6
    rows = sorted(c.block * 8 + r for c in chunks for r in c.rows.tolist())
    assert rows == [v for v in range(45) if v not in INVALID]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_read_disjoint_chunks_covering_the_epoch(world):
    for epoch in range(3):
        parts = [rank_chunks(10, epoch, seed=0, rank=r, world=world) for r in range(world)]
        together = np.concatenate(parts)
        assert sorted(together.tolist()) == list(range(10))  # every chunk once, on exactly one rank
    orders = [rank_chunks(10, e, seed=0, rank=0, world=1).tolist() for e in range(3)]
    assert orders[0] != orders[1] != orders[2]  # a fresh chunk order every epoch
    assert rank_chunks(10, 1, seed=0, rank=0, world=1).tolist() == orders[1]  # and a reproducible one
    assert rank_chunks(10, 1, seed=1, rank=0, world=1).tolist() != orders[1]


@pytest.mark.parametrize("world,batch", [(1, 4), (1, 7), (2, 5)])
def test_plan_uses_each_valid_row_at_most_once(store, world, batch):
    chunks = chunk_table([store])
    n = batches_per_epoch(chunks, epochs=3, seed=0, world=world, batch_size=batch)
    for epoch in range(3):
        plans = [epoch_plan(chunks, epoch, 0, r, world, batch, shuffle_chunks=2) for r in range(world)]
        for r, plan in enumerate(plans):
            assert plan.shape[1:] == (batch, 2) and len(plan) >= n
            mine = set(rank_chunks(len(chunks), epoch, 0, r, world).tolist())
            assert set(plan[:, :, 0].ravel().tolist()) <= mine
            assert (np.diff(plan[:, :, 0], axis=1) >= 0).all()  # each chunk's rows are one slice of a batch
        pairs = np.concatenate([p.reshape(-1, 2) for p in plans])
        videos = [chunks[c].block * 8 + row for c, row in pairs.tolist()]
        assert len(set(videos)) == len(videos)
        assert not set(videos) & set(INVALID)
        # Only the final partial batch of each rank is dropped.
        per_rank = [sum(len(chunks[c].rows) for c in rank_chunks(len(chunks), epoch, 0, r, world)) for r in range(world)]
        assert [len(p) for p in plans] == [k // batch for k in per_rank]
    assert epoch_plan(chunks, 1, 0, 0, world, batch, 2).tolist() == epoch_plan(chunks, 1, 0, 0, world, batch, 2).tolist()


def test_shuffle_mixes_chunks_within_a_window(store):
    chunks = chunk_table([store])
    plan = epoch_plan(chunks, 0, 0, 0, 1, 6, shuffle_chunks=3)
    first = plan[0, :, 0]
    assert len(set(first.tolist())) > 1  # a batch draws from several chunks, not one chunk in row order
    window = set(rank_chunks(len(chunks), 0, 0, 0, 1)[:3].tolist())
    assert set(first.tolist()) <= window


def test_reader_yields_the_planned_rows_of_the_epoch_view_reading_each_chunk_once(store):
    chunks = chunk_table([store])
    reader = ChunkReader([store], chunks, window=1, io_threads=2)
    reads = []
    original = reader.read_chunk
    reader.read_chunk = lambda c, v: reads.append((c, v)) or original(c, v)
    plan = epoch_plan(chunks, 2, 0, 0, 1, 5, shuffle_chunks=2)
    view = 2
    got = list(reader.batches(plan, view))
    assert len(got) == len(plan)
    full = {name: store.array(name)[view] for name in ("a", "b", "a_asy")}
    for batch, ids in zip(got, plan):
        rows = [chunks[c].block * 8 + r for c, r in ids.tolist()]
        for name in full:
            assert np.array_equal(batch[name].numpy(), full[name][rows])
    assert sorted(c for c, _ in reads) == sorted(set(plan[:, :, 0].ravel().tolist()))  # whole chunks, once each
    assert {v for _, v in reads} == {view}


def test_reader_starts_mid_plan_and_stops_cleanly(store):
    chunks = chunk_table([store])
    reader = ChunkReader([store], chunks, window=1, io_threads=2)
    plan = epoch_plan(chunks, 0, 0, 0, 1, 4, shuffle_chunks=2)
    full = list(reader.batches(plan, 0))
    tail = list(reader.batches(plan, 0, start=5))
    assert len(tail) == len(full) - 5
    for x, y in zip(full[5:], tail):
        assert all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)
    gen = reader.batches(plan, 0)
    next(gen)
    gen.close()  # the consumer leaving early must not leave the producer blocked


def test_reader_passes_read_errors_to_the_consumer(store):
    chunks = chunk_table([store])
    reader = ChunkReader([store], chunks, window=2)

    def broken(c, v):
        raise OSError(f"chunk {c} unreadable")

    reader.read_chunk = broken
    with pytest.raises(OSError, match="unreadable"):
        list(reader.batches(epoch_plan(chunks, 0, 0, 0, 1, 4, 2), 0))
