"""Folders of generated images for ``didp index``: solid colours and patterns, and hostile files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}


def pattern(name: str, size: int = 96) -> Image.Image:
    """A picture by name: ``<colour>`` solid, ``<colour>-stripes`` (on white), ``<colour>-disc``
    (on black), ``<colour>-checks`` (with white)."""
    colour, _, kind = name.partition("-")
    fill = COLOURS[colour]
    if not kind:
        return Image.new("RGB", (size, size), fill)
    image = Image.new("RGB", (size, size), (255, 255, 255) if kind != "disc" else (0, 0, 0))
    draw = ImageDraw.Draw(image)
    if kind == "stripes":
        for x in range(0, size, 16):
            draw.rectangle([x, 0, x + 7, size], fill=fill)
    elif kind == "disc":
        draw.ellipse([size // 6, size // 6, size - size // 6, size - size // 6], fill=fill)
    elif kind == "checks":
        for x in range(0, size, 24):
            for y in range(0, size, 24):
                if (x + y) // 24 % 2 == 0:
                    draw.rectangle([x, y, x + 23, y + 23], fill=fill)
    return image


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb by its size."""
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


HOSTILE = {
    "bad/bomb.png": lambda: png_claiming(100_000, 100_000),
    "bad/truncated.jpg": lambda: _encoded(pattern("red-checks", 256), "JPEG")[:600],
    "bad/text.png": lambda: b"this is not a picture\n" * 10,
    "bad/empty.webp": lambda: b"",
    "bad/animation.gif": lambda: _encoded(pattern("blue"), "GIF"),
}


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def image_folder(root: Path, names: list[str], hostile: bool = True) -> dict[str, Path]:
    """``root`` filled with a PNG or JPEG per name (alternately, some in a subfolder), and with the
    ``HOSTILE`` files; returns each id (the path below ``root``) and its file."""
    written = {}
    for i, name in enumerate(names):
        relative = f"{'sub/' if i % 3 == 2 else ''}{name}.{'png' if i % 2 == 0 else 'jpg'}"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pattern(name).save(path, "PNG" if path.suffix == ".png" else "JPEG", quality=95)
        written[relative] = path
    if hostile:
        for relative, make in HOSTILE.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make())
    (root / "notes.txt").write_text("not listed: not an image's suffix\n")
    (root / ".hidden.png").write_bytes(_encoded(pattern("red"), "PNG"))
    return written


def index_here(src: Path, output: Path, models, kind: str = "auto") -> Path:
    """The index ``didp index SRC -o OUTPUT`` builds, built in this process without Ray (one shard):
    for tests and benchmarks that need an index but not the job."""
    from pipeline.shards import input_sha256, write_parquet
    from retrieval.identity import clip_identity
    from retrieval.images import items_table
    from retrieval.sources import list_sources
    from retrieval.store import IndexCounts, IndexManifest, IndexSettings, finish_index, shard_path, shard_schema

    clip = clip_identity(models)
    rows = list_sources(src)
    table = items_table(models.clip, rows["id"], rows["source"].to_pylist(), shard_schema(clip.dim))
    write_parquet(shard_path(output, 0), table)
    errors = table.num_rows - table["error"].null_count
    manifest = IndexManifest(
        clip=clip,
        input_sha256=input_sha256(rows["id"], rows["source"]),
        settings=IndexSettings(shard_size=max(1, rows.num_rows), column=None, id_column=None, index=kind),
        versions={},
        counts=IndexCounts(
            items=rows.num_rows, indexed=rows.num_rows - errors, errors=errors, shards=1, shards_written=1
        ),
    )
    finish_index(output, 1, kind, manifest)
    return output


DEMO_NAMES = [f"{colour}{kind}" for colour in COLOURS for kind in ("", "-stripes", "-disc", "-checks")]

if __name__ == "__main__":  # python -m testkit.images DIR: the demo folder of make demo-search
    import sys

    folder = Path(sys.argv[1])
    image_folder(folder, DEMO_NAMES)
    print(f"{folder}: {len(DEMO_NAMES)} pictures and {len(HOSTILE)} hostile files")
