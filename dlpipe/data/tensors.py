"""Feature tensors in Arrow columns, encoded and decoded a whole column at a time.

Two layouts, both Petastorm fields:
- a Parquet list of numbers per row (tabular features: Spark writes them from the JVM, Petastorm reads a
  codec-less ndarray field): decoding is one reshape of the list's flat values;
- NdarrayCodec cells (images): each tensor is the bytes of `np.save(value)`, a header that depends only on
  dtype and shape, then the raw data. For a fixed-shape field every cell has the same header, so a batch
  is built by one concatenation and decoded by one `frombuffer`, instead of one `np.save`/`np.load` per
  row. The bytes are identical to Petastorm's, so its readers and ours read the same datasets.

`decode_column` and `decode_column_checked` take either layout.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=np.dtype(dtype)))
    raw = buf.getvalue()
    return raw[: len(raw) - np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))]


def cell_layout(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, int]:
    """The npy header every cell of this dtype and shape starts with, and the whole cell's length."""
    header = npy_header(dtype.str, tuple(shape))
    return header, len(header) + dtype.itemsize * int(np.prod(shape, dtype=np.int64))


def encode_rows(arr: np.ndarray) -> list[bytes]:
    """Rows of arr (n, *shape) -> n NdarrayCodec cells, byte-identical to NdarrayCodec.encode."""
    arr = np.ascontiguousarray(arr)
    header = npy_header(arr.dtype.str, tuple(arr.shape[1:]))
    return [header + row.tobytes() for row in arr]


def encode_arrow(arr: np.ndarray):
    """Rows of arr (n, *shape) -> a pyarrow BinaryArray of NdarrayCodec cells, built from one buffer and
    its offsets (no Python work per row)."""
    import pyarrow as pa

    arr = np.ascontiguousarray(arr)
    n = len(arr)
    header = np.frombuffer(npy_header(arr.dtype.str, tuple(arr.shape[1:])), dtype=np.uint8)
    body = arr.reshape(n, -1).view(np.uint8)
    cell = len(header) + body.shape[1]
    data = np.empty((n, cell), dtype=np.uint8)
    data[:, : len(header)] = header
    data[:, len(header) :] = body
    offsets = np.arange(0, (n + 1) * cell, cell, dtype=np.int32)
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def decode_cells(cells: Sequence, dtype: str | np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """n NdarrayCodec cells (or n rows of numbers, the list layout) of one dtype and shape -> an array
    (n, *shape), vectorized when possible."""
    dtype = np.dtype(dtype)
    n = len(cells)
    if n == 0:
        return np.empty((0, *shape), dtype=dtype)
    if not isinstance(cells[0], bytes | bytearray | memoryview):
        return np.asarray([np.asarray(c, dtype=dtype) for c in cells]).reshape(n, *shape)
    header, cell_len = cell_layout(dtype, shape)
    joined = b"".join(cells)
    if len(joined) == n * cell_len and all(bytes(c[: len(header)]) == header for c in (cells[0], cells[-1])):
        table = np.frombuffer(joined, dtype=np.uint8).reshape(n, cell_len)[:, len(header) :]
        return np.ascontiguousarray(table).view(dtype).reshape(n, *shape)
    # cells of mixed layout (another writer, another shape): the safe, slow way
    return np.stack([np.load(io.BytesIO(bytes(c))) for c in cells]).astype(dtype).reshape(n, *shape)


def decode_arrow(column, dtype: str | np.dtype, shape: tuple[int, ...], take: np.ndarray | None = None) -> np.ndarray:
    """A pyarrow binary column (Array or ChunkedArray) of NdarrayCodec cells -> an array (n, *shape).

    With `take` (row indices), returns those rows in that order, gathered in the same single copy that
    decoding makes anyway (a shuffling loader pays nothing extra for its permutation)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        if take is not None or column.num_chunks == 1:
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        else:
            parts = [decode_arrow(chunk, dtype, shape) for chunk in column.chunks]
            return np.concatenate(parts) if parts else np.empty((0, *shape), dtype=np.dtype(dtype))
    dtype = np.dtype(dtype)
    n = len(column)
    header, cell_len = cell_layout(dtype, shape)
    if n and column.null_count == 0:
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=n + 1, offset=column.offset * 4)
        if np.all(np.diff(offsets) == cell_len):
            data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            table = data.reshape(n, cell_len)
            if bytes(table[0, : len(header)]) == header:
                body = table[take, len(header) :] if take is not None else np.ascontiguousarray(table[:, len(header) :])
                return body.view(dtype).reshape(len(body), *shape)
    out = decode_cells(column.to_pylist(), dtype, shape)
    return out[take] if take is not None else out


def _starts_with(cells: np.ndarray, header: bytes) -> np.ndarray:
    """Which rows of cells (n, cell_len) uint8 start with header: each row's header bytes viewed as one
    opaque (void) value, so the compare is one memcmp per row rather than n x len(header) byte compares."""
    head = cells[:, : len(header)]
    same = head.view(np.dtype((np.void, len(header))))[:, 0] == np.void(header)
    if isinstance(same, np.ndarray) and same.shape == (len(cells),):
        return same
    return (head == np.frombuffer(header, np.uint8)).all(axis=1)  # a numpy that does not compare voids


def decode_arrow_checked(column, dtype: str | np.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """Like decode_arrow, for data not yet trusted (scoring new rows): every cell is checked, and a bad one
    does not fail the batch. Returns (x, reasons): x (n, *shape) with zeros where a cell is bad, and
    reasons None when every row is good, else an (n,) object array, None for good rows, else why the row
    cannot be scored. All checks are vectorized; Python objects are made only for bad rows.

    The usual batch, every cell good, costs what decode_arrow does plus three cheap passes (the sizes, the
    headers, one isfinite over the whole batch); only a batch with a bad cell in it pays for the per-row
    bookkeeping that names the bad rows."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dtype = np.dtype(dtype)
    n = len(column)
    header, cell_len = cell_layout(dtype, shape)
    hlen = len(header)
    if n == 0:
        return np.zeros((0, *shape), dtype=dtype), None
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=n + 1, offset=column.offset * 4)
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
    if not column.null_count and (np.diff(offsets) == cell_len).all():  # one reshape of the buffer, no gather
        cells = data[offsets[0] : offsets[-1]].reshape(n, cell_len)
        headed = _starts_with(cells, header)
        if headed.all():
            x = np.ascontiguousarray(cells[:, hlen:]).view(dtype).reshape(n, *shape)
            if dtype.kind != "f" or np.isfinite(x).all():
                return x, None
    # some cell is bad (the fast path above returns every all-good batch): find which, and why
    null = column.is_null().to_numpy(zero_copy_only=False) if column.null_count else np.zeros(n, bool)
    sized = (np.diff(offsets) == cell_len) & ~null
    idx = np.flatnonzero(sized)
    cells = data[offsets[:-1][idx, None] + np.arange(cell_len)]
    headed = _starts_with(cells, header)
    good = idx[headed]
    x = np.zeros((n, *shape), dtype=dtype)
    x[good] = cells[headed, hlen:].view(dtype).reshape(len(good), *shape)
    finite = np.isfinite(x.reshape(n, -1)).all(axis=1) if dtype.kind == "f" else np.ones(n, bool)
    ok = np.zeros(n, bool)
    ok[good] = True
    ok &= finite
    reasons = np.full(n, None, dtype=object)
    reasons[null] = "features missing"
    reasons[~sized & ~null] = f"features cell of the wrong size (not a {dtype} tensor of shape {tuple(shape)})"
    reasons[idx[~headed]] = f"features cell is not a {dtype} tensor of shape {tuple(shape)}"
    nonfinite = np.zeros(n, bool)
    nonfinite[good] = ~finite[good]
    reasons[nonfinite] = "features not finite (NaN or inf)"
    x[~ok] = 0
    return x, reasons


