"""A CLIP image embedding given as a ``.npy`` file: read without unpickling, and checked.

``load_embedding(path, width)`` is the only place such a file is read. It takes float16, float32
or float64 arrays shaped ``[d]`` or ``[k, d]`` (at most ``MAX_ROWS`` rows), with ``d`` the loaded
CLIP's width, every value finite and no row zero; it returns them as float32 ``[k, d]``. Every
problem is a ``ValueError`` whose message starts with the input's name and says what to give.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

ACCEPTED_DTYPES = ("float16", "float32", "float64")
MAX_ROWS = 16  # pictures optimised together at most (a sequence's limit)
MAX_BYTES = 1 << 20
NPY_MAGIC = b"\x93NUMPY"  # 16 rows of 4096 float64 values and the header fit well within it


def load_embedding(path: str | Path, width: int | None, name: str = "embedding") -> np.ndarray:
    """The embedding rows of ``path`` as float32 ``[k, d]``, refused with a message naming ``name``
    when the file is not a plain ``.npy`` array (a pickle included), is over ``MAX_BYTES``, holds
    another dtype or shape, another width than ``width`` (``None``: not checked yet), a NaN or
    an infinity, or a zero row."""
    path = Path(path)
    try:
        status = path.stat()
    except OSError as error:
        raise ValueError(f"{name}: the file cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{name}: not a regular file; give a .npy file")
    if status.st_size > MAX_BYTES:
        raise ValueError(
            f"{name}: the file is {status.st_size:,} bytes, over the limit of {MAX_BYTES:,}; "
            f"give at most {MAX_ROWS} embedding rows as float32"
        )
    with path.open("rb") as file:
        start = file.read(len(NPY_MAGIC))
    if start != NPY_MAGIC and not start.startswith(b"PK"):  # neither .npy nor .npz (a zip)
        if start[:1] == b"\x80":  # a pickle's protocol opcode
            raise ValueError(f"{name}: the file is a pickle, which is not read; save a plain array with numpy.save")
        raise ValueError(f"{name}: not a .npy array (no .npy header); save one with numpy.save")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise ValueError(
                f"{name}: the file holds pickled objects, which are not read; save a plain array "
                "(numpy.save of a float32 array)"
            ) from None
        raise ValueError(f"{name}: not a .npy array ({error}); save one with numpy.save") from None
    except (OSError, EOFError) as error:
        raise ValueError(f"{name}: not a .npy array ({error}); save one with numpy.save") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"{name}: an .npz archive; give one array saved with numpy.save")
    if array.dtype.name not in ACCEPTED_DTYPES:
        raise ValueError(f"{name}: dtype {array.dtype} is not accepted; give {', '.join(ACCEPTED_DTYPES)}")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name}: shape {list(np.shape(array))} is not accepted; give [d], [1, d] or [k, d]")
    if array.shape[0] > MAX_ROWS:
        raise ValueError(f"{name}: {array.shape[0]} rows, over the limit of {MAX_ROWS} pictures at once")
    if width is not None and array.shape[1] != width:
        raise ValueError(
            f"{name}: rows of width {array.shape[1]}, but the loaded CLIP's embeddings are {width} wide; "
            "give an embedding of this model's CLIP"
        )
    if not np.isfinite(array).all():
        rows = sorted({int(row) for row in np.nonzero(~np.isfinite(array))[0]})
        raise ValueError(f"{name}: NaN or infinite values in row(s) {rows}; every value must be finite")
    array = array.astype(np.float32)
    norms = np.linalg.norm(array, axis=1)
    if not (norms > 0).all():  # in float32: a float64 row that small has no direction either
        rows = [int(row) for row in np.nonzero(~(norms > 0))[0]]
        raise ValueError(f"{name}: row(s) {rows} are zero vectors, which have no direction to show")
    return array
