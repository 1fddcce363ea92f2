"""The HTTP server: `create_app(MODEL, ServeConfig(...))` is a FastAPI app; `minivlm serve` runs it on uvicorn.

    POST /v1/chat/completions   OpenAI-compatible: images as data URLs, the task read from the message
    GET  /v1/models
    POST /v1/caption | /v1/vqa | /v1/detect | /v1/nlvr2 | /v1/retrieve   native JSON
    GET  /health  /metrics  /docs  /  (the web page)

Each handler checks its input (a 4xx that says what was wrong), decodes the images in a worker thread,
and queues one `Job` for the batcher (`minivlm.serve.batcher`), which alone calls the model. The model
loads in a background thread, so /health can say "loading" until it is ready; the API answers 503 until
then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from minivlm.serve import schemas as S
from minivlm.serve.batcher import Batcher, Job
from minivlm.serve.config import ServeConfig
from minivlm.serve.decode import model_max_len
from minivlm.serve.errors import ApiError, bad_request, error_body
from minivlm.serve.inputs import decode_images
from minivlm.serve.limits import Guard
from minivlm.serve.metrics import Metrics, MetricsMiddleware

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "page"
DEFAULT_CAPTION_LEN = 20  # the paper's generation length, as `MiniVLM.caption`
ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/caption", "/v1/vqa",
             "/v1/detect", "/v1/nlvr2", "/v1/retrieve", "/docs", "/openapi.json"}

# An instruction to describe the image (rather than a question about it) asks for the caption.
_DESCRIBE = re.compile(r"\b(describe|description|caption|summari[sz]e)\b"
                       r"|^\s*what(?:'s| is)? (?:in|shown in|happening in|going on in) (?:this|the) "
                       r"(?:image|picture|photo)\W*$|^\s*what do you see\W*$", re.I)


def chat_task(n_images: int, text: str) -> str:
    """caption, vqa or nlvr2, from the user message: no text or "describe ..." -> caption, other text
    -> a question (VQA); two images -> a statement about the pair (NLVR2)."""
    if n_images == 0:
        raise bad_request("no image in the user message: add an image_url part with a data URL", "no_image",
                          "messages")
    if n_images == 2:
        if not text:
            raise bad_request("two images need a statement about them to verify (NLVR2), as a text part",
                              "empty_statement", "messages")
        return "nlvr2"
    if n_images > 2:
        raise bad_request(f"{n_images} images: send one (caption, question) or two (a statement about the "
                          "pair)", "too_many_images", "messages")
    return "caption" if not text or _DESCRIBE.search(text) else "vqa"


@dataclass
class Server:
    """What the handlers share: settings, the batcher (which owns the model) and the load state."""

    config: ServeConfig
    batcher: Batcher
    metrics: Metrics
    name: str
    started: int = field(default_factory=lambda: int(time.time()))
    model: Any = None
    ready: bool = False
    load_error: str | None = None
    index_paths: list[Path] = field(default_factory=list)
    # Images are decoded off the event loop in a few threads of our own rather than in the ASGI pool's
    # dozens: every thread that allocates gets its own malloc arena, and forty arenas of freed pixel
    # buffers made the resident memory climb for the whole of a load test (with two, it levels off).
    decoders: concurrent.futures.ThreadPoolExecutor | None = None

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", "model_unavailable")
        if not self.ready:
            raise ApiError(503, "the model is still loading; retry shortly (GET /health says when it is ready)",
                           "model_loading", headers={"Retry-After": "2"})

    # -- checks shared by the endpoints ----------------------------------------------------------------

    def text(self, value: str | None, what: str, param: str) -> str:
        text = (value or "").strip()
        if not text:
            raise bad_request(f"empty {what}", f"empty_{what}", param)
        if len(text) > self.config.max_question_chars:
            raise bad_request(f"{what} too long: {len(text)} characters, the limit is "
                              f"{self.config.max_question_chars} (max_question_chars)", f"{what}_too_long", param)
        return text

    def check_max_tokens(self, requested: int | None, param: str = "max_tokens") -> None:
        if requested is not None and requested > self.config.max_tokens:
            raise bad_request(f"max_tokens {requested} is above this server's limit of {self.config.max_tokens}",
                              "max_tokens_too_large", param)

    def caption_len(self, requested: int | None) -> int:
        self.check_max_tokens(requested)
        cap = model_max_len(self.model)  # the model's caption segment: asking for more cannot give more
        return min(requested if requested is not None else DEFAULT_CAPTION_LEN, cap)

    def top_k(self, k: int, param: str = "top_k") -> int:
        if k > self.config.max_top_k:
            raise bad_request(f"{param} {k} is above this server's limit of {self.config.max_top_k}",
                              f"{param}_too_large", param)
        return k

    def has_task(self, task: str) -> None:
        if task not in self.model.tasks:
            raise bad_request(f"this model has no {task} transformer (it has: {', '.join(self.model.tasks)})",
                              "task_unavailable")

    async def images(self, sources: list[tuple[str, str]]) -> list:
        if len(sources) > self.config.max_images:
            raise bad_request(f"too many images: {len(sources)}, the limit is {self.config.max_images} per request",
                              "too_many_images")
        return await asyncio.get_running_loop().run_in_executor(self.decoders, decode_images, sources,
                                                                 self.config.max_pixels)

    async def run(self, job: Job) -> Any:
        """The job's result, or a 504 after the request timeout (the job is dropped if not yet started)."""
        future = self.batcher.submit(job)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise ApiError(504, f"the request timed out after {self.config.request_timeout_s:g} s "
                                "(request_timeout_s)", "timeout") from None

    def prompt_tokens(self, task: str, text: str, regions: list) -> int:
        """Word pieces of the text plus the region tokens the task's transformer reads."""
        spec = self.model.task(task)
        if isinstance(spec, dict):  # the ONNX runtime's edge.json entry and its numpy regions
            from minivlm.edge import task_region_limits

            k, floor = task_region_limits(spec)
            entering = sum(len(r.order(k, floor)) for r in regions)
        else:
            entering = sum(len(r.confident(spec.cfg.max_regions, spec.cfg.region_min_score)) for r in regions)
        return len(self.model.tokenizer.encode(text)) + entering


