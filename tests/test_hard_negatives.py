"""Hard ITM negatives: one word of a caption swapped for another of its family, and their place in pre-training."""

from __future__ import annotations

import re

import torch

from minivlm.config import BertConfig, PretrainTaskConfig
from minivlm.regions import Regions
from minivlm.tasks.corpus import PretrainExample
from minivlm.tasks.hard_negatives import WordFamilies
from minivlm.tasks.pretrain import IGNORE, PretrainCollator, PretrainDataset, PretrainModel, evaluate, swap_batches
from minivlm.text.tokenizer import get_tokenizer

FAMILIES = WordFamilies.build(["circle", "square", "star", "cross"],
                              {"colour": ["red", "blue", "pink"], "size": ["small", "large"]})
DIM = 16
TINY = BertConfig("tiny", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, dropout=0.0,
                  region_dim=DIM, max_regions=4, max_text_len=16, max_tag_len=6)


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def test_a_swap_changes_one_word_within_its_family():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        text = "Three large red circles to the left of a small blue star."
        out = FAMILIES.swap(text, avoid=["circle", "star"], generator=g)
        before, after = words(text), words(out)
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(before) == len(after) and len(changed) == 1, out
        old, new = changed[0]
        assert any(old.lower() in f and new.lower() in f for f in FAMILIES.families), (old, new)
        assert new[0].isupper() == old[0].isupper()  # "Three" -> "Five", never "five"
        assert new.lower() not in {"circle", "circles", "star", "stars"}  # never one of the image's tags
        seen.add(old.lower())
    # every swappable word gets its turn: the number, size, colour, class (singular and plural) and side words
    assert seen == {"three", "large", "red", "circles", "left", "small", "blue", "star"}
    assert FAMILIES.swap("A drawing of shapes.", generator=g) is None
    assert FAMILIES.swap("A circle.", avoid=["square", "star", "cross"], generator=g) is None  # nothing left


def test_swaps_are_seeded():
    text = "A red circle above a blue square."
    a = [FAMILIES.swap(text, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    b = [FAMILIES.swap(text, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert a == b and len(set(a)) > 3


def test_families_without_groups_and_numbers_and_sides():
    f = WordFamilies.build(["dog"], None, ["red", "wooden"])
    assert ("red", "wooden") in f.families  # ungrouped attributes (Visual Genome's) swap among themselves
    assert ("dog",) not in f.families  # a family of one word cannot swap
    assert any("seven" in fam for fam in f.families) and ("left", "right") in f.families


def _dataset(task: PretrainTaskConfig, n_images: int = 30) -> tuple[PretrainDataset, list[PretrainExample]]:
    examples = [PretrainExample(i, 0, f"A red circle and {['two', 'three'][i % 2]} blue stars.", ["circle", "star"])
                for i in range(n_images)]
    regions = {i: Regions(torch.tensor([[0.0, 0, 10, 10]]), torch.randn(1, DIM), torch.ones(1),
                          torch.zeros(1, dtype=torch.long), (20, 20)) for i in range(n_images)}
    return PretrainDataset(examples, [regions], task, families=FAMILIES), examples


def test_pretraining_pollutes_with_swaps_at_the_asked_share():
    g = torch.Generator().manual_seed(0)
    ds, examples = _dataset(PretrainTaskConfig(pollute_caption_frac=1.0, itm_swap_frac=0.5))
    items = [ds.item(i % len(examples), g) for i in range(2000)]
    polluted = [it for it in items if it.polluted]
    swaps = [it for it in polluted if it.negative == "swap"]
    assert abs(len(swaps) / len(polluted) - 0.5) < 0.06
    for it in swaps:  # its own image's caption, one word off
        own = examples[it.image[1]].text
        assert it.text_image == it.image and len([1 for a, b in zip(words(own), words(it.text)) if a != b]) == 1
    assert {it.negative for it in polluted} == {"swap", "caption"} and {it.negative for it in items if not it.polluted} == {""}
    plain, _ = _dataset(PretrainTaskConfig(pollute_caption_frac=1.0))  # OSCAR's: another image's caption only
    assert {plain.item(i % 30, g).negative for i in range(300)} == {"", "caption"}


def test_swap_batches_pair_each_caption_with_its_swap_unmasked():
    ds, _ = _dataset(PretrainTaskConfig())
    tok = get_tokenizer()
    batches = swap_batches(ds, PretrainCollator(tok, TINY), 8, 10)
    labels = torch.cat([b.itm_labels for b in batches]).tolist()
    assert labels == [0, 1] * 10
    assert all((b.mlm_labels == IGNORE).all() for b in batches)
    first = batches[0]
    assert not torch.equal(first.input_ids[0], first.input_ids[1])  # the swapped word
    torch.manual_seed(0)
    scores = evaluate(PretrainModel(TINY), batches)  # ITM alone: no masked token, no MLM crash
    assert scores["itm_pairs"] == 20 and scores["mlm_tokens"] == 0 and 0.0 <= scores["itm_acc"] <= 1.0


def test_shares_outside_zero_one_are_refused():
    import pytest

    from minivlm.errors import MiniVLMError

    for field in ("itm_swap_frac", "mask_prob", "itm_pollute_prob"):
        with pytest.raises(MiniVLMError, match=field.replace("_", "-")):
            PretrainTaskConfig(**{field: 1.5})
    assert PretrainTaskConfig(itm_swap_frac=1.0, itm_weight=5.0).itm_weight == 5.0  # a weight is not a share
