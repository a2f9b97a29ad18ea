"""Columnar, exact data feeding for one training rank.

Each rank reads its own contiguous slice of a Petastorm dataset's rows, a row group at a time, straight from
Parquet with pyarrow, and builds tensors a batch at a time (a column decoded at once, not per row). Every rank
runs the same number of steps per epoch (its rows split as evenly as `np.array_split` would), so no rank waits
in an allreduce that another never joins, and every row is used exactly once per epoch. Rows read are counted;
the caller checks the sum across ranks.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dlpipe.data.tensors import decode_column
from dlpipe.storage import StorageSettings, python_fs

PREFETCH = 2  # pieces (row groups) read ahead of the one being trained on


class ShortEpochError(RuntimeError):
    """An epoch saw fewer (or more) rows than the dataset holds: data was lost, never train on silently."""


@dataclass(frozen=True)
class Piece:
    path: str
    row_group: int
    lo: int  # slice of the row group's rows
    hi: int


@dataclass(frozen=True)
class ShardPlan:
    """What one rank reads of a dataset: the same for every run with the same files, ranks and batch size.

    A pure value (no I/O), so which rows each rank trains on can be checked without reading any data."""

    pieces: tuple[Piece, ...]
    total_rows: int
    local_rows: int
    steps: int  # the same on every rank

    def batch_sizes(self) -> list[int]:
        """This rank's `steps` batch sizes, as even as `np.array_split` makes them, summing to local_rows."""
        base, rem = divmod(self.local_rows, self.steps)
        return [base + 1 if i < rem else base for i in range(self.steps)]


def plan_shard(groups: Sequence[tuple[str, int, int]], rank: int, size: int, batch_size: int) -> ShardPlan:
    """Rank `rank` of `size` gets the contiguous slice [rank * N // size, (rank + 1) * N // size) of the N rows
    of `groups` ((file, row group, rows), in dataset order), as slices of row groups. Every rank runs the
    largest shard's batch count, so no rank waits in an allreduce another never joins."""
    total = sum(n for _, _, n in groups)
    start, end = rank * total // size, (rank + 1) * total // size
    steps = max(1, math.ceil(math.ceil(total / size) / batch_size))
    pieces: list[Piece] = []
    offset = 0
    for path, g, n in groups:
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            pieces.append(Piece(path, g, lo - offset, hi - offset))
        offset += n
    return ShardPlan(tuple(pieces), total, end - start, steps)


def epoch_order(
    piece_rows: Sequence[int], seed: int, epoch: int, rank: int, shuffle: bool
) -> Iterator[tuple[int, np.ndarray | None]]:
    """(piece index, row order within it, or None to keep it) for one epoch: with shuffle, a new piece order
    and new row orders every epoch, the same on a rerun (seed, epoch and rank pick them). Row orders are
    drawn one piece at a time, as the pieces are read, so memory holds a few, whatever the shard's size."""
    rng = np.random.default_rng(seed * 100_003 + epoch * 7919 + rank)
    order = rng.permutation(len(piece_rows)) if shuffle else np.arange(len(piece_rows))
    for i in order:
        yield int(i), (rng.permutation(piece_rows[i]) if shuffle else None)


def list_parquet_files(uri: str, storage: StorageSettings | None = None) -> tuple[pafs.FileSystem, list[str]]:
    fs, root = python_fs(uri, storage)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    names = sorted(
        i.path for i in infos if i.is_file and i.path.endswith(".parquet") and not i.base_name.startswith(("_", "."))
    )
    if not names:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    return fs, names


