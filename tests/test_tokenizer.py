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
