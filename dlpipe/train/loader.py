"""Columnar, exact data feeding for one training rank.

Each rank reads its own contiguous slice of a Petastorm dataset's rows, a row group at a time, straight
from Parquet with pyarrow, and builds tensors a batch at a time (NdarrayCodec cells decoded per column,
not per row). Every rank runs the same number of steps per epoch (its rows split as evenly as
`np.array_split` would), so no rank waits in an allreduce that another never joins, and every row is used
exactly once per epoch. Rows read are counted; the caller checks the sum across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dlpipe.storage import StorageSettings, python_fs
from dlpipe.tensors import decode_arrow


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
    ):
        self.uri, self.rank, self.size = uri, rank, size
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

    def batch_sizes(self) -> list[int]:
        base, rem = divmod(self.local_rows, self.steps)
        return [base + 1 if i < rem else base for i in range(self.steps)]

    def _read(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        table = (
            pq.ParquetFile(self._fs.open_input_file(piece.path))
            .read_row_group(piece.row_group, columns=["features", "label"])
            .slice(piece.lo, piece.hi - piece.lo)
        )
        x = decode_arrow(table.column("features"), np.float32, self.feature_shape)
        y = table.column("label").to_numpy().astype(np.int64)
        return x, y

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield exactly `self.steps` (features, labels) batches covering this rank's rows once."""
        rng = np.random.default_rng(self.seed * 100_003 + epoch * 7919 + self.rank)
        order = rng.permutation(len(self.pieces)) if self.shuffle else range(len(self.pieces))
        sizes = iter(self.batch_sizes())
        want = next(sizes)
        buf_x: list[np.ndarray] = []
        buf_y: list[np.ndarray] = []
        buffered = 0
        self.rows_last_epoch = 0
        for i in order:
            x, y = self._read(self.pieces[i])
            if self.shuffle:
                p = rng.permutation(len(y))
                x, y = x[p], y[p]
            buf_x.append(x)
            buf_y.append(y)
            buffered += len(y)
            while want is not None and buffered >= want:
                bx, by = np.concatenate(buf_x), np.concatenate(buf_y)
                self.rows_last_epoch += want
                yield torch.from_numpy(bx[:want]), torch.from_numpy(by[:want])
                buf_x, buf_y = [bx[want:]], [by[want:]]
                buffered -= want
                want = next(sizes, None)
        if want is not None or buffered:
            raise ShortEpochError(
                f"rank {self.rank}: read {self.rows_last_epoch + buffered} of {self.local_rows} rows from {self.uri}"
            )
