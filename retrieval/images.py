"""One indexed item read, checked and thumbnailed, and a batch of pictures embedded by CLIP.

Files go through ``pipeline.media.load_image`` (PNG, JPEG or WebP judged by their content, size
checked from the header before decoding, bombs and truncated files refused); URLs are fetched
first (http and https only, at most ``MAX_DOWNLOAD_BYTES``, ``DOWNLOAD_TIMEOUT`` seconds). A
problem is an ``ItemError`` whose message says what is wrong with that item: the job sets the item
aside in its errors and goes on.
"""

from __future__ import annotations

import io
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from backbone.preprocess import clip_image_tensor
from pipeline.media import ImageInputError, load_image

from .sources import is_url

THUMBNAIL_SIDE = 128  # the longer side, in pixels
THUMBNAIL_QUALITY = 85  # JPEG
MAX_DOWNLOAD_BYTES = 50 * 2**20
DOWNLOAD_TIMEOUT = 20.0


class ItemError(ValueError):
    """One item that cannot be indexed (unreadable, not an image, a bomb, truncated, ...)."""


def read_item(source: str) -> Image.Image:
    """The item's picture as RGB, checked as a request's ``image`` is."""
    if is_url(source):
        with tempfile.NamedTemporaryFile(prefix="didp-index-") as file:
            file.write(_download(source))
            file.flush()
            return _load(Path(file.name))
    return _load(Path(source))


def _load(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except ImageInputError as error:
        raise ItemError(str(error).removeprefix("image: ")) from None


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:  # noqa: S310 - http(s) only
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as error:
        raise ItemError(f"the URL cannot be fetched (HTTP {error.code} {error.reason})") from None
    except OSError as error:
        raise ItemError(f"the URL cannot be fetched ({getattr(error, 'reason', None) or error})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ItemError(f"the download is over {MAX_DOWNLOAD_BYTES // 2**20} MB")
    return data


def thumbnail(picture: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of ``picture`` whose longer side is at most ``side`` pixels."""
    small = picture.copy()
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


@torch.no_grad()
def embed_pictures(clip, pictures: list[Image.Image]) -> np.ndarray:
    """CLIP's l2-normalised image embeddings ``[n, d]`` (float32) of ``pictures``, in one batch,
    each preprocessed as a request's ``image`` is (``backbone.preprocess.clip_image_tensor``)."""
    if not pictures:
        return np.zeros((0, clip.embed_dim), np.float32)
    batch = torch.cat([clip_image_tensor(picture, clip) for picture in pictures])
    return clip.embed_image(batch).float().cpu().numpy()


def items_table(clip, ids: pa.Array, sources: list[str], schema: pa.Schema) -> pa.Table:
    """Rows of ``schema`` (``retrieval.store.shard_schema``) for these items: each one read,
    checked and thumbnailed, then all the good ones embedded in one batch; an item that fails gets
    its ``error`` and no embedding."""
    pictures, thumbnails, errors = [], [], []
    for source in sources:
        try:
            picture = read_item(source)
        except ItemError as error:
            errors.append(str(error))
            thumbnails.append(None)
            continue
        pictures.append(picture)
        thumbnails.append(thumbnail(picture))
        errors.append(None)
    vectors = embed_pictures(clip, pictures)
    dim = schema.field("embedding").type.list_size
    packed = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    good = iter(range(len(pictures)))
    column = packed.take(pa.array([None if error else next(good) for error in errors], pa.int64()))  # null: set aside
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(sources, pa.string()), column, pa.array(thumbnails, pa.binary()),
         pa.array(errors, pa.string())],
        schema=schema,
    )  # fmt: skip
