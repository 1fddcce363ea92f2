"""NLVR2 accuracy and consistency, as the NLVR2 release's eval/metrics.py defines them.

Consistency: each sentence is written for several image pairs of one set; it counts as consistent when
every example with that sentence is predicted right. The sentence's key is its identifier
split-set-pair-sentence with the pair part blanked (as the official script does); identifiers that do
not have that shape fall back to the sentence text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from minivlm.errors import DataFormatError
from minivlm.io import read_json


def _field(ex: Any, name: str) -> Any:
    return ex.get(name) if isinstance(ex, Mapping) else getattr(ex, name, None)


def _label(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ValueError(f"label must be true/false or \"True\"/\"False\", got {v!r}")


def sentence_key(identifier: str, sentence: str | None = None) -> str:
    parts = identifier.split("-")
    if len(parts) == 4:
        parts[2] = ""
        return "-".join(parts)
    return sentence if sentence is not None else identifier


def nlvr2_accuracy(predictions: Mapping[str, bool], examples: Sequence[Any]) -> dict[str, Any]:
    """{"accuracy", "consistency" (percent), "n_examples", "n_sentences"} of {identifier: prediction}
    over `examples` (NLVR2Example objects or JSONL records: identifier, label, sentence). Every example
    needs a prediction."""
    if not examples:
        raise ValueError("no examples to score")
    correct = 0
    consistent: dict[str, bool] = {}
    missing = []
    for ex in examples:
        ident = _field(ex, "identifier")
        if ident not in predictions:
            missing.append(ident)
            continue
        right = bool(predictions[ident]) == _label(_field(ex, "label"))
        correct += right
        key = sentence_key(ident, _field(ex, "sentence"))
        consistent[key] = consistent.get(key, True) and right
    if missing:
        raise ValueError(f"{len(missing)} example(s) have no prediction, e.g. {missing[0]!r}")
    known = {_field(ex, "identifier") for ex in examples}
    extra = [i for i in predictions if i not in known]
    if extra:
        raise ValueError(f"{len(extra)} prediction(s) are for unknown identifiers, e.g. {extra[0]!r}")
    return {
        "accuracy": 100.0 * correct / len(examples),
        "consistency": 100.0 * sum(consistent.values()) / len(consistent),
        "n_examples": len(examples),
        "n_sentences": len(consistent),
    }


def read_nlvr2_results(path: str | Path) -> dict[str, bool]:
    """An NLVR2 results file: [{"identifier": "dev-850-0-0", "prediction": true}, ...]; "True"/"False"
    strings are accepted for the prediction too."""
    obj = read_json(path)
    if not isinstance(obj, list):
        raise DataFormatError(path, "expected a JSON list of {\"identifier\", \"prediction\"}, "
                                    f"got {type(obj).__name__}")
    out: dict[str, bool] = {}
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataFormatError(path, f"[{i}]: expected an object with \"identifier\" and \"prediction\"")
        for key in ("identifier", "prediction"):
            if key not in r:
                raise DataFormatError(path, f"[{i}].{key}: missing")
        if not isinstance(r["identifier"], str):
            raise DataFormatError(path, f"[{i}].identifier: expected a string")
        try:
            pred = _label(r["prediction"])
        except ValueError:
            raise DataFormatError(path, f"[{i}].prediction: expected true/false, got {r['prediction']!r}") from None
        if r["identifier"] in out:
            raise DataFormatError(path, f"[{i}].identifier: {r['identifier']!r} appears twice")
        out[r["identifier"]] = pred
    return out


def evaluate_nlvr2_file(results_json: str | Path, examples_jsonl: str | Path) -> dict[str, Any]:
    from minivlm.data.readers import read_nlvr2

    predictions = read_nlvr2_results(results_json)
    examples = read_nlvr2(examples_jsonl)
    try:
        return nlvr2_accuracy(predictions, examples)
    except ValueError as err:
        raise DataFormatError(results_json, str(err)) from None