# ---------------------------------------------------------------------------------------------- the app


def create_app(model: str | Path | Any, config: ServeConfig | None = None, *, backend: str = "auto",
               device: str = "cpu", int8: bool = False, bf16: bool = False, int4: bool = False,
               index: str | Path | None = None, on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The server for a model folder (loaded with `minivlm.backend.load` in a background thread), or for a
    model object with `MiniVLM`'s methods. `index`: a folder of images whose regions are computed at
    start, for /v1/retrieve. `on_load_failure(message)` is called if loading fails (the CLI then exits)."""
    config = config or ServeConfig()
    batcher = Batcher(config.max_batch, config.max_wait_ms, config.max_queue)
    metrics = Metrics(ENDPOINTS, batcher.depth)
    batcher.on_batch = metrics.batch_size.observe
    batcher.on_error = metrics.model_errors.inc
    name = model.name if isinstance(model, Path) else Path(model).name if isinstance(model, str) else "model"
    server = Server(config, batcher, metrics, name)
    server.decoders = concurrent.futures.ThreadPoolExecutor(config.decode_threads, thread_name_prefix="minivlm-decode")

    def load() -> None:
        try:
            if isinstance(model, (str, Path)):
                from minivlm.backend import load as load_model

                m = load_model(model, backend, device, int8=int8, bf16=bf16, int4=int4)
            else:
                m = model
            # one model call per batch: its own chunking must not split what the batcher gathered
            m.batch_size = max(getattr(m, "batch_size", 16), config.max_batch * config.max_images)
            if index is not None:
                from minivlm.inference import list_images

                if "retrieval" not in m.tasks:
                    raise ApiError(500, f"--index needs a retrieval transformer; the model has {', '.join(m.tasks)}")
                server.index_paths = list_images(index)
                batcher.index = m.regions([str(p) for p in server.index_paths])
                log.info("indexed %d images of %s", len(server.index_paths), index)
            server.model = m
            batcher.start(m)
            server.ready = True
            log.info("model ready: %s (%s)", name, backend_name(m))
        except Exception as err:  # noqa: BLE001 - reported by /health and to the caller
            server.load_error = str(err) or type(err).__name__
            log.exception("the model failed to load")
            if on_load_failure is not None:
                on_load_failure(server.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="minivlm-load", daemon=True).start()
        yield
        await run_in_threadpool(batcher.stop)
        server.decoders.shutdown(wait=False)

    app = FastAPI(title="MiniVLM", version="0.1.0", lifespan=lifespan,
                  description="Captions, VQA, NLVR2, detection and retrieval from one MiniVLM model folder; "
                              "`/v1/chat/completions` speaks OpenAI's chat format.")
    app.state.server = server
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, so it sees every refusal
    _errors(app)
    _routes(app, server)
    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    return app


def backend_name(model: Any) -> str:
    from minivlm.edge import EdgeMiniVLM

    return "onnx" if isinstance(model, EdgeMiniVLM) else "torch"


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "")
            message, code = f"bad JSON (at character {loc[0] if loc else '?'}): {reason}".rstrip(": "), "bad_json"
        elif first.get("type") == "missing" and not loc:
            message, code = "empty request body: expected a JSON object", "empty_body"
        else:
            where = ".".join(loc)
            message, code = (f"{where}: {first.get('msg')}" if where else str(first.get("msg"))), "invalid_field"
        return JSONResponse(error_body(400, message, code, ".".join(loc) or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = (f"no such endpoint: {request.method} {request.url.path}" if err.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}" if err.status_code == 405
                   else str(err.detail))
        return JSONResponse(error_body(err.status_code, message), err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error (the error is in the server log)"), 500)


def _routes(app: FastAPI, server: Server) -> None:
    cfg = server.config
    errors = {s: {"description": d, "content": {"application/json": {"example": error_body(s, d)}}}
              for s, d in [(400, "bad input: the message says what"), (401, "missing or wrong API key"),
                           (413, "body or image too large"), (415, "not JSON"), (503, "busy or loading"),
                           (504, "timed out")]}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE / "index.html")

    @app.get("/health")
    async def health():
        status = "failed" if server.load_error else "ok" if server.ready else "loading"
        doc = {"status": status, "model": cfg.model_name}
        if server.ready:
            doc.update(backend=backend_name(server.model), tasks=list(server.model.tasks),
                       index=len(server.index_paths))
        if server.load_error:
            doc["error"] = server.load_error
        return JSONResponse(doc, 200 if status == "ok" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=S.ModelList)
    async def models():
        return S.ModelList(data=[S.ModelCard(id=cfg.model_name, created=server.started)])

    # -- native ------------------------------------------------------------------------------------------

    @app.post("/v1/caption", response_model=S.CaptionResponse, responses=errors)
    async def caption(req: S.CaptionRequest):
        server.require_ready()
        server.has_task("caption")
        max_len = server.caption_len(req.max_tokens)
        images = await server.images([(req.image, "image")])
        ids, reason, _ = await server.run(Job("caption", images, max_len=max_len, beam_size=req.beam_size))
        return S.CaptionResponse(caption=server.model.tokenizer.decode(ids), tokens=len(ids), finish_reason=reason)

    @app.post("/v1/vqa", response_model=S.VQAResponse, responses=errors)
    async def vqa(req: S.VQARequest):
        server.require_ready()
        server.has_task("vqa")
        question, k = server.text(req.question, "question", "question"), server.top_k(req.top_k)
        images = await server.images([(req.image, "image")])
        scores, _ = await server.run(Job("vqa", images, question, top_k=k))
        return S.VQAResponse(question=question, answers=[S.Answer(answer=a, score=s) for a, s in scores])

    @app.post("/v1/detect", response_model=S.DetectResponse, responses=errors)
    async def detect(req: S.DetectRequest):
        server.require_ready()
        k = server.top_k(req.max_regions, "max_regions") if req.max_regions is not None else None
        images = await server.images([(req.image, "image")])
        regions = await server.run(Job("detect", images))
        return detections(regions, req.min_score, k)

    @app.post("/v1/nlvr2", response_model=S.NLVR2Response, responses=errors)
    async def nlvr2(req: S.NLVR2Request):
        server.require_ready()
        server.has_task("nlvr2")
        statement = server.text(req.statement, "statement", "statement")
        images = await server.images([(req.left, "left"), (req.right, "right")])
        p, _ = await server.run(Job("nlvr2", images, statement))
        return S.NLVR2Response(statement=statement, prediction=p > 0.5, probability=p)

    @app.post("/v1/retrieve", response_model=S.RetrieveResponse, responses=errors)
    async def retrieve(req: S.RetrieveRequest):
        server.require_ready()
        if not server.index_paths:
            raise bad_request("this server has no image index: start it with `minivlm serve MODEL --index DIR`",
                              "no_index")
        query, k = server.text(req.query, "query", "query"), server.top_k(req.top_k)
        ranked = await server.run(Job("retrieve", [], query, top_k=k))
        return S.RetrieveResponse(query=query, n_images=len(server.index_paths),
                                  results=[S.Match(rank=r + 1, image=server.index_paths[i].name, score=s)
                                           for r, (i, s) in enumerate(ranked)])

    # -- OpenAI ------------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, responses=errors)
    async def chat(req: S.ChatRequest):
        server.require_ready()
        if req.model != cfg.model_name:
            raise ApiError(404, f"model {req.model!r} not found; this server serves {cfg.model_name!r}",
                           "model_not_found", "model")
        sources, text = user_content(req.messages)
        if len(sources) > cfg.max_images:
            raise bad_request(f"too many images: {len(sources)}, the limit is {cfg.max_images} per request",
                              "too_many_images", "messages")
        task = req.task or chat_task(len(sources), text)
        expected = 2 if task == "nlvr2" else 1
        if len(sources) != expected:
            raise bad_request(f"{task} takes {expected} image(s), the message has {len(sources)}", "image_count",
                              "messages")
        server.has_task(task)
        if req.n > 1 and task != "vqa":
            raise bad_request(f"n={req.n}: {task} gives one answer per request (decoding is deterministic); "
                              "n > 1 lists the top VQA answers", "n_unsupported", "n")
        requested = req.max_completion_tokens or req.max_tokens
        if task == "caption":
            job = Job("caption", max_len=server.caption_len(requested), beam_size=req.beam_size)
        else:
            server.check_max_tokens(requested)  # the same limit on max_tokens for every task
            what = "question" if task == "vqa" else "statement"
            job = Job(task, text=server.text(text, what, "messages"), top_k=server.top_k(req.n, "n"))
        job.images = await server.images(sources)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = await stream(server, job, task, text, requested, cid, created, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await server.run(job)
        choices, completion, regions = answers(server, task, result, requested)
        prompt = server.prompt_tokens(task, text, regions)
        return S.ChatCompletion(id=cid, created=created, model=cfg.model_name, choices=[
            S.Choice(index=i, message=S.ChatMessage(content=c), finish_reason=f) for i, (c, f) in enumerate(choices)],
            usage=S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion))


def user_content(messages: list[S.Message]) -> tuple[list[tuple[str, str]], str]:
    """The images ([(url, param)]) and the text of the last user message (earlier turns and system prompts
    carry nothing this model reads)."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise bad_request("no user message: the last user message must hold the image(s)", "no_user_message",
                          "messages")
    i = users[-1]
    content = messages[i].content
    if content is None or isinstance(content, str):
        return [], (content or "").strip()
    sources, texts = [], []
    for j, part in enumerate(content):
        param = f"messages.{i}.content.{j}"
        if part.type == "text":
            texts.append(part.text or "")
        else:
            url = part.image_url.url if isinstance(part.image_url, S.ImageURL) else part.image_url
            if not url:
                raise bad_request("image_url part without a url", "empty_image", param)
            sources.append((url, param))
    return sources, " ".join(t.strip() for t in texts if t.strip())


