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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dlpipe.storage import StorageSettings, python_fs
from dlpipe.tensors import decode_column

PREFETCH = 2  # pieces (row groups) read ahead of the one being trained on


class ShortEpochError(RuntimeError):
    """An epoch saw fewer (or more) rows than the dataset holds: data was lost, never train on silently."""


@dataclass(frozen=True)
class Piece:
    path: str
    row_group: int
    lo: int  # slice of the row group's rows
    hi: int


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
        self.total_rows = sum(n for _, _, n in groups)
        if expected_rows is not None and self.total_rows != expected_rows:
            raise ShortEpochError(f"{uri} holds {self.total_rows} rows, the dataset's metadata says {expected_rows}")
        start, end = rank * self.total_rows // size, (rank + 1) * self.total_rows // size
        self.local_rows = end - start
        # the same step count on every rank: the largest shard's batches
        self.steps = max(1, math.ceil(math.ceil(self.total_rows / size) / batch_size))
        if self.local_rows < self.steps:
            raise ValueError(f"{uri}: {self.total_rows} rows are too few for {size} ranks x batch {batch_size}")
        self.pieces: list[Piece] = []
        offset = 0
        for path, g, n in groups:
            lo, hi = max(start, offset), min(end, offset + n)
            if lo < hi:
                self.pieces.append(Piece(path, g, lo - offset, hi - offset))
            offset += n
        self.rows_last_epoch = 0
        self._files = threading.local()

    def batch_sizes(self) -> list[int]:
        base, rem = divmod(self.local_rows, self.steps)
        return [base + 1 if i < rem else base for i in range(self.steps)]

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
        rng = np.random.default_rng(self.seed * 100_003 + epoch * 7919 + self.rank)
        order = rng.permutation(len(self.pieces)) if self.shuffle else np.arange(len(self.pieces))
        with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="dlpipe-loader") as pool:
            pending: deque = deque()
            for i in order:
                piece = self.pieces[i]
                perm = rng.permutation(piece.hi - piece.lo) if self.shuffle else None
                pending.append(pool.submit(self._read, piece, perm))
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
