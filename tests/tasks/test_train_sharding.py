"""Per-rank rows of the training index: equal, disjoint, reproducible, independent of chunks."""

from __future__ import annotations

import numpy as np
import pytest

from samclip.tasks.train_sharding import SHUFFLE_WINDOW_ROWS, RowAssignment, rank_batches

ROWS = 3001  # more than two shuffle windows per rank at 2 workers, and not a multiple of 2 or 3


def _index(rows: int) -> dict[str, np.ndarray]:
    positions = np.arange(rows, dtype=np.int64)
    return {"position": positions, "hash": np.array([f"{p:08x}" for p in positions], dtype=object)}


def _chunks(index: dict[str, np.ndarray], size: int):
    for start in range(0, len(index["position"]), size):
        yield {name: values[start : start + size] for name, values in index.items()}


def _batches(rows: int, world: int, rank: int, batch_size: int, seed: int | None, chunk: int = 500):
    assignment = RowAssignment(rows, world, seed or 0, shuffle=seed is not None)
    return list(rank_batches(_chunks(_index(rows), chunk), assignment, rank, batch_size, seed))


def _positions(batches) -> list[int]:
    return [int(p) for batch in batches for p in batch["position"]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_get_equal_disjoint_rows(world):
    per_rank = [_positions(_batches(ROWS, world, rank, 7, seed=11)) for rank in range(world)]
    assert all(len(rows) == ROWS // world for rows in per_rank)
    everything = [p for rows in per_rank for p in rows]
    assert len(set(everything)) == len(everything)
    assert len(everything) == ROWS - ROWS % world


def test_batches_have_batch_size_except_last():
    batches = _batches(ROWS, 2, 1, 7, seed=11)
    sizes = [len(batch["position"]) for batch in batches]
    assert len(batches) == -(-(ROWS // 2) // 7)
    assert set(sizes[:-1]) == {7}
    assert 1 <= sizes[-1] <= 7
    for batch in batches:
        assert list(batch["hash"]) == [f"{p:08x}" for p in batch["position"]]


def test_same_seed_gives_same_batches():
    first = _positions(_batches(ROWS, 2, 0, 5, seed=3))
    again = _positions(_batches(ROWS, 2, 0, 5, seed=3))
    assert first == again


def test_chunk_size_does_not_change_batches():
    # Ray Data may deliver the index in blocks of other sizes after a restart.
    reference = _positions(_batches(ROWS, 3, 2, 5, seed=3, chunk=500))
    for chunk in (1, 97, SHUFFLE_WINDOW_ROWS, ROWS):
        assert _positions(_batches(ROWS, 3, 2, 5, seed=3, chunk=chunk)) == reference, chunk


def test_epoch_seed_changes_rows_and_order():
    first = _positions(_batches(ROWS, 2, 0, 5, seed=1))
    second = _positions(_batches(ROWS, 2, 0, 5, seed=2))
    assert set(first) != set(second)
    assert first != sorted(first)  # shuffled within windows


def test_rank_rows_stay_in_few_runs():
    # whole blocks of neighbouring rows, so that a rank reads few feature shards
    assignment = RowAssignment(100_000, 4, seed=5)
    mine = np.flatnonzero(assignment.ranks(np.arange(100_000)) == 1)
    runs = 1 + int(np.count_nonzero(np.diff(mine) != 1))
    blocks_per_rank = 25_000 / assignment.block_rows
    assert runs <= blocks_per_rank + 2


def test_unshuffled_parts_are_contiguous_and_complete():
    per_rank = [_positions(_batches(ROWS, 3, rank, 4, seed=None)) for rank in range(3)]
    assert [p for rows in per_rank for p in rows] == list(range(ROWS))
    sizes = [len(rows) for rows in per_rank]
    assert max(sizes) - min(sizes) <= 1


def test_too_few_rows_give_no_batches():
    assert _batches(1, 2, 0, 4, seed=1) == []
    assert _batches(1, 2, 1, 4, seed=1) == []
