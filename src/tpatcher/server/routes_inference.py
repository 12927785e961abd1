"""OpenAI-compatible inference: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, and the side-by-side ``/v1/compare``."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from .auth import ApiCaller, ServiceDep
from .generation import Sampling, StreamResult
from .schemas import (
    ChatCompletionRequest,
    CompareRequest,
    CompareResponse,
    CompletionRequest,
    ErrorResponse,
)
from .service import Service

logger = logging.getLogger("tpatcher.server")

router = APIRouter(responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}})

#: Builds one stream chunk: text (or None), finish reason (or None), whether it is the first.
ChunkFn = Callable[[str | None, str | None, bool], dict[str, Any]]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any] | str) -> str:
    body = payload if isinstance(payload, str) else JSONResponse(payload).body.decode()
    return f"data: {body}\n\n"


def _sampling(body: CompletionRequest | ChatCompletionRequest, max_new: int) -> Sampling:
    return Sampling(max_new, body.temperature, body.top_p, tuple(body.stop_list))


def _stream_response(
    service: Service,
    prompt: str,
    sampling: Sampling,
    chunk: ChunkFn,
    *,
    prefix: str,
    include_usage: bool,
) -> StreamingResponse:
    """Server-sent events; with ``include_usage`` a last chunk carries the token counts."""
    service.generator.encode(prompt, sampling.max_new)  # a length error is a 400, not a stream
    result = StreamResult()
    pieces = service.generator.stream(prompt, sampling, result)

    def event(text: str | None, finish: str | None, first: bool = False) -> str:
        payload = chunk(text, finish, first)
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    async def events() -> AsyncIterator[str]:
        yield event(prefix, None, True)
        try:
            async for piece in pieces:
                yield event(piece, None)
        except Exception as exc:  # the status is sent already: report in-band
            logger.exception("generation failed during a stream")
            service.metrics.inc("tpatcher_errors_total", "Server errors", kind="stream")
            yield _sse({"error": {"message": str(exc), "type": "server_error"}})
            return
        yield event(None, result.finish_reason)
        if include_usage:
            last = chunk(None, None, False)
            last.update(choices=[], usage=_usage(result.prompt_tokens, result.completion_tokens))
            yield _sse(last)
        yield _sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/v1/models")
async def models(service: ServiceDep, _: ApiCaller) -> dict[str, Any]:
    card = {
        "id": service.model_name,
        "object": "model",
        "created": int(service.started),
        "owned_by": "tpatcher",
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, service: ServiceDep, _: ApiCaller
) -> dict[str, Any] | StreamingResponse:
    """OpenAI text completion: greedy with ``temperature`` 0 (or below 1e-5), else sampled."""
    service.check_request(body.model, body.max_tokens)
    sampling = _sampling(body, body.max_tokens)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": service.model_name,
    }
    echo = body.prompt if body.echo else ""
    if body.stream:

        def chunk(text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice]}

        return _stream_response(
            service, body.prompt, sampling, chunk, prefix=echo, include_usage=body.include_usage
        )
    gen = await service.generator.complete(body.prompt, sampling)
    choice = {"index": 0, "text": echo + gen.text, "logprobs": None}
    choice["finish_reason"] = gen.finish_reason
    return {**head, "choices": [choice], "usage": _usage(gen.prompt_tokens, gen.completion_tokens)}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, service: ServiceDep, _: ApiCaller
) -> dict[str, Any] | StreamingResponse:
    """OpenAI chat completion, with the model's own chat template."""
    max_new = body.token_limit or min(service.limits.max_tokens, 256)
    service.check_request(body.model, max_new)
    prompt = service.render_chat(body.messages)
    sampling = _sampling(body, max_new)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": service.model_name,
    }
    if body.stream:

        def chunk(text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        return _stream_response(
            service, prompt, sampling, chunk, prefix="", include_usage=body.include_usage
        )
    gen = await service.generator.complete(prompt, sampling)
    message = {"role": "assistant", "content": gen.text}
    return {
        **head,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": gen.finish_reason}],
        "usage": _usage(gen.prompt_tokens, gen.completion_tokens),
    }


@router.post("/v1/compare", response_model=CompareResponse)
async def compare(body: CompareRequest, service: ServiceDep, _: ApiCaller) -> CompareResponse:
    """Greedy completions of the same prompt by the patched and by the unpatched model (the
    base model is used for this request's thread only; other requests stay patched)."""
    service.check_request(service.model_name, body.max_tokens)
    prompt = body.prompt if body.messages is None else service.render_chat(body.messages)
    service.generator.encode(prompt, body.max_tokens)
    patched, base = await service.generator.compare(prompt, body.max_tokens)
    return CompareResponse(patched=patched, base=base)
