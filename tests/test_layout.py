"""The OSCAR input layout of `minivlm.fusion.layout`, and every caller built on it: the PyTorch batches
(`build_batch`, the caption prefix, retrieval's pair gathering) and the torch-free edge inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from minivlm import edge
from minivlm.config import BertConfig, CaptionTaskConfig
from minivlm.fusion.inputs import build_batch
from minivlm.fusion.layout import (EncodedText, caption_text, encode_tags, encode_text, encode_text_and_tags,
                                   join_slots, pad_encoded, pad_rows, tag_prefix)
from minivlm.regions import Regions
from minivlm.tasks.caption_data import CaptionDataset
from minivlm.tasks.caption_model import build_prefix
from minivlm.tasks.retrieval import PairEncoder
from minivlm.text.tokenizer import Tokenizer

PAD, CLS, SEP = 0, 2, 3
A, DOG, ON, GRASS, CAT, RED = 5, 6, 7, 8, 9, 10
TEXTS = ["a dog on grass", "", "a red cat on a red dog on grass on a dog", "red"]
TAGS = [["dog", "grass"], [], ["cat", "", "red", "dog", "grass", "cat"], ["red"]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "on", "grass", "cat", "red"]))
    return Tokenizer(path)


def cfg_of(tok: Tokenizer, max_text_len: int = 10, max_tag_len: int = 6) -> BertConfig:
    return BertConfig("tiny", num_layers=1, hidden_size=8, intermediate_size=16, num_heads=2, vocab_size=tok.vocab_size,
                      dropout=0.0, region_dim=4, max_regions=3, max_text_len=max_text_len, max_tag_len=max_tag_len)


def regions(k: int, seed: int, tags: list[str]) -> Regions:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 50
    return Regions(boxes=torch.cat([xy, xy + 10], 1), features=torch.randn(k, 4, generator=g),
                   scores=torch.rand(k, generator=g), labels=torch.zeros(k, dtype=torch.long), image_size=(100, 100),
                   tags=[tags[i % len(tags)] if tags else "" for i in range(k)])


def images() -> list[Regions]:
    return [regions(4, 0, ["dog", "grass"]), regions(2, 1, []), regions(0, 2, []), regions(5, 3, ["cat", "red", "cat"])]


def torch_arrays(obj, names) -> dict[str, np.ndarray]:
    return {n: getattr(obj, n).numpy() for n in names}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, array in want.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name


# ---------------------------------------------------------------------------------------------- the layout


def test_text_only(tok):
    e = encode_text_and_tags(tok, "a dog", None, 10, 6)
    assert e == EncodedText([CLS, A, DOG, SEP], [0, 0, 0, 0], [False, True, True, False])
    assert encode_text_and_tags(tok, "a dog", [], 10, 6) == e  # no tags: no tag part, no lone [SEP]
    assert encode_text_and_tags(tok, "a dog", ["", ""], 10, 6) == e
    assert encode_text_and_tags(tok, "", None, 10, 6) == EncodedText([CLS, SEP], [0, 0], [False, False])


def test_text_and_tags(tok):
    e = encode_text_and_tags(tok, "a dog on grass", ["dog", "grass"], 10, 6)
    assert e.ids == [CLS, A, DOG, ON, GRASS, SEP, DOG, GRASS, SEP]
    assert e.segments == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert e.maskable == [False, True, True, True, True, False, True, True, False]
    assert encode_text_and_tags(tok, "a dog on grass", "dog grass", 10, 6) == e  # tags as one string


def test_long_text_and_long_tags_are_cut_to_their_budgets(tok):
    e = encode_text_and_tags(tok, "a dog on grass a dog on grass", ["dog", "cat", "red", "grass"], 6, 3)
    assert e.ids == [CLS, A, DOG, ON, GRASS, SEP, DOG, CAT, SEP]  # [CLS] text [SEP]: 6, tags [SEP]: 3
    assert e.segments == [0] * 6 + [1] * 3
    assert encode_text_and_tags(tok, "a dog", ["dog"], 3, 1).ids == [CLS, A, SEP]  # no room for a tag: no tag part


def test_padding_a_batch(tok):
    batch = pad_encoded([encode_text_and_tags(tok, "a dog", None, 10, 6),
                         encode_text_and_tags(tok, "a dog on grass", ["dog", "grass"], 10, 6)], PAD)
    assert batch["input_ids"].tolist() == [[CLS, A, DOG, SEP, PAD, PAD, PAD, PAD, PAD],
                                           [CLS, A, DOG, ON, GRASS, SEP, DOG, GRASS, SEP]]
    assert batch["token_type_ids"].tolist() == [[0] * 9, [0] * 6 + [1] * 3]
    assert batch["position_ids"].tolist() == [list(range(9))] * 2  # pads too: they are masked out
    assert batch["text_mask"].tolist() == [[True] * 4 + [False] * 5, [True] * 9]
    assert batch["maskable"].tolist() == [[False, True, True] + [False] * 6,
                                          [False, True, True, True, True, False, True, True, False]]
    assert {a.dtype for a in batch.values()} == {np.dtype(np.int64), np.dtype(bool)}


def test_caption_layout_puts_the_tags_after_any_caption(tok):
    ids, valid = caption_text(tok, ["a dog", "a dog on grass a dog on grass"], 6)
    assert ids.tolist() == [[CLS, A, DOG, SEP, PAD, PAD], [CLS, A, DOG, ON, GRASS, SEP]]
    assert valid.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    tags = tag_prefix(tok, [["dog", "grass"], [], ["cat", "red", "dog"]], 6, 3)
    assert tags["tag_ids"].tolist() == [[DOG, GRASS, SEP], [PAD, PAD, PAD], [CAT, RED, SEP]]
    assert tags["tag_mask"].tolist() == [[True] * 3, [False] * 3, [True] * 3]
    assert tags["tag_pos"].tolist() == [[6, 7, 8]] * 3  # max_text_len + 0..
    assert tag_prefix(tok, [[], []], 6, 3)["tag_ids"].shape == (2, 0)
    onnx = tag_prefix(tok, [[], []], 6, 3, min_len=1)  # the ONNX graphs take no zero-width axis
    assert onnx["tag_ids"].tolist() == [[PAD], [PAD]] and onnx["tag_mask"].tolist() == [[False], [False]]


def test_slots_hold_the_compact_layout_with_pads_inside(tok):
    cfg = cfg_of(tok)
    text, text_valid = pad_rows([encode_text(tok, t, cfg.max_text_len) for t in TEXTS], PAD)  # slot of 8
    tag, tag_valid = pad_rows([encode_tags(tok, g, cfg.max_tag_len) for g in TAGS], PAD)  # slot of 5
    for i in range(len(TAGS)):
        for t in range(len(TEXTS)):
            slots = join_slots(tok, text[[t]], text_valid[[t]], tag[[i]], tag_valid[[i]])
            keep = slots["text_mask"][0]
            one = encode_text_and_tags(tok, TEXTS[t], TAGS[i], cfg.max_text_len, cfg.max_tag_len)
            compact = pad_encoded([one], PAD)
            for name in ("input_ids", "token_type_ids", "position_ids"):
                assert np.array_equal(slots[name][0, keep], compact[name][0]), name
            assert (slots["input_ids"][0, ~keep] == PAD).all()
    first = join_slots(tok, text[[0]], text_valid[[0]], tag[[1]], tag_valid[[1]])  # no tags: the last [SEP] masked
    assert first["input_ids"][0].tolist() == [CLS, A, DOG, ON, GRASS] + [PAD] * 4 + [SEP] + [PAD] * 6
    assert first["token_type_ids"][0].tolist() == [0] * 10 + [1] * 6
    assert first["position_ids"][0].tolist() == [0, 1, 2, 3, 4] + [4] * 4 + [5] * 7  # pads repeat the last position
    assert first["text_mask"][0].tolist() == [True] * 5 + [False] * 4 + [True] + [False] * 6


# ---------------------------------------------------------------------------------------------- the callers


@pytest.mark.parametrize("budgets", [(10, 6), (6, 3), (2, 1), (40, 30)])
def test_torch_and_torch_free_paths_give_identical_arrays(tok, budgets):
    cfg = cfg_of(tok, *budgets)
    rl = images()
    tags = [r.object_tags(cfg.max_regions, cfg.tag_min_score) for r in rl]
    encoded = [encode_text_and_tags(tok, t, g, cfg.max_text_len, cfg.max_tag_len) for t, g in zip(TEXTS, tags)]
    text = pad_encoded(encoded, PAD)
    batch = build_batch(tok, TEXTS, None, rl, cfg)
    assert_same(torch_arrays(batch, text), text)

    prefix = build_prefix(tok, rl, cfg)
    want = tag_prefix(tok, tags, cfg.max_text_len, cfg.max_tag_len)
    assert_same(torch_arrays(prefix, want), want)
    task = CaptionTaskConfig(objective="every-token")  # deterministic: no random masking
    ds = CaptionDataset(list(enumerate(TEXTS)), dict(enumerate(rl)), tok, cfg, task)
    caption = ds.collate([ds[i] for i in range(len(TEXTS))])
    ids, valid = caption_text(tok, TEXTS, cfg.max_text_len)
    assert np.array_equal(caption.input_ids.numpy(), ids) and np.array_equal(caption.caption_mask.numpy(), valid)

    enc = PairEncoder(cfg, tok, rl, TEXTS)
    image_idx, text_idx = (g.flatten() for g in torch.meshgrid(torch.arange(len(rl)), torch.arange(len(TEXTS)),
                                                               indexing="ij"))
    pairs = enc.batch(image_idx, text_idx)
    for row, (i, t) in enumerate(zip(image_idx.tolist(), text_idx.tolist())):
        keep = pairs.text_mask[row]
        one = build_batch(tok, [TEXTS[t]], None, [rl[i]], cfg)  # the pair built the plain way
        for name in ("input_ids", "token_type_ids", "position_ids"):
            assert torch.equal(getattr(pairs, name)[row, keep], getattr(one, name)[0]), name

    ecfg = {"max_regions": cfg.max_regions, "tag_min_score": cfg.tag_min_score, "max_text_len": cfg.max_text_len,
            "max_tag_len": cfg.max_tag_len, "region_dim": cfg.region_dim}
    er = [edge.EdgeRegions(r.boxes.numpy(), r.features.numpy(), r.scores.numpy(), r.labels.numpy(), r.image_size,
                           list(r.tags)) for r in rl]
    fusion = edge.fusion_inputs(tok, er, TEXTS, ecfg)
    assert_same(fusion, {"input_ids": batch.input_ids.numpy(), "token_type_ids": batch.token_type_ids.numpy(),
                         "position_ids": batch.position_ids.numpy()})
    assert np.array_equal(fusion["text_mask"], batch.text_mask.numpy())
    assert np.array_equal(fusion["region_mask"], batch.region_mask.numpy())
    edge_prefix = edge.prefix_inputs(tok, er, ecfg)
    g = prefix.tag_ids.shape[1]
    assert_same({k: v[:, :g] for k, v in edge_prefix.items() if k in ("input_ids", "position_ids")},
                {"input_ids": prefix.tag_ids.numpy(), "position_ids": prefix.tag_pos.numpy()})
    assert np.array_equal(edge_prefix["attention_mask"][:, :g], prefix.tag_mask.numpy())


def test_layout_imports_no_torch():
    code = "import sys, minivlm.fusion.layout; assert not [m for m in sys.modules if m.split('.')[0] == 'torch']"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
