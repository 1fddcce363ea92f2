"""`minivlm serve`: the real server (uvicorn on a free loopback port) with a tiny random-weights model,
called with the official `openai` client and with plain HTTP.

Every answer is compared with the library's own call on the same image (`MiniVLM.caption`, ...), every
bad input with the status and message it must get, and the batching with the same requests run alone.
Nothing depends on timing: requests that must meet in one batch are queued while the worker is held
(`Gate`), and waits poll a condition under a generous deadline.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import http.client
import io
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.config import BertConfig, get_tee
from minivlm.model import MiniVLM, build_task_model
from minivlm.serve import ServeConfig
from minivlm.serve.app import create_app
from minivlm.text.tokenizer import get_tokenizer

BERT = BertConfig("tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, vocab_size=30522,
                  dropout=0.0, region_dim=16, max_regions=4, max_text_len=10, max_tag_len=6)
TEE_CFG = dataclasses.replace(get_tee("tee-demo"), image_size=128, fpn_channels=16, fpn_layers=1, rpn_pre_nms_topk=100,
                              rpn_post_nms_topk=20, max_regions=6, region_dim=16, num_classes=3, num_attributes=2)
ANSWERS = ["yes", "no", "red", "two", "blue", "star"]
TASKS = ("caption", "vqa", "nlvr2", "retrieval")
SIZES = [(120, 90), (64, 100), (100, 100), (90, 60)]
LIMITS = ServeConfig(max_body_bytes=1_000_000, max_pixels=200_000, max_images=4, max_question_chars=100,
                     max_tokens=32, max_top_k=10)
DEADLINE = 120.0  # seconds any wait may take on a loaded machine; the waits end as soon as their condition holds


# ---------------------------------------------------------------------------------------------- the model


def build_model() -> MiniVLM:
    from minivlm.vision.tee import TEE

    torch.manual_seed(0)
    detector = TEE(TEE_CFG, ["circle", "square", "star"], ["red", "blue"])
    tasks = {t: build_task_model(t, BERT, len(ANSWERS) if t == "vqa" else None) for t in TASKS}
    for m in tasks.values():  # larger than BERT's init: different images give different captions
        for p in m.parameters():
            p.data.normal_(0, 0.3) if p.dim() > 1 else None
    return MiniVLM(detector, tasks, get_tokenizer(), ANSWERS).eval()


def caption_ids(model: MiniVLM, image, **kw) -> list[int]:
    """The library's own caption token ids (`MiniVLM.caption` decodes these)."""
    from minivlm.tasks.caption_model import build_prefix

    task = model.task("caption")
    return task.generate(build_prefix(model.tokenizer, model.regions([image]), task.cfg), **kw)[0]


def data_url(path: Path | bytes, mime: str = "image/png") -> str:
    raw = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def png_bytes(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_env(root: Path) -> SimpleNamespace:
    """A tiny model folder, four images (also the retrieval index) and the reference model loaded from the
    folder as the server loads it."""
    build_model().save_pretrained(root / "model")
    (root / "index").mkdir()
    paths = []
    for i, size in enumerate(SIZES):
        paths.append(root / "index" / f"img{i}.png")
        paths[-1].write_bytes(png_bytes(size, i))
    model = MiniVLM.from_pretrained(root / "model", backend="torch")
    return SimpleNamespace(root=root, folder=root / "model", paths=paths, model=model,
                           urls=[data_url(p) for p in paths], pil=[Image.open(p).convert("RGB") for p in paths])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("serve"))


# ---------------------------------------------------------------------------------------------- the server


