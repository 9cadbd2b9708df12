"""The image input (load_image, clip_image_tensor) and animations (write_animation).

Tolerances: lossless formats must round-trip pixel for pixel; JPEG within a mean of 3/255;
the image-input path to a CLIP embedding equals open_clip's own preprocess + encode_image +
l2-normalise within 1e-6 (float32, unit-norm embeddings); animations decode back with their
4x4 block means within a mean of 3/255 of the frames' (per-pixel errors of a dithered 256-colour
GIF or a lossy WebP are larger on noisy frames, ~10/255, but average out over blocks).
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from backbone.preprocess import clip_image_tensor
from pipeline.media import ImageInputError, load_image, write_animation
from prior.factory import random_models

ACCEPTED = "not a PNG, JPEG or WebP file"
JPEG_OPTIONS = {"quality": 95, "subsampling": 0}  # 4:4:4, so the known picture survives within 3/255


def picture(width=48, height=32, mode="RGB") -> Image.Image:
    """A known picture: colour gradients with a checkerboard, in ``mode``."""
    y, x = np.mgrid[0:height, 0:width]
    checker = ((x // 4 + y // 4) % 2) * 60
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), 120 + checker], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)


def save(image: Image.Image, path, fmt: str, **options):
    image.save(path, fmt, **options)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def png_claiming(path, width: int, height: int):
    """A small 1-bit PNG whose header claims ``width`` x ``height`` (its data is far too short)."""
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    path.write_bytes(bytes(data))
    return path


# -- accepted files ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_load_exactly(tmp_path, fmt, options):
    image = load_image(save(picture(), tmp_path / "in", fmt, **options))
    assert image.mode == "RGB" and image.size == (48, 32)
    assert np.array_equal(pixels(image), pixels(picture()))


def test_jpeg_loads(tmp_path):
    image = load_image(save(picture(), tmp_path / "in.jpeg", "JPEG", **JPEG_OPTIONS))
    assert image.mode == "RGB" and image.size == (48, 32)
    assert np.abs(pixels(image) - pixels(picture())).mean() < 3


def test_format_is_judged_by_content_not_name(tmp_path):
    assert np.array_equal(pixels(load_image(save(picture(), tmp_path / "really_png.jpg", "PNG"))), pixels(picture()))
    with pytest.raises(ImageInputError, match=r"^image: not a PNG, JPEG or WebP file \(found GIF\)$"):
        load_image(save(picture(), tmp_path / "really_gif.png", "GIF"))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK"])
def test_other_modes_become_rgb(tmp_path, mode):
    source = picture(mode=mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = load_image(save(source, tmp_path / "in", fmt, **(JPEG_OPTIONS if fmt == "JPEG" else {})))
    assert image.mode == "RGB" and image.size == source.size
    expected = pixels(source.convert("RGB"))
    if fmt == "PNG":
        assert np.array_equal(pixels(image), expected)
    else:
        assert np.abs(pixels(image) - expected).mean() < 3


def test_alpha_is_dropped_like_open_clip(tmp_path):
    source = picture(mode="RGBA")
    source.putalpha(0)  # fully transparent: the colour underneath is kept
    image = load_image(save(source, tmp_path / "in.png", "PNG"))
    assert np.array_equal(pixels(image), pixels(picture()))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
    image = load_image(save(Image.fromarray(ramp), tmp_path / "in.png", "PNG"))
    assert np.array_equal(pixels(image)[..., 0], np.arange(256).reshape(16, 16))


def test_exif_orientation_is_applied(tmp_path):
    source = Image.new("RGB", (40, 20), (255, 0, 0))
    source.paste((0, 0, 255), (20, 0, 40, 20))  # red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    image = load_image(save(source, tmp_path / "in.jpg", "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (20, 40)
    top, bottom = pixels(image)[:15].mean((0, 1)), pixels(image)[25:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True}), ("MPO", JPEG_OPTIONS)])
def test_animations_and_multi_picture_files_give_the_first_frame(tmp_path, fmt, options):
    frames = [picture(), Image.new("RGB", (48, 32), (0, 255, 0)), Image.new("RGB", (48, 32), (255, 0, 0))]
    path = tmp_path / "in"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], **options)
    with Image.open(path) as check:
        assert check.n_frames == 3
    image = load_image(path)
    assert image.size == (48, 32)
    assert np.abs(pixels(image) - pixels(picture())).mean() < 3


# -- refused files -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_refused(tmp_path, fmt):
    with pytest.raises(ImageInputError, match=rf"^image: {ACCEPTED} \(found {fmt}\)$"):
        load_image(save(picture(), tmp_path / "in.png", fmt))


@pytest.mark.parametrize(
    "content", [b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', b"hello", b"\x00" * 100]
)
def test_unrecognised_files_are_refused(tmp_path, content):
    path = tmp_path / "in.png"
    path.write_bytes(content)
    with pytest.raises(ImageInputError, match=rf"^image: {ACCEPTED} \(unrecognised format\)$"):
        load_image(path)


def test_empty_missing_and_non_files_are_refused(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageInputError, match=r"^image: the file is empty; a PNG, JPEG or WebP file is required$"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageInputError, match=r"^image: the file cannot be read \(No such file or directory\)$"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageInputError, match=r"^image: not a regular file; a PNG, JPEG or WebP file is required$"):
        load_image(tmp_path)


# Pillow's WebP reader fails on a cut file while reading its header, before the format is known.
@pytest.mark.parametrize(("fmt", "name"), [("PNG", "PNG "), ("JPEG", "JPEG "), ("WEBP", "")])
def test_truncated_files_are_refused(tmp_path, fmt, name):
    data = save(picture(256, 256), tmp_path / "full", fmt).read_bytes()
    path = tmp_path / "cut"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match=rf"^image: the {name}file is truncated or corrupt") as info:
        load_image(path)
    assert str(info.value).endswith("a complete PNG, JPEG or WebP file is required")


def test_over_40_megapixels_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("1", (8000, 5125)).save(path, "PNG")  # a real, highly compressible 41-megapixel PNG
    assert path.stat().st_size < 100_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or None)
    start = time.perf_counter()
    with pytest.raises(ImageInputError, match=r"^image: 8000x5125 is 41\.0 megapixels, over the limit of 40$"):
        load_image(path)
    assert decoded == [] and time.perf_counter() - start < 1.0


def test_size_limit_reads_the_header_only(tmp_path):
    # The data behind this header is far too short: decoding would fail as truncated.
    with pytest.raises(ImageInputError, match=r"^image: 6000x8000 is 48\.0 megapixels, over the limit of 40$"):
        load_image(png_claiming(tmp_path / "claims.png", 6000, 8000))


@pytest.mark.parametrize(("width", "height"), [(1_000_000, 1), (1, 1_000_000), (101, 1)])
def test_a_strip_more_elongated_than_100_to_1_is_refused_from_its_header(tmp_path, width, height):
    # CLIP's resize of the short side to 224 px would make a 1,000,000 x 1 strip 224 x 224,000,000
    with pytest.raises(ImageInputError, match=rf"^image: {width}x{height} is more elongated than 100:1; "):
        load_image(png_claiming(tmp_path / "strip.png", width, height))


def test_a_100_to_1_picture_is_accepted(tmp_path, clip):
    Image.new("RGB", (2000, 20), (200, 10, 10)).save(tmp_path / "wide.png")
    tensor = clip_image_tensor(load_image(tmp_path / "wide.png"), clip)
    assert tensor.shape == (1, 3, clip.image_size, clip.image_size)


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (100_000, 100_000)])
def test_decompression_bombs_are_refused_without_a_warning(tmp_path, width, height):
    # 100 MP: Pillow only warns (DecompressionBombWarning); 10 GP: Pillow raises. Both are ours.
    path = png_claiming(tmp_path / "bomb.png", width, height)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageInputError, match=r"^image: refused as a possible decompression bomb") as info:
            load_image(path)
    assert caught == []
    assert str(info.value).endswith("images of at most 40 megapixels are accepted")


def test_errors_are_value_errors():
    assert issubclass(ImageInputError, ValueError)


# -- CLIP's view -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    return random_models("tiny").clip


def test_image_input_gives_the_embedding_clip_gives_for_the_picture(tmp_path, clip):
    path = save(picture(300, 200), tmp_path / "known.png", "PNG")  # non-square: resize + centre crop
    tensor = clip_image_tensor(load_image(path), clip)
    assert tensor.shape == (1, 3, clip.image_size, clip.image_size) and tensor.dtype == torch.float32
    assert tensor.min() >= 0 and tensor.max() <= 1
    ours = clip.embed_image(tensor)

    preprocess = open_clip.image_transform(clip.image_size, is_train=False)
    with Image.open(path) as image, torch.no_grad():
        reference = F.normalize(clip.model.encode_image(preprocess(image).unsqueeze(0)).float(), dim=-1)
    assert ours.shape == reference.shape == (1, clip.embed_dim)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


# -- animations ------------------------------------------------------------------------------------


def animation_frames(n=16, size=64):
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(size, size), mode="bicubic")[0]
    return [(base + 0.3 * (i / n) * torch.rand(3, size, size, generator=g)).clamp(0, 1) for i in range(n)]


def decoded_frames(path):
    with Image.open(path) as image:
        info = dict(image.info)
        frames = []
        for k in range(image.n_frames):
            image.seek(k)
            frames.append(image.convert("RGB"))
            info.setdefault("durations", []).append(image.info.get("duration"))
    return frames, info


@pytest.mark.parametrize(("fmt", "pil_format"), [("gif", "GIF"), ("webp", "WEBP")])
def test_animations_decode_back(tmp_path, fmt, pil_format):
    frames = animation_frames()
    path = write_animation(frames, tmp_path / f"anim.{fmt}", fmt, duration_ms=80)
    assert path == tmp_path / f"anim.{fmt}"
    with Image.open(path) as image:
        assert image.format == pil_format and image.is_animated
    decoded, info = decoded_frames(path)
    assert len(decoded) == 16 and all(frame.size == (64, 64) for frame in decoded)
    assert info["loop"] == 0 and info["durations"] == [80] * 16
    for got, want in zip(decoded, frames, strict=True):
        got = torch.from_numpy(pixels(got)).permute(2, 0, 1).float() / 255
        assert (F.avg_pool2d(got[None], 4) - F.avg_pool2d(want[None], 4)).abs().mean() < 3 / 255


def test_animation_accepts_pil_frames(tmp_path):
    frames = [picture(), Image.new("RGB", (48, 32), (0, 0, 255)), picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    decoded, _ = decoded_frames(write_animation(frames, tmp_path / "a.gif", "gif"))
    assert len(decoded) == 3 and decoded[1].getpixel((5, 5)) == (0, 0, 255)


def test_animation_errors(tmp_path):
    frames = animation_frames(2)
    with pytest.raises(ValueError, match="fmt must be one of gif, webp"):
        write_animation(frames, tmp_path / "a.png", "png")
    with pytest.raises(ValueError, match="no frames"):
        write_animation([], tmp_path / "a.gif", "gif")
    with pytest.raises(ValueError, match="frames differ in size"):
        write_animation([frames[0], torch.zeros(3, 8, 8)], tmp_path / "a.gif", "gif")
    with pytest.raises(ValueError, match=r"frames must be \[3, H, W\]"):
        write_animation([torch.zeros(1, 3, 8, 8)], tmp_path / "a.gif", "gif")
    with pytest.raises(ValueError, match="duration_ms must be an integer of at least 20"):
        write_animation(frames, tmp_path / "a.gif", "gif", duration_ms=10)
