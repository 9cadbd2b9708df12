"""Pictures in and out: the user's image input, PNG frames and looping animations.

``load_image`` is the only place a user-supplied image file is decoded. It accepts PNG, JPEG and
WebP, judged by the decoded format (not the file name), at most ``MAX_MEGAPIXELS`` and at most
``MAX_ASPECT_RATIO`` to 1; the size is read from the header and checked before any pixel data is
decoded. Every problem is an
``ImageInputError`` whose message starts with ``image: ``.
"""

from __future__ import annotations

import math
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow's names; JPEG also yields MPO (camera JPEGs)
ACCEPTED_TEXT = "PNG, JPEG or WebP"
MAX_MEGAPIXELS = 40
# CLIP's preprocessing resizes the short side to 224 px before it crops, so the long side grows by
# as much: a 1,000,000 x 1 strip (a 3 kB PNG) would become 224 x 224,000,000 pixels. At 100:1 the
# resized picture is at most 224 x 22,400 (15 MB).
MAX_ASPECT_RATIO = 100
ANIMATION_FORMATS = ("gif", "webp")
# Lossy animated WebP: 16 frames of 256 px take ~0.2 s and ~8-30 kB a frame at quality 90
# (lossless: 100-150 kB a frame, 8x the time); method 6 is 3x slower for no measurable gain.
WEBP_QUALITY = 90
WEBP_METHOD = 4
# The GIF palette is computed on a mosaic of all frames downscaled to at most this many pixels.
GIF_PALETTE_PIXELS = 1 << 16
# Pixels of an animation's frames held at once while it is encoded (about 300 MB as RGB): 1,500
# frames of one 256 px picture, 47 of eight 512 px pictures side by side.
MAX_ANIMATION_PIXELS = 100_000_000


class ImageInputError(ValueError):
    """An image input that cannot be used; the message starts with ``image: ``."""


