"""Pictures of detections (minivlm/vision/draw.py): boxes where the regions say, only the regions asked
for, readable labels, contact sheets of the right size, and PNGs written atomically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from minivlm.errors import ImageError
from minivlm.regions import Regions
from minivlm.vision.draw import _colour, contact_sheet, draw_regions, save_png

GREY = (90, 100, 110)  # no box colour: _colour(i) always has one channel at 255


def _regions(boxes, scores, labels, tags=("circle", "square", "star"), attributes=()) -> Regions:
    k = len(boxes)
    return Regions(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(k, 4), features=torch.zeros(k, 8),
                   scores=torch.tensor(scores, dtype=torch.float32), labels=torch.tensor(labels, dtype=torch.long),
                   image_size=(240, 180), tags=[tags[i] for i in labels] if tags else [],
                   attribute_names=list(attributes))


def _canvas() -> Image.Image:
    return Image.new("RGB", (240, 180), GREY)


def _changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return (np.asarray(before) != np.asarray(after)).any(axis=2)


def _ring(shape, x1, y1, x2, y2, width=2) -> np.ndarray:
    """The pixels of a `width`-pixel outline drawn inward from the inclusive box [x1, x2] x [y1, y2]."""
    outer = np.zeros(shape, bool)
    outer[y1:y2 + 1, x1:x2 + 1] = True
    inner = np.zeros(shape, bool)
    inner[y1 + width:y2 + 1 - width, x1 + width:x2 + 1 - width] = True
    return outer & ~inner


def test_a_box_is_drawn_exactly_along_its_edges_in_its_class_colour():
    im = _canvas()
    x1, y1, x2, y2 = 30, 40, 170, 150
    out = draw_regions(im, _regions([[x1, y1, x2, y2]], [0.9], [1]))
    assert out.size == im.size and out is not im
    px = np.asarray(out)
    assert not _changed(_canvas(), im).any()  # the input is left alone
    colour = _colour(1)
    # On every side of the outline: the class colour; well inside and just outside: untouched.
    for x, y in [(x1, 100), (x1 + 1, 100), (x2, 100), (x2 - 1, 100), (100, y2), (100, y2 - 1), (x2, y1 + 2)]:
        assert tuple(px[y, x]) == colour, (x, y)
    for x, y in [(100, 100), (x1 + 2, 100), (x2 - 2, 100), (100, y2 - 2), (x1 - 1, 100), (x2 + 1, 100),
                 (100, y2 + 1)]:
        assert tuple(px[y, x]) == GREY, (x, y)
    # From the top edge down, the outline is all that changed (the label sits above the box) ...
    changed = _changed(im, out)
    ring = _ring(changed.shape, x1, y1, x2, y2)
    assert (changed[y1:] == ring[y1:]).all()
    # ... all of it in the box colour, but where a descender of the label's text ("q") dips into the top edge.
    ring[:, x1:x1 + 80] &= np.arange(ring.shape[0])[:, None] >= y1 + 2
    assert (px[ring] == colour).all()
    # Other classes get other colours.
    assert len({_colour(i) for i in range(12)}) == 12


def test_the_label_names_attribute_class_and_score_above_the_box():
    im = _canvas()
    x1, y1, x2, y2 = 30, 40, 170, 150
    out = draw_regions(im, _regions([[x1, y1, x2, y2]], [0.876], [2], attributes=["red"]))
    changed = _changed(im, out)
    above = changed[:y1]
    assert above.sum() > 100, "no label drawn"
    ys, xs = np.nonzero(above)
    assert ys.min() >= y1 - 12 and xs.min() >= x1  # next to the box's top left corner
    # The text, in black on the box colour, reads "red star 0.88" (attribute, class, score to 2 places).
    label = (slice(ys.min(), y1), slice(xs.min(), xs.max() + 1))

    def written(text: str) -> np.ndarray:
        ref = Image.new("RGB", im.size, _colour(2))
        ImageDraw.Draw(ref).text((x1 + 1, y1 - 11), text, fill=(0, 0, 0), font=ImageFont.load_default())
        return np.asarray(ref)[label]

    assert (written("red star 0.88") != _colour(2)).any(axis=2).sum() > 30  # the text itself, not just a fill
    assert np.array_equal(np.asarray(out)[label], written("red star 0.88"))
    for wrong in ("star red 0.88", "red star 0.87", "red star 0.876", "red square 0.88"):
        assert not np.array_equal(np.asarray(out)[label], written(wrong)), wrong

    def label_width(regions, **kw):
        cols = np.nonzero(_changed(im, draw_regions(im, regions, **kw))[:y1].any(axis=0))[0]
        return cols.max() - cols.min()

    with_attr = label_width(_regions([[x1, y1, x2, y2]], [0.876], [2], attributes=["red"]))
    without = label_width(_regions([[x1, y1, x2, y2]], [0.876], [2], attributes=["red"]), show_attributes=False)
    no_tags = label_width(_regions([[x1, y1, x2, y2]], [0.876], [2], tags=()))  # the class id instead: "2 0.88"
    assert with_attr > without > no_tags > 0


def test_only_the_top_boxes_above_min_score_are_drawn():
    im = _canvas()
    boxes = [[10, 20, 60, 70], [80, 20, 130, 70], [150, 20, 200, 70], [10, 100, 60, 150], [80, 100, 130, 150]]
    scores = [0.375, 0.875, 0.25, 0.5, 0.625]  # not sorted: drawing follows the scores, not the order
    regs = _regions(boxes, scores, [0, 1, 2, 0, 1])

    def drawn(out):
        px = np.asarray(out)
        return [tuple(px[(y1 + y2) // 2, x1]) != GREY for x1, y1, x2, y2 in boxes]

    assert drawn(draw_regions(im, regs)) == [True, True, False, True, True]  # 0.25 < min_score 0.3
    assert drawn(draw_regions(im, regs, max_boxes=2)) == [False, True, False, False, True]
    assert drawn(draw_regions(im, regs, max_boxes=3)) == [False, True, False, True, True]
    assert drawn(draw_regions(im, regs, min_score=0.5)) == [False, True, False, True, True]  # 0.5 is enough
    assert drawn(draw_regions(im, regs, min_score=0.6, max_boxes=1)) == [False, True, False, False, False]
    assert drawn(draw_regions(im, regs, min_score=0.0, max_boxes=10)) == [True] * 5
    # No regions, or none good enough: the picture is unchanged.
    assert not _changed(im, draw_regions(im, _regions([], [], []))).any()
    assert not _changed(im, draw_regions(im, regs, min_score=0.95)).any()


def test_images_come_from_paths_too_and_a_bad_path_is_a_clear_error(tmp_path):
    path = tmp_path / "scene.png"
    _canvas().save(path)
    regs = _regions([[30, 40, 170, 150]], [0.9], [1])
    assert np.array_equal(np.asarray(draw_regions(path, regs)), np.asarray(draw_regions(_canvas(), regs)))
    with pytest.raises(ImageError, match="not found"):
        draw_regions(tmp_path / "missing.png", regs)
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    with pytest.raises(ImageError, match="junk.png"):
        draw_regions(tmp_path / "junk.png", regs)


# ------------------------------------------------------------------------------------------------
# contact_sheet
# ------------------------------------------------------------------------------------------------

def test_contact_sheet_lays_images_out_in_rows_of_one_height():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200)]
    sizes = [(100, 50), (50, 100), (80, 80), (30, 60), (120, 40)]  # scaled to height 60: 120, 30, 60, 30, 180 wide
    images = [Image.new("RGB", s, c) for s, c in zip(sizes, colours)]
    sheet = contact_sheet(images, columns=2, height=60, pad=5)
    # Rows [120, 30], [60, 30], [180]: the widest is 180 + 2 pads; three rows of 60 + pad, and a pad on top.
    assert sheet.size == (190, 3 * 65 + 5) and sheet.mode == "RGB"
    px = np.asarray(sheet)
    origins = [(5, 5), (130, 5), (5, 70), (70, 70), (5, 135)]
    widths = [120, 30, 60, 30, 180]
    for (x, y), w, c in zip(origins, widths, colours):
        for dx, dy in [(0, 0), (w - 1, 0), (0, 59), (w - 1, 59), (w // 2, 30)]:
            assert tuple(px[y + dy, x + dx]) == c, (x + dx, y + dy)
        assert tuple(px[y + 30, x - 1]) == (255, 255, 255)  # the pad before it
    white = (px == 255).all(axis=2)
    assert white[:5].all() and white[:, :5].all() and white[-5:].all()
    assert white[70:130, 105:].all()  # a short row is padded with white to the sheet's width
    assert white[5:65, 165:].all()


def test_contact_sheet_defaults_and_single_column():
    one = contact_sheet([Image.new("RGB", (100, 100), (9, 9, 9))])
    assert one.size == (240 + 2 * 4, 240 + 2 * 4)
    column = contact_sheet([Image.new("RGB", (40, 20), (9, 9, 9))] * 3, columns=1, height=10, pad=2)
    assert column.size == (20 + 4, 3 * 12 + 2)
    assert contact_sheet([Image.new("RGB", (1000, 10), (9, 9, 9))], height=5, pad=0).size == (500, 5)
    assert contact_sheet([Image.new("RGB", (1, 1000), (9, 9, 9))], height=10, pad=0).size == (1, 10)  # never 0 wide


# ------------------------------------------------------------------------------------------------
# save_png
# ------------------------------------------------------------------------------------------------

def test_save_png_writes_a_png_pil_reads_back_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    target = tmp_path / "pics" / "sheet.png"  # the folder is made
    assert save_png(image, str(target)) == target
    with Image.open(target) as back:
        assert back.format == "PNG" and back.size == (53, 37)
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(image))
    assert sorted(p.name for p in target.parent.iterdir()) == ["sheet.png"]  # no temporary file left


def test_save_png_never_leaves_a_half_written_file(tmp_path):
    target = tmp_path / "sheet.png"
    save_png(Image.new("RGB", (8, 8), (1, 2, 3)), target)
    before = target.read_bytes()
    with pytest.raises(OSError):  # PNG has no CMYK: PIL fails while writing
        save_png(Image.new("CMYK", (8, 8)), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]


def test_contact_sheet_of_no_images_says_so():
    with pytest.raises(ValueError, match="no images"):
        contact_sheet([])
