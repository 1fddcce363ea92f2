"""`Guard`: the checks every request passes before any handler runs (pure ASGI middleware).

    API key      with `api_key` set, /v1/* and /metrics need `Authorization: Bearer KEY` (401 otherwise);
                 the page, its files, /docs and /health stay open: they carry no data, and a browser
                 cannot attach a header to the page it navigates to (the page sends the key itself)
    content type a POST to /v1/* must be application/json (415)
    body size    at most `max_body_bytes`, checked on the declared length and again on the bytes that
                 arrive (a chunked upload declares none) (413)

Handlers then see the body already read, so a handler never waits on a slow uploader while holding
anything. Every refusal is a JSON error in OpenAI's shape.
"""

from __future__ import annotations

import hmac
import json

from minivlm.serve.errors import ApiError

OPEN_PATHS = {"/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico"}


async def send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            receive = await self.check(scope, receive)
        except ApiError as err:
            return await send_error(send, err)
        if receive is not None:
            await self.app(scope, receive, send)

    async def check(self, scope, receive):
        """The `receive` to hand on (the body replayed), None if the client left, or an ApiError."""
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and path not in OPEN_PATHS and not path.startswith("/static/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'"
                               if given else "this server needs an API key: send 'Authorization: Bearer <key>'",
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if method != "POST" or not path.startswith("/v1/"):
            return receive
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"wrong content type {ctype or '(none)'!r}: send the request as JSON "
                                "(Content-Type: application/json), images inside it as data URLs",
                           "wrong_content_type")
        declared = headers.get("content-length")
        if declared is not None and not declared.strip().isdigit():
            raise ApiError(400, f"bad Content-Length {declared!r}", "bad_request")
        if declared is not None and int(declared) > 2 * self.max_body:
            raise self.too_large(int(declared))  # not worth reading: answer now and drop the connection
        body, size = bytearray(), 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            # a little over the limit is read to its end and discarded, so the client gets a clean 413
            # rather than a connection reset in the middle of its upload; far over, it is cut off
            if size <= self.max_body:
                body += chunk
            elif size > 2 * self.max_body:
                raise self.too_large(size)
            if not message.get("more_body"):
                break
        if size > self.max_body:
            raise self.too_large(size)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return replay

    def too_large(self, size: int) -> ApiError:
        return ApiError(413, f"request body too large: {size} bytes, the limit is {self.max_body} "
                             "(max_body_bytes)", "body_too_large")
