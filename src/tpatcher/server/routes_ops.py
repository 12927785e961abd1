"""Operations: ``/healthz`` (liveness and what is loaded) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from .auth import ServiceDep

router = APIRouter()


@router.get("/healthz")
async def healthz(service: ServiceDep) -> dict[str, Any]:
    """Liveness and what is loaded."""
    patcher = service.patcher
    return {
        "status": "ok",
        "model": service.model_name,
        "fingerprint": patcher.fingerprint,
        "edits": len(patcher.edit_ids),
        "neurons": patcher.num_neurons,
        "editing_enabled": service.edit_token is not None,
        "edit_in_progress": service.edits.editing,
    }


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> PlainTextResponse:
    """Requests by status and route, edit outcomes and latencies, errors, gauges."""
    return PlainTextResponse(
        service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