@contextlib.contextmanager
def running(app):
    """The app on uvicorn in a thread, on a free loopback port; yields the port once /health says ok
    (or, for a model that never loads, once the port answers)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_for(condition, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def ready(port: int) -> None:
    wait_for(lambda: call(port, "GET", "/health")[0] == 200, "the model to load")


def call(port: int, method: str, path: str, body=None, headers: dict | None = None, raw=None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    hdrs = dict(headers or {})
    if raw is None and body is not None:
        raw = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=raw, headers=hdrs, encode_chunked=raw is not None and not isinstance(raw, bytes))
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    ctype = r.getheader("content-type") or ""
    return r.status, dict(r.getheaders()), json.loads(data) if "json" in ctype else data.decode()


def chat_body(*urls: str, text: str | None = None, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"model": "minivlm", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture(scope="module")
def server(env):
    """One server for the read-only tests: the model folder, an API key and the retrieval index."""
    app = create_app(env.folder, dataclasses.replace(LIMITS, api_key="sekret"), index=env.root / "index")
    with running(app) as port:
        ready(port)
        yield SimpleNamespace(port=port, app=app, auth={"Authorization": "Bearer sekret"})


def post(srv, path: str, body=None, **kw):
    return call(srv.port, "POST", path, body, headers={**srv.auth, **kw.pop("headers", {})}, **kw)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sekret", max_retries=0)


class Gate:
    """The model, with a hold on its detector: `hold()` makes the next batch wait in `regions` until
    `release()`, so that requests can be queued behind it; images `poison` pixels wide raise there."""

    def __init__(self, model, poison: int = -1):
        self._model, self.poison = model, poison
        self.entered, self.go = threading.Event(), threading.Event()
        self.go.set()
        self.calls: list[int] = []  # images per detector call: the batches

    def __getattr__(self, name):
        return getattr(self._model, name)

    def hold(self):
        self.entered.clear()
        self.go.clear()

    def release(self):
        self.go.set()

    def regions(self, images):
        self.calls.append(len(images))
        self.entered.set()
        assert self.go.wait(DEADLINE)
        if any(im.size[0] == self.poison for im in images):
            raise RuntimeError("poisoned image")
        return self._model.regions(images)


def in_thread(pool, fn, *args):
    return pool.submit(fn, *args)


# ---------------------------------------------------------------------------------------------- OpenAI client


def test_openai_client_caption_question_and_statement(env, server, client):
    m, tok = env.model, env.model.tokenizer
    img = env.pil[0]
    regions = m.regions([img])[0]

    r = client.chat.completions.create(model="minivlm", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": env.urls[0]}}]}])
    caption = m.caption([img])[0]
    assert r.choices[0].message.content == caption and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == "minivlm" and len(r.choices) == 1
    # usage: the caption's word pieces; the prompt is the region tokens the caption transformer reads
    assert r.usage.prompt_tokens == min(len(regions), BERT.max_regions)
    assert r.usage.completion_tokens == len(caption_ids(m, img)) and r.usage.total_tokens == (
        r.usage.prompt_tokens + r.usage.completion_tokens)

    # an instruction to describe is a caption too; a question is VQA
    r = client.chat.completions.create(model="minivlm", messages=[{"role": "system", "content": "be brief"}, {
        "role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                    {"type": "image_url", "image_url": {"url": env.urls[0]}}]}])
    assert r.choices[0].message.content == caption
    question = "what color is the star?"
    r = client.chat.completions.create(model="minivlm", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": env.urls[0]}}, {"type": "text", "text": question}]}])
    assert r.choices[0].message.content == m.answer([img], [question])[0]
    assert r.usage.prompt_tokens == len(tok.encode(question)) + min(len(regions), BERT.max_regions)

    # n: the top n VQA answers, best first
    r = client.chat.completions.create(model="minivlm", n=3, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": env.urls[0]}}, {"type": "text", "text": question}]}])
    assert [c.message.content for c in r.choices] == [a for a, _ in m.answer_scores([img], [question], top_k=3)[0]]

    # two images and a statement: NLVR2's verdict
    statement = "both images have a red star"
    r = client.chat.completions.create(model="minivlm", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": env.urls[1]}}, {"type": "image_url", "image_url": {"url": env.urls[2]}},
        {"type": "text", "text": statement}]}])
    p = m.verify_proba([env.pil[1]], [env.pil[2]], [statement])[0]
    assert r.choices[0].message.content == ("true" if p > 0.5 else "false")


def test_openai_client_max_tokens_beam_and_n(env, client):
    import openai

    m, img = env.model, env.pil[1]
    assert len(caption_ids(m, img)) > 3, "the test needs a caption longer than max_tokens"
    r = client.chat.completions.create(model="minivlm", max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": env.urls[1]}}]}])
    assert r.choices[0].message.content == m.caption([img], max_len=3)[0]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3

    r = client.chat.completions.create(model="minivlm", extra_body={"beam_size": 3}, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": env.urls[1]}}]}])
    assert r.choices[0].message.content == m.caption([img], beam_size=3)[0]

    with pytest.raises(openai.BadRequestError, match="n > 1 lists the top VQA answers"):
        client.chat.completions.create(model="minivlm", n=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": env.urls[1]}}]}])
    with pytest.raises(openai.BadRequestError, match="above this server's limit of 32"):
        client.chat.completions.create(model="minivlm", max_tokens=33, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": env.urls[1]}}]}])


def test_openai_client_streams_the_caption(env, server, client):
    m = env.model
    caption = m.caption([env.pil[2]])[0]
    stream = client.chat.completions.create(model="minivlm", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": [
                                                {"type": "image_url", "image_url": {"url": env.urls[2]}}]}])
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == caption
    assert len(deltas) >= min(2, len(caption.split()) - 1), "the caption arrives in pieces, not at once"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(caption_ids(m, env.pil[2]))

    # on the wire: server-sent events ending with [DONE]
    status, headers, text = post(server, "/v1/chat/completions", chat_body(env.urls[2], stream=True))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]) == caption


def test_models_auth_and_unknown_model(env, server, client):
    import openai

    assert [mod.id for mod in client.models.list()] == ["minivlm"]
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": env.urls[0]}}]}])
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path, body in [("/v1/caption", {"image": env.urls[0]}), ("/metrics", None), ("/v1/models", None)]:
        status, _, doc = call(server.port, "POST" if body else "GET", path, body)
        assert status == 401 and doc["error"]["type"] == "authentication_error", path
    # the page, its files, /docs and /health carry no data and stay open
    for path in ("/", "/static/app.js", "/health", "/docs", "/openapi.json"):
        assert call(server.port, "GET", path)[0] == 200, path


# ---------------------------------------------------------------------------------------------- native


def test_native_endpoints_match_the_library(env, server):
    m = env.model
    img = env.pil[3]
    status, _, doc = post(server, "/v1/caption", {"image": env.urls[3]})
    assert status == 200 and doc["caption"] == m.caption([img])[0]
    ids = caption_ids(m, img)
    assert doc["tokens"] == len(ids) and doc["finish_reason"] == ("length" if len(ids) == BERT.max_text_len - 1 else "stop")

    status, _, doc = post(server, "/v1/vqa", {"image": env.urls[3], "question": "how many?", "top_k": 3})
    want = m.answer_scores([img], ["how many?"], top_k=3)[0]
    assert status == 200 and [a["answer"] for a in doc["answers"]] == [a for a, _ in want]
    assert [a["score"] for a in doc["answers"]] == pytest.approx([s for _, s in want], abs=1e-5)

    regions = m.regions([img])[0]
    status, _, doc = post(server, "/v1/detect", {"image": env.urls[3]})
    assert status == 200 and (doc["width"], doc["height"]) == SIZES[3]
    order = torch.argsort(regions.scores, descending=True).tolist()
    assert len(doc["detections"]) == len(regions) > 0
    for d, i in zip(doc["detections"], order):
        x1, y1, x2, y2 = regions.boxes[i].tolist()
        assert d["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)  # COCO xywh, image pixels
        assert d["category"] == regions.tags[i] and d["attribute"] == regions.attribute_names[i]
        assert d["score"] == pytest.approx(float(regions.scores[i]), abs=1e-6)
        assert 0 <= d["bbox"][0] <= d["bbox"][0] + d["bbox"][2] <= SIZES[3][0]
    status, _, top = post(server, "/v1/detect", {"image": env.urls[3], "max_regions": 2})
    assert top["detections"] == doc["detections"][:2]
    cut = doc["detections"][1]["score"]
    status, _, above = post(server, "/v1/detect", {"image": env.urls[3], "min_score": cut})
    assert [d["score"] for d in above["detections"]] == [d["score"] for d in doc["detections"] if d["score"] >= cut]

    statement = "the left image has two circles"
    status, _, doc = post(server, "/v1/nlvr2", {"left": env.urls[0], "right": env.urls[1], "statement": statement})
    p = m.verify_proba([env.pil[0]], [env.pil[1]], [statement])[0]
    assert status == 200 and doc["probability"] == pytest.approx(p, abs=1e-5) and doc["prediction"] == (p > 0.5)

    status, _, doc = post(server, "/v1/retrieve", {"query": "a red circle", "top_k": 3})
    want = m.retrieve([str(p) for p in env.paths], "a red circle", top_k=3)
    assert status == 200 and doc["n_images"] == len(env.paths)
    assert [r["image"] for r in doc["results"]] == [env.paths[i].name for i, _ in want]
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- bad input


def _bad_cases(urls: list[str]) -> list[tuple[str, str, dict | bytes, dict, int, str]]:
    """(name, path, body (JSON, or raw bytes), extra headers, status, message pattern)."""
    png = png_bytes((40, 30))
    buf = io.BytesIO()
    Image.new("RGB", (500, 500)).save(buf, "PNG")  # a few hundred bytes for 250 000 pixels > LIMITS.max_pixels
    big = buf.getvalue()
    img = urls[0]
    return [
        ("not an image", "/v1/caption", {"image": data_url(b"hello, I am text")}, {}, 400, "not an image"),
        ("truncated", "/v1/caption", {"image": data_url(png[: len(png) // 2])}, {}, 400, "truncated"),
        ("empty image", "/v1/caption", {"image": ""}, {}, 400, "empty image"),
        ("bad base64", "/v1/caption", {"image": "data:image/png;base64,@@@"}, {}, 400, "not valid base64"),
        ("data URL not an image", "/v1/caption", {"image": data_url(png, "text/plain")}, {}, 400,
         "wrong content type 'text/plain'"),
        ("remote URL", "/v1/caption", {"image": "http://169.254.169.254/latest/meta-data"}, {}, 400,
         "remote image URLs .* are not fetched"),
        ("remote URL in chat", "/v1/chat/completions", chat_body("https://example.com/cat.jpg"), {}, 400,
         "remote image URLs"),
        ("decompression bomb", "/v1/caption", {"image": data_url(big)}, {}, 413, "image too large: 500x500"),
        ("empty question", "/v1/vqa", {"image": img, "question": "   "}, {}, 400, "empty question"),
        ("long question", "/v1/vqa", {"image": img, "question": "why " * 30}, {}, 400,
         "question too long: 119 characters, the limit is 100"),
        ("empty statement", "/v1/nlvr2", {"left": img, "right": img, "statement": ""}, {}, 400, "empty statement"),
        ("empty query", "/v1/retrieve", {"query": ""}, {}, 400, "empty query"),
        ("wrong content type", "/v1/caption", json.dumps({"image": img}).encode(), {"Content-Type": "text/plain"},
         415, "wrong content type 'text/plain'"),
        ("no content type", "/v1/caption", json.dumps({"image": img}).encode(), {"Content-Type": ""}, 415,
         "send the request as JSON"),
        ("bad JSON", "/v1/caption", b'{"image": ', {"Content-Type": "application/json"}, 400, "bad JSON"),
        ("empty body", "/v1/caption", b"", {"Content-Type": "application/json"}, 400, "empty request body"),
        ("JSON not an object", "/v1/caption", b"[1, 2]", {"Content-Type": "application/json"}, 400,
         "valid dictionary"),
        ("missing field", "/v1/vqa", {"image": img}, {}, 400, "question: Field required"),
        ("unknown field", "/v1/caption", {"image": img, "beam": 3}, {}, 400, "beam: Extra inputs"),
        ("wrong type", "/v1/vqa", {"image": img, "question": "q?", "top_k": "many"}, {}, 400, "top_k: "),
        ("body too large", "/v1/caption", {"image": "A" * 1_100_000}, {}, 413, "request body too large"),
        ("too many images", "/v1/chat/completions", chat_body(*[img] * 5), {}, 400, "too many images: 5, the limit is 4"),
        ("three images", "/v1/chat/completions", chat_body(img, img, img, text="x"), {}, 400, "3 images"),
        ("two images, no statement", "/v1/chat/completions", chat_body(img, img), {}, 400, "need a statement"),
        ("no image", "/v1/chat/completions", chat_body(text="hello"), {}, 400, "no image"),
        ("no user message", "/v1/chat/completions",
         {"model": "minivlm", "messages": [{"role": "system", "content": "hi"}]}, {}, 400, "no user message"),
        ("unknown part type", "/v1/chat/completions",
         {"model": "minivlm", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, {}, 400,
         "messages.0.content"),
        ("max_tokens above the limit", "/v1/caption", {"image": img, "max_tokens": 1000}, {}, 400,
         "max_tokens 1000 is above this server's limit of 32"),
        ("top_k above the limit", "/v1/vqa", {"image": img, "question": "q?", "top_k": 11}, {}, 400,
         "top_k 11 is above"),
        ("negative min_score", "/v1/detect", {"image": img, "min_score": -1}, {}, 400, "min_score"),
    ]


def test_every_bad_input_is_a_4xx_saying_what_was_wrong(env, server):
    for name, path, body, headers, status, pattern in _bad_cases(env.urls):
        raw = body if isinstance(body, bytes) else None
        hdrs = {k: v for k, v in headers.items() if v} if raw is not None else headers
        got, _, doc = post(server, path, None if raw is not None else body, raw=raw, headers=hdrs)
        assert got == status, (name, got, doc)
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, name
        assert re.search(pattern, doc["error"]["message"]), (name, doc["error"]["message"])
        assert doc["error"]["type"] in ("invalid_request_error",), name
    # other routes and methods: JSON errors in the same shape
    status, _, doc = call(server.port, "GET", "/v1/nothing", headers=server.auth)
    assert status == 404 and "no such endpoint" in doc["error"]["message"]
    status, _, doc = call(server.port, "GET", "/v1/caption", headers=server.auth)
    assert status == 405 and "GET is not allowed" in doc["error"]["message"]
    # a body far over the limit is refused from its declared length, before it is sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as s:
        s.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer sekret\r\nContent-Length: 1000000000\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 413")
    # a chunked upload declares no length: counted as it arrives
    chunks = [b'{"image": "'] + [b"A" * 100_000] * 11 + [b'"}']
    status, _, doc = post(server, "/v1/caption", raw=iter(chunks), headers={"Content-Type": "application/json"})
    assert status == 413 and "request body too large" in doc["error"]["message"]
    text = call(server.port, "GET", "/metrics", headers=server.auth)[2]
    # (/health answered 503 while the model loaded: that one is meant)
    assert not re.search(r'minivlm_requests_total\{endpoint="(/v1/[^"]*|other)",status="5\d\d"\}', text), "a 5xx"


# ---------------------------------------------------------------------------------------------- batching


def test_captions_do_not_depend_on_their_batch(env):
    """The library first (a batch of four = each alone), then the server: requests queued behind a held
    batch are served as one batch, each with its caption alone, whatever max_tokens the others asked for."""
    m = env.model
    alone = [m.caption([im])[0] for im in env.pil]
    assert m.caption(env.pil) == alone
    gate = Gate(m)
    app = create_app(gate, dataclasses.replace(LIMITS, max_batch=8, max_wait_ms=0))
    with running(app) as port, concurrent.futures.ThreadPoolExecutor(8) as pool:
        ready(port)
        gate.hold()
        first = in_thread(pool, call, port, "POST", "/v1/caption", {"image": env.urls[0]})
        wait_for(gate.entered.is_set, "the first batch to reach the model")
        bodies = [{"image": u} for u in env.urls] + [{"image": env.urls[1], "max_tokens": 2},
                                                     {"image": env.urls[3], "max_tokens": 5}]
        rest = [in_thread(pool, call, port, "POST", "/v1/caption", b) for b in bodies]
        wait_for(lambda: app.state.server.batcher.depth() == len(bodies), "the requests to queue")
        gate.release()
        answers = [f.result()[2] for f in [first, *rest]]
        assert gate.calls == [1, len(bodies)], "one batch of one, then one batch of all the rest"
    assert [a["caption"] for a in answers] == [alone[0], *alone, m.caption([env.pil[1]], max_len=2)[0],
                                              m.caption([env.pil[3]], max_len=5)[0]]
    assert answers[-2]["tokens"] == 2 and answers[-2]["finish_reason"] == "length"


def test_decoding_rows_end_on_their_own_on_both_runtimes(env, tmp_path):
    """`decode_captions` on PyTorch and on ONNX Runtime: the library's captions (greedy and beam), and a
    row whose max_len is short is reported as soon as it ends, while the others still decode."""
    from minivlm.export import export_model
    from minivlm.serve.decode import decode_captions

    shutil.copytree(env.folder, tmp_path / "model")
    export_model(tmp_path / "model")
    edge = MiniVLM.from_pretrained(tmp_path / "model", backend="onnx", threads=1)
    for model in (env.model, edge):
        regions = model.regions(env.pil)
        for beam in (1, 2):
            got: dict[int, tuple[list[int], str]] = {}
            decode_captions(model, regions, [9] * len(regions), beam,
                            lambda row, ids, reason: got.__setitem__(row, (list(ids), reason)))
            assert [model.tokenizer.decode(got[i][0]) for i in range(len(regions))] == model.caption(
                regions, beam_size=beam), (model, beam)
            full = [len(got[i][0]) for i in range(len(regions))] if beam == 1 else full
        order: list[int] = []
        streamed: dict[int, list[int]] = {}
        done: dict[int, list[int]] = {}

        def finished(row, ids, reason):
            order.append(row)
            done[row] = list(ids)

        decode_captions(model, regions, [2, 9, 9, 9], 1, finished,
                        lambda row, tid: streamed.setdefault(row, []).append(tid))
        assert len(done[0]) == 2 and model.tokenizer.decode(done[0]) == model.caption(regions[:1], max_len=2)[0]
        longer = [r for r in (1, 2, 3) if full[r] > 2]
        assert longer, "the test needs captions longer than 2 tokens"
        assert all(order.index(0) < order.index(r) for r in longer), order  # reported before they end
        assert all(streamed.get(r, []) == done[r] for r in done)


# ---------------------------------------------------------------------------------------------- failures


def test_model_failure_is_a_500_for_that_request_only(env, caplog):
    gate = Gate(env.model, poison=77)
    app = create_app(gate, dataclasses.replace(LIMITS, max_batch=8))
    poisoned = data_url(png_bytes((77, 50)))
    with running(app) as port, concurrent.futures.ThreadPoolExecutor(4) as pool:
        ready(port)
        gate.hold()
        blocker = in_thread(pool, call, port, "POST", "/v1/caption", {"image": env.urls[0]})
        wait_for(gate.entered.is_set, "the first batch to reach the model")
        bad = in_thread(pool, call, port, "POST", "/v1/caption", {"image": poisoned})
        good = in_thread(pool, call, port, "POST", "/v1/vqa", {"image": env.urls[1], "question": "how many?"})
        wait_for(lambda: app.state.server.batcher.depth() == 2, "both requests to queue")
        with caplog.at_level(logging.ERROR, logger="minivlm.serve.batcher"):
            gate.release()
            status, _, doc = bad.result()
        assert status == 500 and doc["error"]["type"] == "server_error" and "model failed" in doc["error"]["message"]
        assert good.result()[0] == 200 and blocker.result()[0] == 200  # its batch-mate is answered
        assert "poisoned image" in caplog.text  # logged with its traceback
        status, _, doc = call(port, "POST", "/v1/caption", {"image": env.urls[2]})  # still serving
        assert status == 200 and doc["caption"] == env.model.caption([env.pil[2]])[0]
        assert _metric(port, {}, "minivlm_model_errors_total") == 1.0


def test_timeout_and_full_queue(env):
    gate = Gate(env.model)
    app = create_app(gate, dataclasses.replace(LIMITS, max_batch=1, max_queue=1, request_timeout_s=2.0))
    with running(app) as port, concurrent.futures.ThreadPoolExecutor(4) as pool:
        ready(port)
        gate.hold()
        held = in_thread(pool, call, port, "POST", "/v1/caption", {"image": env.urls[0]})
        wait_for(gate.entered.is_set, "the first request to reach the model")
        queued = in_thread(pool, call, port, "POST", "/v1/caption", {"image": env.urls[1]})
        wait_for(lambda: app.state.server.batcher.depth() == 1, "the second request to queue")
        status, headers, doc = call(port, "POST", "/v1/caption", {"image": env.urls[2]})
        assert status == 503 and "server busy" in doc["error"]["message"] and headers.get("retry-after") == "1"
        for f in (held, queued):  # the model is held past the 2 s timeout
            status, _, doc = f.result()
            assert status == 504 and "timed out after 2 s" in doc["error"]["message"]
        gate.release()
        status, _, doc = call(port, "POST", "/v1/caption", {"image": env.urls[3]})
        assert status == 200 and doc["caption"] == env.model.caption([env.pil[3]])[0]
        assert gate.calls.count(1) == 2, "the timed-out request still queued was dropped, not run"


def test_health_says_loading_until_the_model_is_ready(env, monkeypatch):
    import minivlm.backend

    go = threading.Event()
    real = minivlm.backend.load

    def slow_load(*a, **k):
        assert go.wait(DEADLINE)
        return real(*a, **k)

    monkeypatch.setattr(minivlm.backend, "load", slow_load)
    with running(create_app(env.folder, LIMITS)) as port:
        status, _, doc = call(port, "GET", "/health")
        assert status == 503 and doc["status"] == "loading"
        status, _, doc = call(port, "POST", "/v1/caption", {"image": env.urls[0]})
        assert status == 503 and "still loading" in doc["error"]["message"]
        go.set()
        ready(port)
        status, _, doc = call(port, "GET", "/health")
        assert doc == {"status": "ok", "model": "minivlm", "backend": "torch", "tasks": list(TASKS), "index": 0}
        status, _, doc = call(port, "POST", "/v1/retrieve", {"query": "a star"})
        assert status == 400 and "--index DIR" in doc["error"]["message"]


def _metric(port: int, headers: dict, name: str) -> float:
    text = call(port, "GET", "/metrics", headers=headers)[2]
    found = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(found[0]) if found else 0.0


def test_metrics_count_requests_latency_and_batches(env, server):
    before = _metric(server.port, server.auth, 'minivlm_requests_total{endpoint="/v1/caption",status="200"}')
    for url in env.urls[:2]:
        assert post(server, "/v1/caption", {"image": url})[0] == 200
    post(server, "/v1/caption", {"image": ""})
    text = call(server.port, "GET", "/metrics", headers=server.auth)[2]
    assert _metric(server.port, server.auth, 'minivlm_requests_total{endpoint="/v1/caption",status="200"}') == before + 2
    assert re.search(r'minivlm_requests_total\{endpoint="/v1/caption",status="400"\} [1-9]', text)
    assert re.search(r'minivlm_request_duration_seconds_count\{endpoint="/v1/caption"\} [1-9]', text)
    assert re.search(r"minivlm_batch_size_count [1-9]", text) and "minivlm_queue_depth 0.0" in text


def test_the_page_is_served_without_external_resources(server):
    status, headers, html = call(server.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith("/static/"), ref
        assert call(server.port, "GET", ref)[0] == 200
    js = call(server.port, "GET", "/static/app.js")[2]
    assert not re.search(r"https?://", html + js), "the page must work offline"


# ---------------------------------------------------------------------------------------------- the command


def test_serve_bf16_runs_the_split_detector_or_says_why_not(env, tmp_path):
    """`minivlm serve --int4 --bf16` (the fastest path) serves the library's captions of that path where the CPU has
    bfloat16 units; elsewhere the load fails with the one line the library gives, and /health reports it."""
    from minivlm.edge import EdgeMiniVLM, cpu_has_bf16
    from minivlm.export import export_model

    folder = tmp_path / "model"
    shutil.copytree(env.folder, folder)
    export_model(folder, int4=True, bf16=True)
    failures: list[str] = []
    app = create_app(folder, LIMITS, int4=True, bf16=True, on_load_failure=failures.append)
    with running(app) as port:
        if not cpu_has_bf16():  # e.g. an AVX2-only CPU
            wait_for(lambda: failures, "the load to fail")
            assert "no bfloat16 units" in failures[0]
            status, _, doc = call(port, "GET", "/health")
            assert status == 503 and doc["status"] == "failed" and "no bfloat16 units" in doc["error"]
            return
        ready(port)
        status, _, doc = call(port, "GET", "/health")
        assert status == 200 and doc["backend"] == "onnx"
        served = app.state.server.model
        assert isinstance(served, EdgeMiniVLM) and served.bf16 and served.int4 and served.int8
        status, _, doc = call(port, "POST", "/v1/caption", {"image": env.urls[0]})
        fast = EdgeMiniVLM(folder / "onnx", int4=True, bf16=True)
        assert status == 200 and doc["caption"] == fast.caption([env.pil[0]])[0]
    assert not failures


def test_minivlm_serve_command(env):
    from minivlm.cli import parse

    _, args = parse("serve", [str(env.folder)])
    assert args.host == "127.0.0.1" and args.max_batch == 8  # loopback unless told otherwise
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "minivlm.cli", "serve", str(env.folder), "--port", str(port), "--max-batch", "4",
           "--api-key", "k2", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def up():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                return call(port, "GET", "/health")[0] == 200
            except OSError:
                return False
        wait_for(up, "minivlm serve to answer")
        status, _, doc = call(port, "POST", "/v1/caption", {"image": env.urls[0]}, headers={"Authorization": "Bearer k2"})
        assert status == 200 and doc["caption"] == env.model.caption([env.pil[0]])[0]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    r = subprocess.run([sys.executable, "-m", "minivlm.cli", "serve", str(env.root / "nowhere")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "not a model folder" in r.stderr and "Traceback" not in r.stderr


def test_prompt_tokens_count_the_regions_that_enter_the_transformer():
    """Usage counts the region tokens the transformer reads: the top `max_regions` over the score floor."""
    from minivlm.edge import EdgeRegions
    from minivlm.regions import Regions
    from minivlm.serve.app import Server as AppServer

    tok = get_tokenizer()
    r = Regions(boxes=torch.tensor([[0.0, 0, 5, 5]] * 4), features=torch.zeros(4, 8),
                scores=torch.tensor([0.9, 0.5, 0.1, 0.05]), labels=torch.zeros(4, dtype=torch.long),
                image_size=(10, 10))
    e = EdgeRegions(r.boxes.numpy(), r.features.numpy(), r.scores.numpy(), r.labels.numpy(), r.image_size)
    words = len(tok.encode("red star"))
    for floor, want in ((0.0, 3), (0.2, 2), (0.95, 1)):  # max_regions 3; at least the best region
        torch_side = SimpleNamespace(model=SimpleNamespace(
            tokenizer=tok, task=lambda t, f=floor: SimpleNamespace(cfg=dataclasses.replace(BERT, max_regions=3,
                                                                                       region_min_score=f))))
        onnx_side = SimpleNamespace(model=SimpleNamespace(
            tokenizer=tok, task=lambda t, f=floor: {"max_regions": 3, "region_min_score": f}))
        assert AppServer.prompt_tokens(torch_side, "vqa", "red star", [r]) == words + want
        assert AppServer.prompt_tokens(onnx_side, "vqa", "red star", [e]) == words + want
