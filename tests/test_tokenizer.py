import pytest

from minivlm.errors import MiniVLMError
from minivlm.text.tokenizer import Tokenizer, get_tokenizer


def test_real_words_get_real_ids():
    tok = get_tokenizer()
    ids = tok.encode("A red striped circle is left of the large hexagon.")
    assert tok.unk_id not in ids
    assert tok.tokens("red circle") == ["red", "circle"]
    # BERT uncased ids, as in every BERT checkpoint's vocab.txt
    assert tok.encode("the") == [1996] and tok.encode("red") == [2417]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.vocab_size == 30522


def test_lowercase_wordpiece_and_decode_round_trip():
    tok = get_tokenizer()
    assert tok.encode("HEXAGON") == tok.encode("hexagon")
    assert len(tok.tokens("hexagon")) > 1  # split into word pieces, none unknown
    text = "two blue hexagons above a dotted star"
    assert tok.decode(tok.encode(text)) == text


def test_truncation_and_empty_text():
    tok = get_tokenizer()
    assert tok.encode("", max_len=5) == []
    long = " ".join(["circle"] * 1000)
    assert len(tok.encode(long, max_len=35)) == 35
    assert [len(x) for x in tok.encode_batch(["a b c", long], max_len=4)] == [3, 4]


def test_missing_or_bad_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(MiniVLMError, match="not found"):
        Tokenizer(tmp_path / "nope.txt")
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(MiniVLMError, match="missing"):
        Tokenizer(bad)


def test_hyphenated_world_phrases_round_trip_without_spaces():
    """BERT splits "five-sided" into "five", "-", "sided"; decoding must glue the hyphen back."""
    from minivlm.data.synthetic_text import NOUNS, TEXTURE_ADJ

    tok = get_tokenizer()
    assert tok.tokens("five-sided") == ["five", "-", "sided"]
    phrases = [p for pairs in NOUNS.values() for pair in pairs for p in pair if "-" in p]
    phrases += [adj for adjs in TEXTURE_ADJ.values() for adj in adjs if "-" in adj]
    assert {"five-pointed star", "six-sided shapes", "five-sided shape", "polka-dot"} <= set(phrases)
    for phrase in phrases:
        assert tok.decode(tok.encode(phrase)) == phrase
    for text in ["a five-sided shape", "a five-pointed star", "a polka-dot red circle", "medium-sized",
                 "Two purple six-sided shapes above a large polka-dot heart.", "a state-of-the-art box"]:
        assert tok.decode(tok.encode(text)) == text.lower()


def test_decode_contractions_and_ordinary_punctuation():
    tok = get_tokenizer()
    for text in ["don't", "it can't be", "the dog's ball", "they're here", "a red star, a blue circle.",
                 "is there a green ring?", "a red star, a five-pointed star and a blue circle."]:
        assert tok.decode(tok.encode(text)) == text
    # special tokens are dropped, and the spaces between words and after commas are kept
    ids = [tok.cls_id] + tok.encode("a red star, a blue circle.") + [tok.sep_id, tok.pad_id]
    assert tok.decode(ids) == "a red star, a blue circle."
    # a hyphen with no word on one side stays as it is
    assert tok.decode(tok.encode("-")) == "-" and tok.decode(tok.encode("red -")) == "red -"
