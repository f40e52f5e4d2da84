"""The rows of the training index that each worker reads, and their order, chosen from seeds.

Ray Data's split of a dataset among workers (``streaming_split``) hands out blocks as workers
request them, so after a restart a rank may receive other rows than before, and a resumed run
would diverge from an uninterrupted one. Instead, Ray Train gives every worker the whole index
unsplit (``DataConfig(datasets_to_split=[])``). Each worker streams it in stored order, keeps
the rows that ``RowAssignment`` gives its rank, shuffles them in seeded windows and batches
them. The index holds only ``hash``, ``uri``, feature shard numbers and ``position``, so each
worker reads about 160 bytes per image of the dataset per epoch, and still loads images and
teacher features only for its own rows.

The rows of a rank, their order and the batch boundaries depend only on (seed, epoch or pass,
rank, world size, row count). A restarted worker therefore reproduces its batches and can skip
the ones it has already trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from samclip.tasks.train_state import derive_seed

# Index rows per Ray Data batch while streaming the index. It sets memory use, not the batches.
READ_ROWS = 4096
# Rows of one rank shuffled together. The index is sorted by feature shard, so a window spans a
# few neighbouring shards, which FeatureLookup keeps decoded.
SHUFFLE_WINDOW_ROWS = 1024
# Runs of consecutive index rows dealt to ranks. Whole runs keep a rank's rows in few feature
# shards, and several runs per rank let the rows of a rank change from epoch to epoch.
MAX_BLOCK_ROWS = 1024
MIN_BLOCKS_PER_RANK = 4

Rows = dict[str, np.ndarray]


class RowAssignment:
    """Deal the index positions ``0 .. rows - 1`` to ``world`` ranks in equal shares.

    With ``shuffle``, the positions are cut into blocks of consecutive rows, the blocks are put
    in a seeded random order, and that sequence is cut into ``world`` parts of
    ``rows // world`` rows, so every rank takes the same number of steps. The
    ``rows % world`` rows at the end of the sequence sit out that epoch, which are different
    rows in each epoch. Without ``shuffle``, rank r gets the r-th contiguous part and no row is
    left out, so parts may differ by one row (for validation, where no step is shared).
    """

    def __init__(self, rows: int, world: int, seed: int, shuffle: bool = True) -> None:
        if world < 1:
            raise ValueError(f"world size must be at least 1, got {world}")
        self.rows, self.world, self.shuffle = rows, world, shuffle
        self.rows_per_rank = rows // world
        if not shuffle or self.rows_per_rank == 0:
            return
        self.block_rows = max(1, min(MAX_BLOCK_ROWS, self.rows_per_rank // MIN_BLOCKS_PER_RANK))
        blocks = -(-rows // self.block_rows)
        sizes = np.full(blocks, self.block_rows, dtype=np.int64)
        sizes[-1] = rows - self.block_rows * (blocks - 1)
        order = np.random.default_rng(derive_seed(seed, "blocks")).permutation(blocks)
        # the offset of each block in the shuffled sequence of blocks
        self.block_offsets = np.empty(blocks, dtype=np.int64)
        self.block_offsets[order] = np.cumsum(sizes[order]) - sizes[order]

    def ranks(self, positions: np.ndarray) -> np.ndarray:
        """Return the rank that reads each position, or -1 for a row left out of this epoch."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return positions * self.world // max(self.rows, 1)
        if self.rows_per_rank == 0:
            return np.full(positions.shape, -1, dtype=np.int64)
        blocks, within = np.divmod(positions, self.block_rows)
        sequence = self.block_offsets[blocks] + within
        ranks = sequence // self.rows_per_rank
        ranks[ranks >= self.world] = -1
        return ranks


def rank_batches(
    chunks: Iterable[Rows],
    assignment: RowAssignment,
    rank: int,
    batch_size: int,
    shuffle_seed: int | None,
) -> Iterator[Rows]:
    """Yield ``rank``'s rows of the index ``chunks`` (in stored order) as batches.

    ``chunks`` are numpy batches of index rows with a ``position`` column. With
    ``shuffle_seed``, each window of SHUFFLE_WINDOW_ROWS rows is permuted by a generator seeded
    from (shuffle_seed, rank, window number). Every batch has ``batch_size`` rows except
    possibly the last.
    """
    windows = _rank_rows(chunks, assignment, rank, SHUFFLE_WINDOW_ROWS)
    carry: Rows | None = None
    for number, window in enumerate(windows):
        if shuffle_seed is not None:
            generator = np.random.default_rng(derive_seed(shuffle_seed, rank, number))
            window = _take(window, generator.permutation(_count(window)))
        rows = window if carry is None else _concat([carry, window])
        full = _count(rows) // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield _slice(rows, start, start + batch_size)
        carry = _slice(rows, full, _count(rows)) if full < _count(rows) else None
    if carry is not None:
        yield carry


def _rank_rows(
    chunks: Iterable[Rows], assignment: RowAssignment, rank: int, window_rows: int
) -> Iterator[Rows]:
    """Yield the rows of ``rank`` in stored order, in windows of ``window_rows`` rows.

    The last window may be shorter.
    """
    pending: list[Rows] = []
    count = 0
    for chunk in chunks:
        mine = assignment.ranks(chunk["position"]) == rank
        if mine.any():
            pending.append(_take(chunk, np.flatnonzero(mine)))
            count += int(mine.sum())
        while count >= window_rows:
            rows = _concat(pending)
            yield _slice(rows, 0, window_rows)
            pending = [_slice(rows, window_rows, count)]
            count -= window_rows
    if count:
        yield _concat(pending)


def _count(rows: Rows) -> int:
    return len(next(iter(rows.values())))


def _take(rows: Rows, indices: np.ndarray) -> Rows:
    return {name: values[indices] for name, values in rows.items()}


def _slice(rows: Rows, start: int, stop: int) -> Rows:
    return {name: values[start:stop] for name, values in rows.items()}


def _concat(parts: list[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
