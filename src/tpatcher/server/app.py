"""The FastAPI app: OpenAI-compatible inference, and edits that land while it keeps serving.

The pieces: :mod:`.service` (state and workers), :mod:`.generation` (all generation),
:mod:`.edits` (two-phase edits and rollbacks), :mod:`.store` (the durable store), the
routers :mod:`.routes_inference`, :mod:`.routes_edits` and :mod:`.routes_ops`,
:mod:`.errors` (the error envelope) and :mod:`.middleware` (body limit, request metrics,
last-resort 500s). The browser console (:mod:`.console`, ``/ui``) is included when present.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tpatcher.patcher import Patcher

from . import routes_edits, routes_inference, routes_ops
from .audit import caller_name
from .errors import install_error_handlers
from .limits import Limits
from .middleware import RequestGuard
from .schemas import ErrorResponse
from .service import Service
from .store import EditStore


def create_app(
    patcher: Patcher,
    store: EditStore,
    edit_token: str | None = None,
    api_token: str | None = None,
    *,
    model_name: str | None = None,
    max_tokens: int = 512,
    generation_workers: int = 4,
    limits: Limits | None = None,
) -> FastAPI:
    """The service around a loaded ``patcher`` whose edits are already in ``store``
    (``store.open(patcher, store.check())``). ``limits`` overrides ``max_tokens``."""
    service = Service(
        patcher,
        store,
        model_name=model_name or patcher.base_model_name,
        edit_token=edit_token,
        api_token=api_token,
        generation_workers=generation_workers,
        limits=limits or Limits(max_tokens=max_tokens),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(
        title="tpatcher",
        summary="OpenAI-compatible inference with Transformer-Patcher edits",
        lifespan=lifespan,
        responses={400: {"model": ErrorResponse}},
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard,
        metrics=service.metrics,
        max_body_bytes=service.limits.max_body_bytes,
        caller=lambda header: caller_name(service, header),
    )
    for module in (routes_ops, routes_inference, routes_edits):
        app.include_router(module.router)
    if importlib.util.find_spec(f"{__package__}.console") is not None:
        console = importlib.import_module(f"{__package__}.console")
        app.include_router(console.router)
    return app
