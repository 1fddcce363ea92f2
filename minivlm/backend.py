"""Which runtime serves a model folder: ONNX Runtime when `minivlm export MODEL` wrote fresh graphs into
it, else PyTorch.

    MODEL/config.json model.safetensors vocab.txt answers.txt    the model (minivlm.checkpoint)
    MODEL/onnx/edge.json *.onnx ...                              its graphs (minivlm.export)

edge.json's "weights" holds the sha256 of each model file the graphs were exported from. When a file
differs now (the model was saved again after the export), the graphs are stale: backend="onnx" refuses
them, backend="auto" runs PyTorch and logs why. Nothing here imports torch unless PyTorch is picked, so the
default path of `minivlm caption` and the other inference commands runs without it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from minivlm.errors import MiniVLMError

BACKENDS = ("auto", "torch", "onnx")
ONNX_DIR = "onnx"
# The files a model folder's outputs depend on (minivlm.checkpoint's names; that module imports torch).
MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt", "answers.txt")

log = logging.getLogger(__name__)


def fingerprint(folder: str | Path) -> dict[str, str]:
    """sha256 of each model file present in the folder."""
    out = {}
    for name in MODEL_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[name] = digest.hexdigest()
    return out


def onnx_problem(folder: str | Path, device: str = "cpu") -> str | None:
    """Why MODEL/onnx cannot serve the model folder now, in one line; None if it can."""
    from minivlm.edge import read_manifest

    folder = Path(folder)
    onnx = folder / ONNX_DIR
    if not folder.is_dir():
        return f"{folder}: model folder not found"
    if str(device) != "cpu":
        return f"the ONNX backend runs on the CPU, not {device}; use the torch backend"
    if not (onnx / "edge.json").is_file():
        return f"{folder}: no ONNX graphs ({onnx}/edge.json not found); run `minivlm export {folder}`"
    try:
        exported = read_manifest(onnx).get("weights")
    except MiniVLMError as err:
        return str(err)
    now = fingerprint(folder)
    if not isinstance(exported, dict) or exported != now:
        changed = sorted(n for n in set(now) | set(exported or {}) if now.get(n) != (exported or {}).get(n))
        return (f"{onnx}: stale, exported from other weights ({', '.join(changed)} changed since); "
                f"run `minivlm export {folder}` again")
    return None


def choose(folder: str | Path, backend: str = "auto", device: str = "cpu") -> str:
    """"onnx" or "torch": "auto" takes the graphs when present and fresh (stale ones are logged, not
    used); "onnx" raises a MiniVLMError when they cannot serve."""
    if backend not in BACKENDS:
        raise MiniVLMError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    problem = onnx_problem(folder, device)
    if problem is None:
        return "onnx"
    if backend == "onnx":
        raise MiniVLMError(problem)
    if (Path(folder) / ONNX_DIR).exists() and str(device) == "cpu":  # graphs there, but not usable: say so
        log.warning("%s; running PyTorch instead", problem)
    return "torch"


def load(folder: str | Path, backend: str = "auto", device: str = "cpu", int8: bool = False,
         threads: int | None = None, bf16: bool = False, int4: bool = False):
    """The model folder on the chosen runtime: a `MiniVLM` (PyTorch) or an `EdgeMiniVLM` (ONNX Runtime;
    `int8` runs its int8 graphs, `int4` those and the 4-bit caption step, `bf16` its detector's backbone in
    bfloat16, `threads` sets its intra-op threads)."""
    exported = [name for name, on in (("int8", int8), ("int4", int4), ("bf16", bf16)) if on]
    if exported and backend == "torch":
        raise MiniVLMError(f"{exported[0]} runs exported graphs: use the onnx backend (or auto)")
    if choose(folder, "onnx" if exported else backend, device) == "onnx":
        from minivlm.edge import EdgeMiniVLM

        return EdgeMiniVLM(Path(folder) / ONNX_DIR, int8=int8, threads=threads, bf16=bf16, int4=int4)
    from minivlm.model import MiniVLM

    return MiniVLM.from_pretrained(folder, device, backend="torch")
