"""`ServeConfig`: the server's batching, limits and access settings, one typed place.

`minivlm serve` turns every field into a flag (`max_batch` -> `--max-batch`); Python callers pass one to
`minivlm.serve.app.create_app`. The defaults suit a CPU box serving a handful of users: small batches
gathered for a few milliseconds, limits far above any photo but far below what would exhaust memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeConfig:
    # -- batching
    max_batch: int = _opt(8, "requests gathered into one model batch")
    max_wait_ms: float = _opt(10.0, "how long the first request of a batch waits for others to join it")
    max_queue: int = _opt(64, "requests waiting for the model; beyond this the server answers 503")
    request_timeout_s: float = _opt(60.0, "a request still unanswered after this long gets 504")
    decode_threads: int = _opt(2, "threads decoding request images (a few suffice: each image is decoded once)")
    # -- limits on input (each violation is a 4xx naming the limit)
    max_body_bytes: int = _opt(16 * 1024 * 1024, "largest request body (base64 images included)")
    max_pixels: int = _opt(40_000_000, "largest decoded image (width x height): decompression bombs stop here")
    max_images: int = _opt(4, "images per request")
    max_question_chars: int = _opt(500, "longest question, statement or query")
    max_tokens: int = _opt(64, "largest max_tokens a request may ask for")
    max_top_k: int = _opt(50, "most answers, regions or images a request may ask for")
    # -- identity and access
    model_name: str = _opt("minivlm", "the model id of /v1/models and of chat completions")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on the API (default: "
                                     "$MINIVLM_API_KEY if set)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"ServeConfig.{f.name} must not be negative, got {value}")
        for name in ("max_batch", "max_queue", "decode_threads", "max_images", "max_tokens", "max_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be at least 1, got {getattr(self, name)}")
