"""Checks of the text a user hands a trained model (questions, statements, retrieval queries), shared by
the PyTorch model and the ONNX runtime, so both refuse and cut the same way.

Empty or whitespace-only text is refused: the model would answer it anyway (from the image and the
question-type prior) and the answer would mean nothing. Text longer than the model reads is cut to
its budget (`layout.text_budget`), as training cut it, with a warning that says so.
"""

from __future__ import annotations

import logging
from typing import Sequence

from minivlm.errors import MiniVLMError
from minivlm.fusion.layout import text_budget
from minivlm.text.tokenizer import Tokenizer

log = logging.getLogger("minivlm")


def text_problem(text: object, allow_empty: bool = False) -> str | None:
    """Why `text` cannot be asked, in a few words; None if it can."""
    if not isinstance(text, str):
        return f"is a {type(text).__name__}, not text"
    if not text.strip() and not allow_empty:
        return "is empty" if not text else "is only whitespace"
    return None


def user_texts(texts: Sequence[str] | str, what: str, tokenizer: Tokenizer | None = None,
               max_text_len: int | None = None, allow_empty: bool = False) -> list[str]:
    """`texts` as a list, each checked: MiniVLMError on the first that cannot be asked ("question 2 is
    empty"); a logged warning for each longer than `max_text_len` allows (when a tokenizer is given).
    `allow_empty`: scoring many candidate texts (`rank`), where an empty one is just a poor match."""
    items = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(items):
        problem = text_problem(text, allow_empty)
        if problem:
            raise MiniVLMError(f"the {what} {problem}" if len(items) == 1 else f"{what} {i + 1} {problem}")
    if tokenizer is not None and max_text_len is not None:
        budget = text_budget(max_text_len)
        for i, n in enumerate(len(ids) for ids in tokenizer.encode_batch(items)):
            if n > budget:
                name = f"the {what}" if len(items) == 1 else f"{what} {i + 1}"
                log.warning(f"{name} is {n} word pieces long; the model reads the first {budget}, the rest is cut")
    return items
