"""Property-based tests (hypothesis) of everything that takes outside input: the image loader, the dataset
readers and the building of the transformer's inputs. The property is always the same: a result, or a
`MiniVLMError` with a message; never another exception.

Derandomized (the same examples on every run, so CI is reproducible), no example database, no deadline
(a slow machine must not fail a test), and sized to take seconds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from minivlm.data import readers
from minivlm.data.images import load_image
from minivlm.errors import MiniVLMError
from minivlm.fusion.layout import encode_text_and_tags, pad_encoded
from minivlm.text.checks import user_texts
from minivlm.text.tokenizer import get_tokenizer

VALID = Path(__file__).parent / "fixtures" / "valid"
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------ images

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00"]


@PROPERTY
@given(head=st.sampled_from(MAGIC), body=st.binary(max_size=300))
def test_random_bytes_load_or_fail_clearly(tmp_path, head, body):
    path = tmp_path / "x.img"
    path.write_bytes(head + body)
    try:
        image = load_image(path)
    except MiniVLMError as err:
        assert str(path) in str(err)
        return
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "PA"]
FORMATS_BY_EXT = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF", ".webp": "WEBP"}


@PROPERTY
@given(mode=st.sampled_from(MODES), w=st.integers(1, 48), h=st.integers(1, 48), ext=st.sampled_from(list(FORMATS_BY_EXT)),
       seed=st.integers(0, 2 ** 16))
def test_valid_images_of_any_mode_and_size_load_as_rgb(tmp_path, mode, w, h, ext, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"x{ext}"
    try:
        image.save(path, FORMATS_BY_EXT[ext])
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # PIL cannot write this mode in this format: not an input anyone can have
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (w, h)


# ------------------------------------------------------------------------------------------------ readers

def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys / indices) into a JSON value, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):  # the first few items of a list stand for the rest
            out += _paths(v, prefix + (i,))
    return out


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@st.composite
def mutated(draw, obj: Any) -> Any:
    """`obj` with one change at a random place: a key removed, a value of another type, an extra key, or a
    string replaced by unicode (non-BMP included)."""
    obj = copy.deepcopy(obj)
    path = draw(st.sampled_from(_paths(obj)))
    parent, last = None, None
    node = obj
    for key in path:
        parent, last, node = node, key, node[key]
    change = draw(st.sampled_from(["remove", "retype", "extra", "unicode"]))
    if change == "remove" and parent is not None:
        del parent[last]
    elif change == "extra" and isinstance(node, dict):
        node[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
    elif change == "unicode" and parent is not None:
        parent[last] = draw(st.text(alphabet=st.characters(codec="utf-8"), max_size=10))
    elif parent is not None:
        parent[last] = draw(JSON_VALUES)
    else:
        obj = draw(JSON_VALUES)
    return obj


def _check_reader(tmp_path: Path, files: dict[str, Any], read: Callable[[dict[str, Path]], Any]) -> None:
    paths = {}
    for name, obj in files.items():
        paths[name] = tmp_path / name
        text = "\n".join(json.dumps(o, ensure_ascii=False) for o in obj) if name.endswith(".jsonl") else \
            json.dumps(obj, ensure_ascii=False)
        paths[name].write_text(text, encoding="utf-8")
    try:
        read(paths)
    except MiniVLMError as err:
        assert str(err).strip()


def _load(name: str) -> Any:
    return json.loads((VALID / name).read_text(encoding="utf-8"))


READERS = {
    "coco instances": ("instances.json", lambda p: readers.read_coco_instances(p["f.json"])),
    "coco captions": ("captions.json", lambda p: readers.read_coco_captions(p["f.json"])),
    "karpathy": ("dataset_coco.json", lambda p: readers.read_karpathy(p["f.json"])),
    "vqa questions": ("vqa_questions.json", lambda p: readers.read_vqa(p["f.json"])),
    "vg objects": ("vg_objects.json", lambda p: readers.read_vg(p["f.json"])),
}


@pytest.mark.parametrize("kind", list(READERS))
def test_mutated_files_read_or_fail_clearly(tmp_path, kind):
    name, read = READERS[kind]

    @PROPERTY
    @given(obj=mutated(_load(name)))
    def check(obj):
        _check_reader(tmp_path, {"f.json": obj}, read)

    check()


def test_mutated_vqa_annotations_and_nlvr2_lines_read_or_fail_clearly(tmp_path):
    questions, answers = _load("vqa_questions.json"), _load("vqa_annotations.json")
    lines = [json.loads(line) for line in (VALID / "nlvr2.json").read_text().splitlines() if line.strip()]

    @PROPERTY
    @given(ann=mutated(answers), nl=mutated(lines))
    def check(ann, nl):
        _check_reader(tmp_path, {"q.json": questions, "a.json": ann},
                      lambda p: readers.read_vqa(p["q.json"], p["a.json"]))
        _check_reader(tmp_path, {"n.jsonl": nl if isinstance(nl, list) else [nl]},
                      lambda p: readers.read_nlvr2(p["n.jsonl"]))

    check()


# ------------------------------------------------------------------------------------------------ text input

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=200) | st.just("") | st.just("   \n\t") | \
    st.lists(st.sampled_from(["a", " ", "red", "😀", "𝔘", "\u200b", "é"]), min_size=300, max_size=2000).map("".join)


@PROPERTY
@given(text=TEXT, tags=st.lists(st.text(max_size=20), max_size=8), max_text=st.integers(2, 40), max_tag=st.integers(0, 20))
def test_any_text_builds_inputs_within_their_budgets(text, tags, max_text, max_tag):
    tok = get_tokenizer()
    enc = encode_text_and_tags(tok, text, tags, max_text, max_tag)
    n_text = enc.segments.count(0)
    assert 2 <= n_text <= max_text and len(enc.ids) - n_text <= max_tag
    assert enc.ids[0] == tok.cls_id and enc.ids[n_text - 1] == tok.sep_id
    assert all(0 <= i < tok.vocab_size for i in enc.ids)
    batch = pad_encoded([enc, encode_text_and_tags(tok, "a", None, max_text, max_tag)], tok.pad_id)
    assert batch["input_ids"].shape == batch["text_mask"].shape and batch["text_mask"][0].sum() == len(enc.ids)


@PROPERTY
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_user_text_is_accepted_or_refused_with_a_message(texts):
    try:
        out = user_texts(texts, "question", get_tokenizer(), 16)
    except MiniVLMError as err:
        assert "question" in str(err) and any(not t.strip() for t in texts)
        return
    assert out == texts and all(t.strip() for t in texts)

