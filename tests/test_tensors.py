"""NdarrayCodec cells built and read a column at a time must be Petastorm's own bytes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from petastorm.codecs import NdarrayCodec
from petastorm.unischema import UnischemaField

from dlpipe.tensors import decode_arrow, decode_cells, encode_arrow, encode_rows


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
    from dlpipe.tensors import decode_arrow_checked

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
