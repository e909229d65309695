"""Gate: the outermost ASGI layer, in front of every route.

It answers 401 (API key), 503 (draining after SIGTERM) and 413 (body too large) before FastAPI
parses anything, buffers the body, and counts in-flight requests so a drain knows when to stop.
With an API key, every route but the probes and vLLM's public tokenizer routes needs it.
"""
from __future__ import annotations

import hashlib
import hmac
import json

_UNGATED = ("/health", "/metrics")  # probes: no key, never counted as in-flight work
_PUBLIC = ("/version", "/tokenize", "/detokenize")  # no key (as in vLLM), but counted


async def send_error(send, status: int, message: str, type_: str, code: str | None,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """Wraps an ASGI app; the SIGTERM handler sets `draining` and watches `in_flight`."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, root_path: str = ""):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.root_path = root_path.rstrip("/")
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = self._route_path(scope["path"])
        if self.draining and path != "/metrics":
            await send_error(send, 503, "the server is shutting down", "server_error",
                             "shutting_down", {"Retry-After": "5", "Connection": "close"})
            return
        if path in _UNGATED:
            await self.app(scope, receive, send)
            return
        if self._needs_key(scope, path) and not self._authorized(scope):
            await send_error(send, 401, "Incorrect API key provided.", "invalid_request_error",
                             "invalid_api_key")
            return
        self.in_flight += 1
        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await send_error(send, 413, f"request body exceeds {self.max_body_bytes} bytes",
                                 "invalid_request_error", "request_too_large")
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1

    def _route_path(self, path: str) -> str:
        """The path the routes see: FastAPI answers both with and without --root-path."""
        if self.root_path and (path == self.root_path or path.startswith(self.root_path + "/")):
            return path[len(self.root_path):] or "/"
        return path

    def _needs_key(self, scope, path: str) -> bool:
        # CORS preflights carry no credentials by design; they only reach the CORS layer.
        return (self.api_key is not None and path not in _PUBLIC
                and scope.get("method") != "OPTIONS")

    def _authorized(self, scope) -> bool:
        """One `Authorization: Bearer KEY` header; sha256 digests are compared in constant
        time, so the timing leaks neither the key's bytes nor its length."""
        given = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        if len(given) != 1 or not given[0].lower().startswith(b"bearer "):
            return False
        return hmac.compare_digest(hashlib.sha256(given[0][7:].strip()).digest(),
                                   hashlib.sha256(self.api_key).digest())

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it passes max_body_bytes (declared or actual)."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # disconnected; the app will see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI receive that yields the buffered body once, then the real channel (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
