"""One copy of the weights for graphs that hold the same ones: the caption prefix and step graphs.

Both caption graphs are traces of the same transformer, so each file holds its own copy of the embeddings and
every layer (MiniLM: 127 MB of 181 MB fp32, 68 of 82 MB int8), with mostly different initialiser names (the
exporter names the transposed weights after the node that uses them). `share_weights` finds the
initialisers that are byte-for-byte the same (dtype, shape and data), gives them one name, and moves them
into one ONNX external-data file beside the graphs, each tensor at a 64 KiB-aligned offset.

This is standard ONNX (`TensorProto.external_data`): any ONNX tool opens the graphs from their folder.
ONNX Runtime memory-maps external data at aligned offsets instead of copying it, so the two sessions read
the same pages of one file: a process running both holds the weights once (peak RSS of a paper-shape
caption in the memory probe: fp32 660 -> 502 MB, int8 441 -> 334 MB; README, Speed), and the graph files
themselves load without a protobuf copy of the weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from minivlm.io import atomic_path

ALIGN = 65536  # Windows' mapping granularity (Linux needs 4096): mapped, not copied, on either
MIN_BYTES = 4096  # smaller tensors (biases, norms) stay inside their graph


def _external(tensor, location: str, offset: int, length: int) -> None:
    import onnx

    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _nodes(graph):
    """Every node, those of subgraphs (If / Loop bodies, which may read the outer initialisers) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _nodes(sub)


def share_weights(folder: str | Path, graphs: Sequence[str], weights: str) -> dict:
    """Rewrites `graphs` (self-contained .onnx files in `folder`) so that their large initialisers live once
    in `folder/weights`. Returns {"tensors": n, "bytes": size of the weights file, "saved": bytes no longer
    stored twice}."""
    import onnx
    from onnx import numpy_helper

    folder = Path(folder)
    models = [onnx.load(str(folder / g)) for g in graphs]
    first: dict[tuple, str] = {}  # (dtype, shape, sha256) -> the name every graph will use
    offsets: dict[str, tuple[int, int]] = {}
    chunks: list[bytes] = []
    size = total = 0
    for model in models:
        rename: dict[str, str] = {}
        kept = []
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            if array.nbytes < MIN_BYTES:
                kept.append(tensor)
                continue
            data = np.ascontiguousarray(array).tobytes()
            total += len(data)
            key = (array.dtype.str, array.shape, hashlib.sha256(data).hexdigest())
            name = first.setdefault(key, tensor.name)
            rename[tensor.name] = name
            if name not in offsets:  # its first appearance: append it to the weights file
                start = -(-size // ALIGN) * ALIGN
                chunks.append(b"\0" * (start - size))
                chunks.append(data)
                offsets[name] = (start, len(data))
                size = start + len(data)
            if name in {t.name for t in kept}:
                continue  # the same data twice in one graph: one initialiser serves both uses
            tensor.name = name
            _external(tensor, weights, *offsets[name])
            kept.append(tensor)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for node in _nodes(model.graph):
            node.input[:] = [rename.get(x, x) for x in node.input]
    with atomic_path(folder / weights) as tmp:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
    for graph, model in zip(graphs, models):
        with atomic_path(folder / graph) as tmp:
            onnx.save(model, str(tmp))
    stored = sum(length for _, length in offsets.values())
    return {"tensors": len(offsets), "bytes": size, "saved": total - stored}