def is_list_column(column) -> bool:
    """Whether an Arrow column holds the list layout (a list of numbers per row) rather than cells."""
    import pyarrow as pa

    t = column.type
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _one_chunk(column):
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _list_values(column, width: int) -> np.ndarray | None:
    """(n, width) of a list column whose every row holds width non-null numbers, without a copy; else None."""
    n = len(column)
    if column.null_count:
        return None
    offsets = column.offsets.to_numpy()
    if not (np.diff(offsets) == width).all():
        return None
    values = column.values.slice(offsets[0], n * width)
    if values.null_count:
        return None
    return values.to_numpy(zero_copy_only=False).reshape(n, width)


def decode_column(column, dtype: str | np.dtype, shape: tuple[int, ...], take: np.ndarray | None = None) -> np.ndarray:
    """A feature column (either layout; Array or ChunkedArray) -> a new array (n, *shape) of dtype.

    With `take` (row indices), returns those rows in that order, gathered in the one copy that is made
    anyway (a shuffling loader pays nothing extra for its permutation)."""
    if not is_list_column(column):
        return decode_arrow(column, dtype, shape, take)
    dtype = np.dtype(dtype)
    column = _one_chunk(column)
    width = int(np.prod(shape, dtype=np.int64))
    flat = _list_values(column, width)
    if flat is None:
        flat = np.asarray(column.to_pylist(), dtype=dtype).reshape(len(column), width)  # ragged rows raise here
    out = flat[take] if take is not None else flat.copy()
    return out.astype(dtype, copy=False).reshape(len(out), *shape)


def decode_column_checked(
    column, dtype: str | np.dtype, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Like decode_column, for rows not yet trusted (scoring): (x, reasons) as decode_arrow_checked gives
    them, for either layout. A list row is bad when it is missing, has another length, holds a null, or
    holds NaN/inf."""
    if not is_list_column(column):
        return decode_arrow_checked(column, dtype, shape)
    dtype = np.dtype(dtype)
    column = _one_chunk(column)
    n, width = len(column), int(np.prod(shape, dtype=np.int64))
    flat = _list_values(column, width)
    if flat is not None:
        x = flat.astype(dtype, copy=False).reshape(n, *shape)
        if dtype.kind != "f" or np.isfinite(x).all():
            return x, None
    # some row is bad (the fast path above returns every all-good batch): find which, and why
    null = column.is_null().to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy()
    sized = (np.diff(offsets) == width) & ~null
    values = column.values
    value_null = values.is_null().to_numpy(zero_copy_only=False)
    numbers = values.to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(sized)
    gather = offsets[:-1][idx, None] + np.arange(width)
    x = np.zeros((n, width), dtype=dtype)
    x[idx] = numbers[gather]
    holes = np.zeros(n, bool)
    holes[idx] = value_null[gather].any(axis=1)
    finite = np.isfinite(x).all(axis=1) if dtype.kind == "f" else np.ones(n, bool)
    reasons = np.full(n, None, dtype=object)
    reasons[null] = "features missing"
    reasons[~sized & ~null] = f"features of the wrong size (not {width} values for a tensor of shape {tuple(shape)})"
    reasons[sized & ~holes & ~finite] = "features not finite (NaN or inf)"
    reasons[holes] = "features hold a missing value"
    x[~sized | holes | ~finite] = 0
    return x.reshape(n, *shape), reasons