def _size_check(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_MEGAPIXELS * 1_000_000:
        raise ImageInputError(
            f"image: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of {MAX_MEGAPIXELS}"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageInputError(
            f"image: {width}x{height} is more elongated than {MAX_ASPECT_RATIO}:1; CLIP sees only its centred "
            "square, so crop the picture to the part that matters"
        )


def _found_format(path: Path) -> str:
    """What Pillow makes of a file it could not open as an accepted format (header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return f"found {image.format}"
    except Exception:
        return "unrecognised format"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit greyscale PNG: scale to 8 bits instead of clipping at 255
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """A user's PNG, JPEG or WebP file as an RGB ``PIL.Image``, fully decoded and upright.

    The EXIF orientation is applied; animations give their first frame; palette, greyscale
    and alpha images are converted with ``convert("RGB")`` (alpha is dropped) as open_clip's
    preprocessing does, 16-bit greyscale being scaled to 8 bits first.

    Raises ``ImageInputError`` (a ``ValueError``) for an unreadable, empty, unsupported,
    oversized (more than ``MAX_MEGAPIXELS``), too elongated (``MAX_ASPECT_RATIO``), undecodable or
    truncated file and for anything
    Pillow flags as a decompression bomb.
    """
    path = Path(path)
    try:
        status = path.stat()
    except OSError as exc:
        raise ImageInputError(f"image: the file cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(status.st_mode):
        raise ImageInputError(f"image: not a regular file; a {ACCEPTED_TEXT} file is required")
    if status.st_size == 0:
        raise ImageInputError(f"image: the file is empty; a {ACCEPTED_TEXT} file is required")
    kind = ""  # the format, once Pillow has read the header
    # Pillow warns about, then refuses, images over its own pixel limit; here both are errors.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=ACCEPTED_FORMATS) as image:
                kind = {"MPO": "JPEG ", "WEBP": "WebP "}.get(image.format, f"{image.format} ")
                _size_check(image)  # from the header, before decoding
                image.load()  # decode now so that a truncated or corrupt file fails here
                return _to_rgb(ImageOps.exif_transpose(image))
        except ImageInputError:
            raise
        except UnidentifiedImageError as exc:
            raise ImageInputError(f"image: not a {ACCEPTED_TEXT} file ({_found_format(path)})") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageInputError(
                f"image: refused as a possible decompression bomb ({exc}); "
                f"images of at most {MAX_MEGAPIXELS} megapixels are accepted"
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, EOFError...
            raise ImageInputError(
                f"image: the {kind}file is truncated or corrupt and could not be decoded ({exc}); "
                f"a complete {ACCEPTED_TEXT} file is required"
            ) from exc


def load_image_as(name: str, path: str | Path) -> Image.Image:
    """``load_image`` for the input ``name``: its messages start with ``{name}: ``."""
    try:
        return load_image(path)
    except ImageInputError as error:
        raise ImageInputError(f"{name}: {str(error).removeprefix('image: ')}") from None


def load_init_image(path: str | Path, size: int) -> torch.Tensor:
    """A user's init picture, checked as ``load_image`` checks ``image`` (messages start with
    ``init_image: ``), its shorter side resized to ``size`` and its centre cropped (bicubic):
    ``[3, size, size]`` float32 in [0, 1]."""
    picture = load_image_as("init_image", path)
    fitted = ImageOps.fit(picture, (size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 255


def to_image(frame: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    if not isinstance(frame, torch.Tensor) or frame.dim() != 3 or frame.shape[0] != 3:
        shape = list(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
        raise ValueError(f"write_animation: frames must be [3, H, W] tensors or PIL images, got {shape}")
    pixels = (frame.detach().float().nan_to_num(0.0).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), "RGB")


def _gif_frames(images: list[Image.Image]) -> list[Image.Image]:
    """All frames on one adaptive 256-colour palette (max coverage), Floyd-Steinberg dithered.

    One palette keeps unchanged regions identical from frame to frame (no dither flicker);
    it is computed on a downscaled mosaic of every frame, so it covers colours of the whole run.
    """
    width, height = images[0].size
    factor = max(1, math.ceil(math.sqrt(width * height * len(images) / GIF_PALETTE_PIXELS)))
    small = [image.reduce(factor) if factor > 1 else image for image in images]
    mosaic = Image.new("RGB", (small[0].width, small[0].height * len(small)))
    for row, image in enumerate(small):
        mosaic.paste(image, (0, row * small[0].height))
    palette = mosaic.quantize(256, method=Image.Quantize.MAXCOVERAGE)
    return [image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG) for image in images]


def write_animation(
    frames: Sequence[torch.Tensor | Image.Image], path: str | Path, fmt: str, duration_ms: int = 100
) -> Path:
    """Write ``frames`` as an endlessly looping animated GIF or WebP; returns ``path``.

    ``frames``: ``[3, H, W]`` float tensors in [0, 1] (clamped, rounded to 8 bits) or PIL
    images, all the same size. ``fmt``: ``"gif"`` (one adaptive palette, dithered) or
    ``"webp"`` (lossy, quality ``WEBP_QUALITY``). ``duration_ms`` per frame, at least 20
    (GIF stores hundredths of a second; many viewers slow down shorter GIF delays).
    """
    if fmt not in ANIMATION_FORMATS:
        raise ValueError(f"write_animation: fmt must be one of {', '.join(ANIMATION_FORMATS)}, got {fmt!r}")
    if isinstance(duration_ms, bool) or not isinstance(duration_ms, int) or duration_ms < 20:
        raise ValueError(f"write_animation: duration_ms must be an integer of at least 20, got {duration_ms!r}")
    images = [to_image(frame) for frame in frames]
    if not images:
        raise ValueError("write_animation: no frames")
    if len({image.size for image in images}) > 1:
        raise ValueError(f"write_animation: frames differ in size: {sorted({image.size for image in images})}")
    path = Path(path)
    if fmt == "gif":
        images = _gif_frames(images)
        options = {"format": "GIF"}
    else:
        options = {"format": "WEBP", "quality": WEBP_QUALITY, "method": WEBP_METHOD}
    # Both encoders merge identical consecutive frames into one longer frame.
    images[0].save(path, save_all=True, append_images=images[1:], loop=0, duration=duration_ms, **options)
    return path


def evenly_spaced(items: list, n: int) -> list:
    """At most ``n`` (>= 2) of ``items``, evenly spaced, the first and the last among them."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _side_by_side(paths: list[Path]) -> Image.Image:
    pictures = [Image.open(path).convert("RGB") for path in paths]
    if len(pictures) == 1:
        return pictures[0]
    width, height = pictures[0].size
    sheet = Image.new("RGB", (width * len(pictures), height))
    for i, picture in enumerate(pictures):
        sheet.paste(picture, (i * width, 0))
    return sheet


def animation_of_files(frames: list[list[Path]], path: Path, fmt: str) -> Path:
    """An animation of pictures already written: one frame per entry of ``frames``, its pictures
    side by side.

    The encoders hold every frame at once, so a long run's frames are thinned out to at most
    ``MAX_ANIMATION_PIXELS`` in all, evenly spaced, the first and the last always kept.
    """
    with Image.open(frames[0][0]) as first:  # the header only
        frame_pixels = first.width * first.height * len(frames[0])
    frames = evenly_spaced(frames, max(2, MAX_ANIMATION_PIXELS // frame_pixels))
    return write_animation([_side_by_side(paths) for paths in frames], path, fmt)
