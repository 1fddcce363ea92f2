"""Results files as the official evaluators read them: a JSON list of rows, one per item."""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence


def rows_to_dict(rows: Sequence[Mapping[str, Any]] | Mapping[Hashable, Any], key: str, value: str,
                 where: str = "result") -> dict[Hashable, Any]:
    """`[{key: k, value: v}, ...]` (or an already-built `{k: v}`) -> `{k: v}`. A row without both fields
    or a key given twice is an error, as in the official `loadRes`: silently keeping one of two answers
    would score a results file that is not what its author meant."""
    if isinstance(rows, Mapping):
        return dict(rows)
    out: dict[Hashable, Any] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping) or key not in r or value not in r:
            raise ValueError(f"{where} {i}: expected an object with \"{key}\" and \"{value}\"")
        if r[key] in out:
            raise ValueError(f"{where} {i}: {key} {r[key]!r} appears twice")
        out[r[key]] = r[value]
    return out
