"""The outermost layer of the app: body-size limit, request metrics, last-resort errors.

A plain ASGI middleware (not ``BaseHTTPMiddleware``) so that it sees every response, 500s
included, and every body byte before FastAPI parses it:

* a body over ``max_body_bytes`` is answered 413 before any parsing, from ``Content-Length``
  when the client sends one and by counting the bytes as they arrive otherwise;
* every response's status is counted in ``tpatcher_requests_total`` with its route;
* an exception no handler answered is logged once with its traceback, counted in
  ``tpatcher_errors_total{kind="unhandled"}`` and answered 500 in the error envelope.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .audit import audit
from .errors import error_response
from .metrics import Metrics

logger = logging.getLogger("tpatcher.server")

_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class BodyTooLarge(Exception):
    """The request body exceeds the limit."""


class RequestGuard:
    """Wraps the FastAPI app; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body_bytes: int,
        caller: Callable[[str | None], str] = lambda header: "anonymous",
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.caller = caller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = {"status": None}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["seconds"] = time.perf_counter() - start
            await send(message)

        try:
            body_receive = await self._read_body(scope, receive)
            await self.app(scope, body_receive, send_counted)
        except BodyTooLarge:
            self._refuse_body(scope)
            response = error_response(
                413,
                f"the request body is larger than this server's limit of "
                f"{self.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
                limit=self.max_body_bytes,
            )
            await response(scope, receive, send_counted)
        except Exception as exc:
            logger.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
            self.metrics.inc("tpatcher_errors_total", "Server errors", kind="unhandled")
            if state["status"] is None:
                message = f"internal error: {type(exc).__name__}: {exc}"
                await error_response(500, message, "server_error")(scope, receive, send_counted)
        finally:
            self._count(scope, state, start)

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body up front (refusing it past the limit); replay it after."""
        if scope["method"] not in _BODY_METHODS:
            return receive
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise BodyTooLarge
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                raise BodyTooLarge
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay

    def _refuse_body(self, scope: Scope) -> None:
        if str(scope["path"]).startswith("/v1/edits"):
            header = dict(scope.get("headers") or []).get(b"authorization")
            who = self.caller(header.decode("latin-1") if header else None)
            audit("refusal", who=who, method=scope["method"], path=scope["path"], status=413)

    def _count(self, scope: Scope, state: dict[str, Any], start: float) -> None:
        route = scope.get("route")
        labels = {"method": str(scope["method"]), "path": getattr(route, "path", "unmatched")}
        status = state["status"] if state["status"] is not None else 500
        self.metrics.inc("tpatcher_requests_total", "HTTP requests", status=str(status), **labels)
        self.metrics.observe(
            "tpatcher_request_seconds",
            "Time to the response start (streams: to the first byte)",
            state.get("seconds", time.perf_counter() - start),
            **labels,
        )
