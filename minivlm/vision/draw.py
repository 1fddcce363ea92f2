"""Pictures of detections: boxes and tags (class, best attribute, score) drawn on the image."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from minivlm.data.images import load_image
from minivlm.regions import Regions


def _colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_regions(image: Any, regions: Regions, max_boxes: int = 10, min_score: float = 0.3,
                 show_attributes: bool = True) -> Image.Image:
    """A copy of `image` (path or PIL) with the top `max_boxes` regions scoring >= min_score drawn on it."""
    im = load_image(image).copy()
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    order = regions.scores.argsort(descending=True).tolist()[:max_boxes]
    for i in order:
        score = float(regions.scores[i])
        if score < min_score:
            continue
        x1, y1, x2, y2 = [float(v) for v in regions.boxes[i]]
        label = int(regions.labels[i])
        colour = _colour(label)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        tag = regions.tags[i] if regions.tags else str(label)
        if show_attributes and regions.attribute_names:
            tag = f"{regions.attribute_names[i]} {tag}"
        text = f"{tag} {score:.2f}"
        tx, ty = x1 + 1, max(0.0, y1 - 11)
        box = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(box, fill=colour)
        draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
    return im


def contact_sheet(images: list[Image.Image], columns: int = 3, height: int = 240, pad: int = 4) -> Image.Image:
    """Images scaled to one height, laid out in rows."""
    if not images:
        raise ValueError("contact_sheet: no images to lay out")
    thumbs = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    rows = [thumbs[i:i + columns] for i in range(0, len(thumbs), columns)]
    width = max(sum(t.width for t in row) + pad * (len(row) + 1) for row in rows)
    sheet = Image.new("RGB", (width, len(rows) * (height + pad) + pad), (255, 255, 255))
    y = pad
    for row in rows:
        x = pad
        for t in row:
            sheet.paste(t, (x, y))
            x += t.width + pad
        y += height + pad
    return sheet


def save_png(image: Image.Image, path: str | Path) -> Path:
    from minivlm.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