def answers(server: Server, task: str, result: Any, max_tokens: int | None) -> tuple[list[tuple[str, str]], int, list]:
    """([(content, finish_reason)] per choice, completion tokens, the regions the task read)."""
    tok = server.model.tokenizer
    if task == "caption":
        ids, reason, regions = result
        return [(tok.decode(ids), reason)], len(ids), regions
    if task == "vqa":
        scores, regions = result
        texts = [a for a, _ in scores]
    else:
        p, regions = result
        texts = ["true" if p > 0.5 else "false"]
    out, count = [], 0
    for text in texts:  # max_tokens cuts an answer, as it would cut any completion
        ids = tok.encode(text)
        if max_tokens is not None and len(ids) > max_tokens:
            out.append((tok.decode(ids[:max_tokens]), "length"))
            count += max_tokens
        else:
            out.append((text, "stop"))
            count += len(ids)
    return out, count, regions


def detections(r: Any, min_score: float, k: int | None) -> S.DetectResponse:
    boxes, scores, labels = r.boxes.tolist(), r.scores.tolist(), r.labels.tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    order = [i for i in order if scores[i] >= min_score][:k]
    out = []
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        out.append(S.Detection(bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), category_id=int(labels[i]),
                               category=r.tags[i] if r.tags else str(labels[i]),
                               attribute=r.attribute_names[i] if r.attribute_names else None, score=scores[i]))
    w, h = r.image_size
    return S.DetectResponse(width=int(w), height=int(h), detections=out)


