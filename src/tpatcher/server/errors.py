"""Error answers: OpenAI's ``{"error": {...}}`` envelope for every failure.

Handlers turn validation errors, HTTP errors, :class:`ServiceError` and the library's
:class:`~tpatcher.errors.TPatcherError` into that envelope. Anything else (a bug) is caught
by :class:`~tpatcher.server.middleware.RequestGuard`, which logs its traceback once and
answers 500. A refusal of an edit request is written to the audit log.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpatcher.errors import InvalidEditError, TPatcherError, UnknownEditError

from .audit import audit, caller_name

_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found",
    413: "invalid_request_error",
}


class ServiceError(Exception):
    """An error answered with ``status`` and the envelope; ``extra`` adds fields to it."""

    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.extra = (
            status,
            message,
            type_,
            code,
            extra,
        )


def error_response(
    status: int, message: str, type_: str, code: str | None = None, **extra: Any
) -> JSONResponse:
    """The envelope as a response."""
    body: dict[str, Any] = {"message": message, "type": type_, "param": None, "code": code}
    body.update(extra)
    return JSONResponse(jsonable_encoder({"error": body}), status_code=status)


def _refused(request: Request, response: JSONResponse, message: str) -> JSONResponse:
    """Audit a refused edit or rollback: a 4xx answer to a non-GET request under
    ``/v1/edits`` (failures after acceptance are logged as the edit's outcome)."""
    refused = 400 <= response.status_code < 500
    if refused and request.url.path.startswith("/v1/edits") and request.method != "GET":
        service = getattr(request.app.state, "service", None)
        who = caller_name(service, request.headers.get("authorization"))
        audit(
            "refusal",
            who=who,
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            reason=message[:200],
        )
    return response


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
        for e in exc.errors()
    ]
    detail = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
    message = "; ".join(problems)
    response = error_response(400, message, "invalid_request_error", detail=detail)
    return _refused(request, response, message)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    response = error_response(exc.status_code, message, _HTTP_TYPES.get(exc.status_code, "error"))
    response.headers.update(exc.headers or {})
    return _refused(request, response, message)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    response = error_response(exc.status, exc.message, exc.type, exc.code, **exc.extra)
    return _refused(request, response, exc.message)


async def _unknown(request: Request, exc: Exception) -> JSONResponse:
    response = error_response(404, str(exc), "not_found", "edit_not_found")
    return _refused(request, response, str(exc))


async def _tpatcher(request: Request, exc: Exception) -> JSONResponse:
    status = 400 if isinstance(exc, InvalidEditError) else 500
    response = error_response(status, str(exc), type(exc).__name__)
    return _refused(request, response, str(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Register the envelope handlers on ``app``."""
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(UnknownEditError, _unknown)
    app.add_exception_handler(TPatcherError, _tpatcher)
