"""Splitting and pairing the items of a batched call; torch-free, so the ONNX Runtime path shares it."""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

from minivlm.errors import MiniVLMError

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def broadcast(items: list, n: int, what: str, per: str) -> list:
    """`items` paired one-to-one with n others: one item serves all of them; any other count is an error."""
    if len(items) == n:
        return items
    if len(items) == 1:
        return items * n
    raise MiniVLMError(f"{len(items)} {what} for {n} {per}: give one, or one per {per[:-1]}")
