"""The contact sheet: the top matches' thumbnails in a grid, each with its rank, score and id."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

from .images import THUMBNAIL_SIDE

COLUMNS = 5
LABEL = 28  # pixels below each thumbnail for its two lines of text
GAP = 4
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)


def contact_sheet(entries: list[tuple[bytes, str]], side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A grid of ``entries`` (JPEG bytes, label) in order, ``COLUMNS`` a row, left to right."""
    columns = max(1, min(COLUMNS, len(entries)))
    rows = max(1, math.ceil(len(entries) / columns))
    cell_w, cell_h = side + GAP, side + LABEL + GAP
    sheet = Image.new("RGB", (columns * cell_w + GAP, rows * cell_h + GAP), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (data, label) in enumerate(entries):
        x, y = GAP + (i % columns) * cell_w, GAP + (i // columns) * cell_h
        with Image.open(io.BytesIO(data)) as thumb:
            picture = thumb.convert("RGB")
        sheet.paste(picture, (x + (side - picture.width) // 2, y + (side - picture.height) // 2))
        for line, text in enumerate(label.split("\n")[:2]):
            draw.text((x, y + side + 2 + line * 12), _fit(draw, text, font, side), fill=TEXT, font=font)
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
