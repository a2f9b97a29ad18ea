"""NdarrayCodec cells built and read a column at a time must be Petastorm's own bytes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from petastorm.codecs import NdarrayCodec
from petastorm.unischema import UnischemaField

from dlpipe.data.tensors import decode_arrow, decode_cells, encode_arrow, encode_rows


def test_encode_is_byte_identical_to_petastorm():
    arr = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    field = UnischemaField("f", np.float32, (7,), NdarrayCodec(), False)
    ours = encode_rows(arr)
    theirs = [bytes(NdarrayCodec().encode(field, row)) for row in arr]
    assert ours == theirs


def test_decode_round_trip_and_arrow_column():
    arr = np.random.default_rng(1).normal(size=(100, 3, 4)).astype(np.float32)
    cells = encode_rows(arr)
    np.testing.assert_array_equal(decode_cells(cells, np.float32, (3, 4)), arr)
    column = pa.chunked_array([pa.array(cells[:40], pa.binary()), pa.array(cells[40:], pa.binary())])
    np.testing.assert_array_equal(decode_arrow(column, np.float32, (3, 4)), arr)
    # a sliced array (non-zero offset) decodes its own rows only
    np.testing.assert_array_equal(
        decode_arrow(pa.array(cells, pa.binary()).slice(10, 5), np.float32, (3, 4)), arr[10:15]
    )


def test_decode_falls_back_for_other_layouts():
    cells = encode_rows(np.arange(6, dtype=np.float64).reshape(2, 3))  # float64 cells read as float32
    out = decode_cells(cells, np.float32, (3,))
    np.testing.assert_array_equal(out, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_encode_arrow_matches_petastorm_cells():
    arr = np.random.default_rng(2).normal(size=(9, 2, 3)).astype(np.float32)
    column = encode_arrow(arr)
    assert column.to_pylist() == encode_rows(arr)
    np.testing.assert_array_equal(decode_arrow(column, np.float32, (2, 3)), arr)


def test_checked_decoding_names_each_bad_cell_and_keeps_the_good_ones():
    from dlpipe.data.tensors import decode_arrow_checked

    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    cells = encode_rows(x)
    nan = encode_rows(np.array([[1, np.nan, 2, 3]], dtype=np.float32))[0]
    int32 = encode_rows(np.arange(4, dtype=np.int32).reshape(1, 4))[0]  # same size, another dtype
    column = pa.array([cells[0], None, b"junk", nan, int32, cells[4]], pa.binary())
    out, reasons = decode_arrow_checked(column, np.float32, (4,))
    assert list(reasons) == [
        None,
        "features missing",
        "features cell of the wrong size (not a float32 tensor of shape (4,))",
        "features not finite (NaN or inf)",
        "features cell is not a float32 tensor of shape (4,)",
        None,
    ]
    np.testing.assert_array_equal(out[[0, 5]], x[[0, 4]])
    assert not out[1:5].any()
    good, none = decode_arrow_checked(pa.array(cells, pa.binary()).slice(1), np.float32, (4,))
    assert none is None
    np.testing.assert_array_equal(good, x[1:])


def test_checked_decoding_finds_a_bad_cell_in_a_batch_without_nulls():
    """No nulls and every cell the right size: the all-good fast path must still see one bad header or one
    inf, and a null whose slot has a cell's length is still missing."""
    from dlpipe.data.tensors import decode_arrow_checked

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    cells = encode_rows(x)
    reason = "features cell is not a float32 tensor of shape (4,)"
    for bad, why in [
        (encode_rows(np.arange(4, dtype=np.int32).reshape(1, 4))[0], reason),
        (encode_rows(np.arange(4, dtype=np.float32).reshape(1, 2, 2))[0], reason),  # same size, another shape
        (encode_rows(np.array([[0, np.inf, 0, 0]], dtype=np.float32))[0], "features not finite (NaN or inf)"),
        (encode_rows(np.array([[0, 0, 0, -np.inf]], dtype=np.float32))[0], "features not finite (NaN or inf)"),
    ]:
        out, reasons = decode_arrow_checked(pa.array([*cells[:3], bad, *cells[4:]], pa.binary()), np.float32, (4,))
        assert list(reasons) == [None, None, None, why, None, None]
        np.testing.assert_array_equal(out[[0, 1, 2, 4, 5]], x[[0, 1, 2, 4, 5]])
        assert not out[3].any()
    # huge but finite values are good rows
    big = np.full((3, 4), 3e38, dtype=np.float32)
    out, none = decode_arrow_checked(encode_arrow(big), np.float32, (4,))
    assert none is None
    np.testing.assert_array_equal(out, big)
    # a null slot that holds a whole cell's bytes
    column = encode_arrow(x)
    validity = pa.py_buffer(np.packbits([1, 1, 0, 1, 1, 1], bitorder="little").tobytes())
    column = pa.BinaryArray.from_buffers(pa.binary(), 6, [validity, *column.buffers()[1:]])
    out, reasons = decode_arrow_checked(column, np.float32, (4,))
    assert list(reasons) == [None, None, "features missing", None, None, None]
    assert not out[2].any()