def stable_text(text: str) -> str:
    """The part of a partial caption that later tokens cannot change: all but its last word (the
    detokenizer joins "five - sided" into "five-sided" only once "sided" has come)."""
    cut = text.rfind(" ")
    return text[:cut] if cut > 0 else ""


async def stream(server: Server, job: Job, task: str, text: str, max_tokens: int | None, cid: str,
                 created: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of chat.completion.chunk objects: the caption word by word as it decodes
    (other tasks: the answer at once), then the finish reason, optionally the usage, then [DONE]."""
    import json

    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    end = object()
    if task == "caption":
        job.on_token = lambda tid: loop.call_soon_threadsafe(tokens.put_nowait, tid)
    future = server.batcher.submit(job)  # before the first byte: a full queue is still a plain 503
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, end))

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.config.model_name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:  # OpenAI's closing usage chunk has no choices
            doc.update(choices=[], usage=usage)
        return f"data: {json.dumps(doc)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        tok, ids, sent = server.model.tokenizer, [], ""
        deadline = loop.time() + server.config.request_timeout_s
        while True:
            try:
                item = await asyncio.wait_for(tokens.get(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                future.cancel()
                err = ApiError(504, f"the request timed out after {server.config.request_timeout_s:g} s", "timeout")
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            if item is end:
                break
            ids.append(item)
            stable = stable_text(tok.decode(ids))
            if len(stable) > len(sent) and stable.startswith(sent):
                yield chunk({"content": stable[len(sent):]})
                sent = stable
        try:
            result = future.result()
        except ApiError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        choices, completion, regions = answers(server, task, result, max_tokens)
        content, finish = choices[0]
        if content.startswith(sent) and len(content) > len(sent):
            yield chunk({"content": content[len(sent):]})
        yield chunk({}, finish)
        if include_usage:
            prompt = server.prompt_tokens(task, text, regions)
            yield chunk({}, usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                   "total_tokens": prompt + completion})
        yield "data: [DONE]\n\n"

    return events()
