"""What a ``/v1/`` request passes before any endpoint sees it (the ingress's middleware): its API
key, when the app has one (else a 401), and its body's size (a body too big for any prompt that
fits the context is a 413, refused before it is parsed: ``cluster.openai.limits``). ``/health``
and ``/metrics`` pass freely."""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.api_errors import json_response
from cluster.openai.limits import RequestLimits
from cluster.openai.responses import error_payload


class BodyLimit:
    """Refuses a ``/v1/`` request whose body is bigger than ``limit()`` bytes with a 413, before
    anything parses it: by its Content-Length, else while reading it (at most the limit is read
    here, then replayed to the app; what follows, e.g. a disconnect, comes from the client)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], Awaitable[RequestLimits]]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "/v1/" not in scope["path"]:
            await self.app(scope, receive, send)
            return
        try:
            limits = await self.limit()
        except Exception:  # noqa: BLE001 - the endpoint meets the same failure and answers it
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            await self.refuse(limits, scope, receive, send)
            return
        read: deque[Message] = deque()
        size = 0
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limits.max_body_bytes:
                await self.refuse(limits, scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return read.popleft() if read else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def refuse(limits: RequestLimits, scope: Scope, receive: Receive, send: Send) -> None:
        payload = error_payload(limits.body_too_big(), code="request_too_large")
        await json_response(payload, 413)(scope, receive, send)


async def check_api_key(request: Request, call_next: Any) -> Any:
    """HTTP middleware: a ``/v1/`` request must carry the app's key (``app.state.api_key``, when
    set) as a bearer token; compared in constant time."""
    expected = getattr(request.app.state, "api_key", None)
    if expected and "/v1/" in request.url.path:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            payload = error_payload(
                "invalid or missing API key", "authentication_error", code="invalid_api_key"
            )
            return json_response(payload, 401)
    return await call_next(request)