class ShardLoader:
    def __init__(
        self,
        uri: str,
        rank: int,
        size: int,
        batch_size: int,
        feature_shape: tuple[int, ...],
        shuffle: bool,
        seed: int = 0,
        expected_rows: int | None = None,
        storage: StorageSettings | None = None,
        label_dtype: type = np.int32,
    ):
        self.uri, self.rank, self.size = uri, rank, size
        # class indices become int64 (what cross-entropy takes); regression targets stay float32
        self.label_dtype = np.int64 if np.issubdtype(label_dtype, np.integer) else np.float32
        self.feature_shape, self.shuffle, self.seed = tuple(feature_shape), shuffle, seed
        self._fs, files = list_parquet_files(uri, storage)
        groups: list[tuple[str, int, int]] = []
        for path in files:
            meta = pq.ParquetFile(self._fs.open_input_file(path)).metadata
            groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        plan = plan_shard(groups, rank, size, batch_size)
        self.total_rows, self.local_rows, self.steps = plan.total_rows, plan.local_rows, plan.steps
        if expected_rows is not None and self.total_rows != expected_rows:
            raise ShortEpochError(f"{uri} holds {self.total_rows} rows, the dataset's metadata says {expected_rows}")
        if self.local_rows < self.steps:
            raise ValueError(f"{uri}: {self.total_rows} rows are too few for {size} ranks x batch {batch_size}")
        self.plan = plan
        self.pieces: list[Piece] = list(plan.pieces)
        self.rows_last_epoch = 0
        self._files = threading.local()

    def batch_sizes(self) -> list[int]:
        return self.plan.batch_sizes()

    def _file(self, path: str) -> pq.ParquetFile:
        """This thread's open reader of path (a ParquetFile is not for concurrent reads)."""
        files = getattr(self._files, "open", None)
        if files is None:
            files = self._files.open = {}
        if path not in files:
            files[path] = pq.ParquetFile(self._fs.open_input_file(path))
        return files[path]

    def _read(self, piece: Piece, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One piece's rows (in `order`, if given) as contiguous arrays: decoding and shuffling are one copy."""
        table = (
            self._file(piece.path)
            .read_row_group(piece.row_group, columns=["features", "label"])
            .slice(piece.lo, piece.hi - piece.lo)
        )
        x = decode_column(table.column("features"), np.float32, self.feature_shape, take=order)
        y = table.column("label").to_numpy().astype(self.label_dtype)
        return x, (y[order] if order is not None else y)

    def _pieces(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The shard's pieces, decoded, in this epoch's order; the next PREFETCH are read by background threads
        while the caller trains on this one (Parquet decoding releases the GIL). Each piece's order is drawn as
        it is read: memory holds a few row groups, whatever the shard's size."""
        sizes = [p.hi - p.lo for p in self.pieces]
        with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="dlpipe-loader") as pool:
            pending: deque = deque()
            for i, perm in epoch_order(sizes, self.seed, epoch, self.rank, self.shuffle):
                pending.append(pool.submit(self._read, self.pieces[i], perm))
                if len(pending) > PREFETCH:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield exactly `self.steps` (features, labels) batches covering this rank's rows once.

        A batch inside one piece is a view of it (no copy); only a batch that spans two pieces is joined."""
        sizes = iter(self.batch_sizes())
        want = next(sizes)
        parts_x: list[np.ndarray] = []
        parts_y: list[np.ndarray] = []
        pending = extra = 0
        self.rows_last_epoch = 0
        for x, y in self._pieces(epoch):
            pos, n = 0, len(y)
            while pos < n and want is not None:
                take = min(want - pending, n - pos)
                if pending == 0 and take == want:
                    bx, by = x[pos : pos + take], y[pos : pos + take]
                    pos += take
                else:
                    parts_x.append(x[pos : pos + take])
                    parts_y.append(y[pos : pos + take])
                    pending += take
                    pos += take
                    if pending < want:
                        continue
                    bx, by = np.concatenate(parts_x), np.concatenate(parts_y)
                    parts_x, parts_y, pending = [], [], 0
                self.rows_last_epoch += want
                yield torch.from_numpy(bx), torch.from_numpy(by)
                want = next(sizes, None)
            extra += n - pos
        if want is not None or extra:
            raise ShortEpochError(
                f"rank {self.rank}: read {self.rows_last_epoch + pending + extra} of {self.local_rows} rows "
                f"from {self.uri}"
            )
