"""Files: atomic writes, JSON with clear errors, safetensors checkpoints.

Nothing here unpickles arbitrary code: weights are safetensors, and the few training-state files go
through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minivlm.errors import DataFormatError, MiniVLMError


_UMASK = os.umask(0o022)  # read once, at import (os.umask only reads by setting)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` only if the block succeeds, so a
    crash or kill never leaves a half-written file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # a read-only folder: name the file that could not be written, not a temp name
        raise OSError(err.errno, err.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file 0600; the finished file gets what open() would give it (umask), so a model
        # folder written by one user can be served by another.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise DataFormatError(path, "not a UTF-8 text file") from None


def write_lines(path: Path, lines: Sequence[str]) -> None:
    bad = [s for s in lines if "\n" in s or "\r" in s]
    if bad:
        raise MiniVLMError(f"{path.name}: names cannot contain line breaks ({bad[0]!r})")
    write_text(path, "".join(f"{s}\n" for s in lines))


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataFormatError(path, "not a UTF-8 text file") from None
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared storage; contiguous clones keep tied weights loadable.
    tensors = {k: v.detach().contiguous().clone() if _shares(v, state) else v.detach().contiguous()
               for k, v in state.items()}
    write_safetensors(tensors, path, metadata)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                      ) -> None:
    """`save_file` through a temporary name, renamed into place. safetensors reports a failed write (disk
    full, file too large) as its own SafetensorError; it is raised as the OSError it is, so the command line
    reports it in one line as the environment's problem, and the temporary file is removed."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _shares(v: torch.Tensor, state: dict[str, torch.Tensor]) -> bool:
    ptr = v.untyped_storage().data_ptr()
    return sum(1 for t in state.values() if t.untyped_storage().data_ptr() == ptr) > 1


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "weights file not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataFormatError(path, f"not a readable safetensors file ({err})") from None


def save_state(obj: Any, path: str | Path) -> None:
    """Training state (optimizer, scheduler, RNG): tensors and plain Python only."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_state(path: str | Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
