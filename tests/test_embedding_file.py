"""An embedding given as a .npy file: read without unpickling, every fault refused by name."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.embedding_file import MAX_BYTES, MAX_ROWS, load_embedding


def saved(tmp_path, array, name="e.npy", **options):
    path = tmp_path / name
    np.save(path, array, **options)
    return path


@pytest.mark.parametrize(("shape", "rows"), [((8,), 1), ((1, 8), 1), ((3, 8), 3)])
def test_rows_come_back_as_float32(tmp_path, shape, rows):
    array = np.arange(1, 1 + np.prod(shape), dtype=np.float64).reshape(shape)
    loaded = load_embedding(saved(tmp_path, array), 8)
    assert loaded.shape == (rows, 8) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, array.reshape(rows, 8).astype(np.float32))


def test_a_big_endian_float16_file_is_read_as_its_values(tmp_path):
    array = np.array([0.5, -2.0, 3.0, 1.0], dtype=">f2")
    np.testing.assert_array_equal(load_embedding(saved(tmp_path, array), 4), [[0.5, -2.0, 3.0, 1.0]])


@pytest.mark.parametrize(
    ("array", "width", "message"),
    [
        (np.ones(768, dtype=np.float32), 64, "embedding: rows of width 768, but the loaded CLIP's embeddings are 64"),
        (np.array([1.0, np.nan, 0.0, 1.0]), 4, r"embedding: NaN or infinite values in row\(s\) \[0\]"),
        (np.array([[1.0, 1.0], [np.inf, 0]]), 2, r"NaN or infinite values in row\(s\) \[1\]"),
        (np.zeros((2, 4), dtype=np.float32), 4, r"embedding: row\(s\) \[0, 1\] are zero vectors"),
        (np.full(4, 1e-46), 4, r"row\(s\) \[0\] are zero vectors"),  # nothing left of it in float32
        (np.ones(4, dtype=np.int64), 4, "embedding: dtype int64 is not accepted; give float16, float32, float64"),
        (np.ones(4, dtype=np.complex64), 4, "dtype complex64 is not accepted"),
        (np.ones((2, 2, 4), dtype=np.float32), 4, r"embedding: shape \[2, 2, 4\] is not accepted"),
        (np.ones((0, 4), dtype=np.float32), 4, r"shape \[0, 4\] is not accepted"),
        (np.ones((MAX_ROWS + 1, 4), dtype=np.float32), 4, f"embedding: {MAX_ROWS + 1} rows, over the limit"),
    ],
)
def test_a_bad_array_is_refused_with_what_to_give(tmp_path, array, width, message):
    with pytest.raises(ValueError, match=message):
        load_embedding(saved(tmp_path, array), width)


def test_a_pickle_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    objects = saved(tmp_path, np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="embedding: the file holds pickled objects, which are not read"):
        load_embedding(objects, 4)
    plain = tmp_path / "plain.npy"
    plain.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="embedding: the file is a pickle, which is not read"):
        load_embedding(plain, 4)


def test_other_files_are_refused(tmp_path):
    (tmp_path / "big.npy").write_bytes(b"\x93NUMPY" + bytes(MAX_BYTES))
    with pytest.raises(ValueError, match=f"embedding: the file is {MAX_BYTES + 6:,} bytes, over the limit"):
        load_embedding(tmp_path / "big.npy", 4)
    (tmp_path / "text.npy").write_text("0.1, 0.2")
    with pytest.raises(ValueError, match="embedding: not a .npy array"):
        load_embedding(tmp_path / "text.npy", 4)
    np.savez(tmp_path / "archive.npz", a=np.ones(4))
    with pytest.raises(ValueError, match="embedding: an .npz archive"):
        load_embedding(tmp_path / "archive.npz", 4)
    with pytest.raises(ValueError, match="embedding: the file cannot be read"):
        load_embedding(tmp_path / "missing.npy", 4)
    with pytest.raises(ValueError, match="search_query: the file cannot be read"):
        load_embedding(tmp_path / "missing.npy", 4, name="search_query")
