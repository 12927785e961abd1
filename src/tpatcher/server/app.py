"""The FastAPI app: OpenAI-compatible inference, and edits that land while it keeps serving.

Concurrency model (why it is safe to generate while an edit trains):

* Generation runs in a small thread pool (``generation_workers``), never on the event loop.
  The patched model is a plain HF model; committed neurons are an immutable state that an
  edit swaps in whole, so a forward pass sees a new edit all-or-nothing.
* Edits and rollbacks run on one dedicated worker thread, so they apply one at a time in
  arrival order, and an edit is written to the store (file, then manifest: the commit point)
  before its response is sent. If the write fails, the edit is rolled back in memory.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Path, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from tpatcher.errors import InvalidEditError, TPatcherError, TrainingError, UnknownEditError
from tpatcher.patcher import EditResult, Patcher

from .metrics import Metrics
from .schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DeletedEdit,
    EditBatchRequest,
    EditBatchResponse,
    EditInfo,
    EditList,
    EditRequest,
    EditResponse,
    ErrorResponse,
)
from .store import EditStore

logger = logging.getLogger("tpatcher.server")

#: Edits (batch items count one each) waiting for the worker before new ones get 503.
MAX_PENDING_EDITS = 64


class ServiceError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` envelope."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


@dataclass
class Generation:
    """Finished generation: text after stop handling, and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class _StopOnText(StoppingCriteria):
    """Stops when a stop string appears in the new text or the consumer cancels."""

    def __init__(
        self, tokenizer: Any, prompt_len: int, stops: list[str], cancel: threading.Event
    ) -> None:
        self.tokenizer, self.prompt_len, self.stops, self.cancel = (
            tokenizer,
            prompt_len,
            stops,
            cancel,
        )

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self.cancel.is_set()
        if not done and self.stops:
            text = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
            done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class Service:
    """Everything the routes share: the patcher, the store, the workers, the counters."""

    def __init__(
        self,
        patcher: Patcher,
        store: EditStore,
        *,
        model_name: str,
        edit_token: str | None,
        api_token: str | None,
        max_tokens: int,
        generation_workers: int,
    ) -> None:
        self.patcher = patcher
        self.tokenizer = patcher.tokenizer
        self.store = store
        self.model_name = model_name
        self.edit_token = edit_token or None
        self.api_token = api_token or None
        self.max_tokens = max_tokens
        self.generation_workers = generation_workers
        self.metrics = Metrics()
        self.edit_pool: ThreadPoolExecutor | None = None
        self.gen_pool: ThreadPoolExecutor | None = None
        self.pending_edits = 0
        self.editing = False
        self.started = time.time()
        limit = getattr(patcher.model.config, "max_position_embeddings", None)
        self.context = int(limit) if isinstance(limit, int) and limit > 0 else 2048
        gen_eos = patcher.model.generation_config.eos_token_id
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = {int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None}
        self._register_gauges()

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge("tpatcher_store_edits", "Edits in the store", lambda: len(self.patcher.records))
        m.gauge("tpatcher_neurons", "Patch neurons in the model", lambda: self.patcher.num_neurons)
        m.gauge("tpatcher_edit_in_progress", "1 while an edit trains", lambda: int(self.editing))
        m.gauge("tpatcher_edits_pending", "Edits queued or training", lambda: self.pending_edits)
        m.gauge("tpatcher_uptime_seconds", "Seconds up", lambda: time.time() - self.started)

    def start(self) -> None:
        self.edit_pool = ThreadPoolExecutor(1, thread_name_prefix="tpatcher-edit")
        self.gen_pool = ThreadPoolExecutor(
            self.generation_workers, thread_name_prefix="tpatcher-generate"
        )

    def stop(self) -> None:
        # wait for a running edit to be written; queued ones were never acknowledged
        for pool in (self.edit_pool, self.gen_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    async def in_edit_worker(self, fn: Callable[[], Any]) -> Any:
        assert self.edit_pool is not None, "service not started"
        return await asyncio.wrap_future(self.edit_pool.submit(fn))

    async def in_gen_worker(self, fn: Callable[[], Any]) -> Any:
        assert self.gen_pool is not None, "service not started"
        return await asyncio.wrap_future(self.gen_pool.submit(fn))

    # -- prompts -------------------------------------------------------------------------
    def render_chat(self, messages: list[ChatMessage]) -> str:
        """The chat template with the assistant's turn opened (as the model was tuned)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ServiceError(
                400, "this model has no chat template; use /v1/completions", "invalid_request_error"
            )
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        text = self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):  # the tokenizer may add BOS itself: don't double it
            ids = self.tokenizer(text)["input_ids"]
            if ids[:2] == [self.tokenizer.bos_token_id] * 2:
                text = text[len(bos) :]
        return str(text)

    def encode(self, prompt: str, max_new: int) -> dict[str, torch.Tensor]:
        """Tokenise exactly as :meth:`Patcher.encode` does, so edits match inference."""
        enc = self.tokenizer(prompt, return_tensors="pt")
        n = enc["input_ids"].shape[1]
        if n + max_new > self.context:
            raise ServiceError(
                400,
                f"the prompt is {n} tokens; with max_tokens={max_new} that exceeds the model's "
                f"context of {self.context} tokens",
                "invalid_request_error",
                "context_length_exceeded",
            )
        return {k: v.to(self.patcher.input_device) for k, v in enc.items()}

    def check_request(self, model: str, max_tokens: int) -> None:
        if model not in (self.model_name, self.patcher.base_model_name):
            raise ServiceError(
                404,
                f"model {model!r} not found; this server serves {self.model_name!r}",
                "invalid_request_error",
                "model_not_found",
            )
        if max_tokens > self.max_tokens:
            raise ServiceError(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {self.max_tokens}",
                "invalid_request_error",
            )

    # -- generation ----------------------------------------------------------------------
    def _generate_kwargs(
        self, enc: dict[str, torch.Tensor], max_new: int, temperature: float, top_p: float
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(enc, max_new_tokens=max_new)
        if temperature == 0.0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        pad = self.tokenizer.pad_token_id
        kwargs["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        return kwargs

    def _finish(self, new_ids: list[int], text: str, stops: list[str], max_new: int) -> Generation:
        text, stopped = _cut_at_stop(text, stops)
        natural = bool(new_ids) and new_ids[-1] in self.eos_ids
        reason = "stop" if stopped or natural or len(new_ids) < max_new else "length"
        return Generation(text, 0, len(new_ids), reason)

    def generate(
        self, prompt: str, max_new: int, temperature: float, top_p: float, stops: list[str]
    ) -> Generation:
        """Blocking generation (run in the generation pool)."""
        enc = self.encode(prompt, max_new)
        n = enc["input_ids"].shape[1]
        criteria = StoppingCriteriaList([_StopOnText(self.tokenizer, n, stops, threading.Event())])
        kwargs = self._generate_kwargs(enc, max_new, temperature, top_p)
        with torch.no_grad():
            out = self.patcher.model.generate(**kwargs, stopping_criteria=criteria)
        new_ids = out[0, n:].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        gen = self._finish(new_ids, text, stops, max_new)
        gen.prompt_tokens = n
        return gen

    async def stream(
        self,
        prompt: str,
        max_new: int,
        temperature: float,
        top_p: float,
        stops: list[str],
        result: dict[str, Any],
    ) -> AsyncIterator[str]:
        """Yield text pieces as they are generated, holding back what could start a stop
        string. ``result`` receives the finish reason and token counts at the end."""
        enc = self.encode(prompt, max_new)
        n = enc["input_ids"].shape[1]
        cancel = threading.Event()
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        kwargs = self._generate_kwargs(enc, max_new, temperature, top_p)
        criteria = StoppingCriteriaList([_StopOnText(self.tokenizer, n, [], cancel)])

        def run() -> torch.Tensor:
            try:
                with torch.no_grad():
                    return self.patcher.model.generate(
                        **kwargs, streamer=streamer, stopping_criteria=criteria
                    )
            finally:
                streamer.end()  # unblock the consumer even if generate raised

        assert self.gen_pool is not None, "service not started"
        future = self.gen_pool.submit(run)
        hold = max((len(s) for s in stops), default=1) - 1
        buffer, stopped = "", False
        try:
            async for piece in iterate_in_threadpool(iter(streamer)):
                buffer += piece
                text, stopped = _cut_at_stop(buffer, stops)
                if stopped:
                    cancel.set()
                    if text:
                        yield text
                    buffer = ""
                    break
                safe = len(buffer) - hold
                if safe > 0:
                    yield buffer[:safe]
                    buffer = buffer[safe:]
            out = await asyncio.wrap_future(future)
            if buffer:
                yield buffer
            new_ids = out[0, n:].tolist()
            gen = self._finish(new_ids, "", [], max_new)
            result.update(
                finish_reason="stop" if stopped else gen.finish_reason,
                prompt_tokens=n,
                completion_tokens=len(new_ids),
            )
        finally:
            cancel.set()  # the client went away or we stopped: free the generation thread

    # -- edits ---------------------------------------------------------------------------
    def edit_prompt(self, item: EditRequest) -> str:
        return item.prompt if item.messages is None else self.render_chat(item.messages)

    def _apply_one(self, prompt: str, target: str) -> EditResponse:
        """Train, commit and persist one edit (edit worker only)."""
        self.editing = True
        try:
            try:
                result: EditResult = self.patcher.edit(prompt, target)
            except TrainingError as exc:
                self.metrics.inc("tpatcher_edits_total", "Edit requests", outcome="error")
                return EditResponse(
                    id=None,
                    success=False,
                    already_correct=False,
                    steps=0,
                    seconds=0.0,
                    neurons=0,
                    message=f"training failed, model unchanged: {exc}",
                )
            if result.edit_id is not None:
                try:
                    self.store.append(self.patcher, result.edit_id)
                except BaseException:
                    self.patcher.rollback(result.edit_id)  # not durable: not applied
                    raise
        finally:
            self.editing = False
        outcome = (
            "already_correct"
            if result.already_correct
            else ("applied" if result.edit_id else "failed")
        )
        self.metrics.inc("tpatcher_edits_total", "Edit requests", outcome=outcome)
        if result.edit_id:
            self.metrics.observe(
                "tpatcher_edit_seconds", "Time to train and store an edit", result.seconds
            )
        return EditResponse(
            id=result.edit_id,
            success=result.success,
            already_correct=result.already_correct,
            steps=result.steps,
            seconds=round(result.seconds, 4),
            neurons=result.neurons,
            message=result.message,
            losses={k: float(v) for k, v in result.losses.items()},
        )

    async def apply_edits(self, items: list[EditRequest]) -> list[EditResponse]:
        """Validate every item first (nothing changes if one is bad), then apply in order."""
        prompts = [self.edit_prompt(item) for item in items]
        for i, (prompt, item) in enumerate(zip(prompts, items, strict=True)):
            try:
                self.patcher.encode(prompt, item.target)
            except InvalidEditError as exc:
                where = f"edits[{i}]: " if len(items) > 1 else ""
                raise ServiceError(400, f"{where}{exc}", "invalid_request_error") from exc
        if self.pending_edits + len(items) > MAX_PENDING_EDITS:
            raise ServiceError(
                503, "too many edits queued; retry later", "server_busy", "edit_queue_full"
            )
        self.pending_edits += len(items)

        def job() -> list[EditResponse]:
            results = []
            for prompt, item in zip(prompts, items, strict=True):
                try:
                    results.append(self._apply_one(prompt, item.target))
                finally:
                    self.pending_edits -= 1
            return results

        return await self.in_edit_worker(job)

    def rollback(self, edit_id: str) -> None:
        """Durable rollback (edit worker only, so it is ordered with edits)."""
        if edit_id not in self.patcher.records:
            raise UnknownEditError(f"no edit with id {edit_id!r}")
        self.store.remove(self.patcher, edit_id)
        self.metrics.inc("tpatcher_rollbacks_total", "Edits rolled back")

    def edit_info(self, edit_id: str) -> EditInfo:
        record = self.patcher.records.get(edit_id)
        if record is None:
            raise ServiceError(404, f"no edit with id {edit_id!r}", "not_found", "edit_not_found")
        return EditInfo(**record.to_manifest(), sha256=self.store.sha256(edit_id))


# -- auth -------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
EditIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", max_length=64)]


def _service(request: Request) -> Service:
    return request.app.state.service


def _token_ok(given: HTTPAuthorizationCredentials | None, expected: str) -> bool:
    supplied = given.credentials if given is not None else ""
    return hmac.compare_digest(supplied.encode(), expected.encode())


def _unauthorised(what: str) -> HTTPException:
    return HTTPException(
        401,
        f"missing or wrong bearer token for {what}",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_api_token(request: Request, creds: Credentials) -> None:
    """Inference (and reading edits) needs the API token, when one is configured."""
    expected = _service(request).api_token
    if expected is not None and not _token_ok(creds, expected):
        raise _unauthorised("this endpoint")


def require_edit_token(request: Request, creds: Credentials) -> None:
    """Edits and rollbacks always need a token; without one configured they are off."""
    expected = _service(request).edit_token
    if expected is None:
        raise HTTPException(
            403,
            "editing is disabled on this server: start it with --edit-token "
            "(or TPATCHER_EDIT_TOKEN) to enable edits and rollbacks",
        )
    if not _token_ok(creds, expected):
        raise _unauthorised("edits")


def _sse(payload: dict[str, Any] | str) -> str:
    body = payload if isinstance(payload, str) else JSONResponse(payload).body.decode()
    return f"data: {body}\n\n"


# -- app --------------------------------------------------------------------------------------
def create_app(
    patcher: Patcher,
    store: EditStore,
    edit_token: str | None = None,
    api_token: str | None = None,
    *,
    model_name: str | None = None,
    max_tokens: int = 512,
    generation_workers: int = 4,
) -> FastAPI:
    """The service around a loaded ``patcher`` whose edits are already in ``store``."""
    service = Service(
        patcher,
        store,
        model_name=model_name or patcher.base_model_name,
        edit_token=edit_token,
        api_token=api_token,
        max_tokens=max_tokens,
        generation_workers=generation_workers,
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
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}},
    )
    app.state.service = service
    api = [Depends(require_api_token)]
    edit = [Depends(require_edit_token)]

    # -- errors, metrics -----------------------------------------------------------------
    def error(status: int, message: str, type_: str, code: str | None = None, **extra: Any):
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        body["error"].update(extra)
        return JSONResponse(jsonable_encoder(body), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()
        ]
        detail = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        return error(400, "; ".join(problems), "invalid_request_error", detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        types = {401: "authentication_error", 403: "permission_error", 404: "not_found"}
        response = error(exc.status_code, str(exc.detail), types.get(exc.status_code, "error"))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error(exc.status, exc.message, exc.type, exc.code)

    @app.exception_handler(UnknownEditError)
    async def _unknown(request: Request, exc: UnknownEditError) -> JSONResponse:
        return error(404, str(exc), "not_found", "edit_not_found")

    @app.exception_handler(TPatcherError)
    async def _tpatcher(request: Request, exc: TPatcherError) -> JSONResponse:
        status = 400 if isinstance(exc, InvalidEditError) else 500
        return error(status, str(exc), type(exc).__name__)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        labels = dict(method=request.method, path=path)
        service.metrics.inc(
            "tpatcher_requests_total",
            "HTTP requests",
            status=str(response.status_code),
            **labels,
        )
        service.metrics.observe(
            "tpatcher_request_seconds",
            "Time to the response start (streams: to the first byte)",
            time.perf_counter() - start,
            **labels,
        )
        return response

    # -- plain endpoints -----------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {
            "status": "ok",
            "model": service.model_name,
            "fingerprint": patcher.fingerprint,
            "edits": len(patcher.records),
            "neurons": patcher.num_neurons,
            "editing_enabled": service.edit_token is not None,
            "edit_in_progress": service.editing,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models", dependencies=api)
    async def models() -> dict[str, Any]:
        card = {
            "id": service.model_name,
            "object": "model",
            "created": int(service.started),
            "owned_by": "tpatcher",
        }
        return {"object": "list", "data": [card]}

    # -- inference -----------------------------------------------------------------------
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def _stream_response(
        prompt: str,
        body: CompletionRequest | ChatCompletionRequest,
        max_new: int,
        chunk: Callable[[str | None, str | None, bool], dict[str, Any]],
        prefix: str,
    ) -> StreamingResponse:
        service.encode(prompt, max_new)  # length errors become a 400 before the stream starts
        result: dict[str, Any] = {}
        pieces = service.stream(
            prompt, max_new, body.temperature, body.top_p, body.stop_list, result
        )

        async def events() -> AsyncIterator[str]:
            yield _sse(chunk(prefix, None, True))
            try:
                async for piece in pieces:
                    yield _sse(chunk(piece, None, False))
            except Exception as exc:  # the status is sent already: report in-band
                logger.exception("generation failed during a stream")
                yield _sse({"error": {"message": str(exc), "type": "server_error"}})
                return
            yield _sse(chunk(None, result.get("finish_reason", "stop"), False))
            yield _sse("[DONE]")

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/completions", dependencies=api, response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        """OpenAI text completion: greedy with ``temperature: 0``, else sampled."""
        service.check_request(body.model, body.max_tokens)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = body.prompt if body.echo else ""
        if body.stream:

            def chunk(text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
                choice = {"index": 0, "text": text or "", "logprobs": None}
                choice["finish_reason"] = finish
                return {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": service.model_name,
                    "choices": [choice],
                }

            return await _stream_response(body.prompt, body, body.max_tokens, chunk, echo)
        gen: Generation = await service.in_gen_worker(
            lambda: service.generate(
                body.prompt, body.max_tokens, body.temperature, body.top_p, body.stop_list
            )
        )
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": service.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": echo + gen.text,
                    "logprobs": None,
                    "finish_reason": gen.finish_reason,
                }
            ],
            "usage": _usage(gen.prompt_tokens, gen.completion_tokens),
        }

    @app.post("/v1/chat/completions", dependencies=api, response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        """OpenAI chat completion, with the model's own chat template."""
        max_new = body.token_limit or min(service.max_tokens, 256)
        service.check_request(body.model, max_new)
        prompt = service.render_chat(body.messages)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:

            def chunk(text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                return {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": service.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }

            return await _stream_response(prompt, body, max_new, chunk, "")
        gen: Generation = await service.in_gen_worker(
            lambda: service.generate(prompt, max_new, body.temperature, body.top_p, body.stop_list)
        )
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": service.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason,
                }
            ],
            "usage": _usage(gen.prompt_tokens, gen.completion_tokens),
        }

    # -- edits ---------------------------------------------------------------------------
    @app.post("/v1/edits", dependencies=edit, response_model=EditResponse)
    async def create_edit(body: EditRequest, response: Response) -> EditResponse:
        """Train a patch so that the prompt is answered with ``target``; 201 when a new edit
        was stored, 200 when nothing changed (already correct, or training did not fix it)."""
        (result,) = await service.apply_edits([body])
        response.status_code = 201 if result.id else 200
        return result

    @app.post("/v1/edits:batch", dependencies=edit, response_model=EditBatchResponse)
    async def create_edits(body: EditBatchRequest, response: Response) -> EditBatchResponse:
        """Several edits, validated together and applied in list order, each stored on its
        own; ``results[i]`` answers ``edits[i]``."""
        results = await service.apply_edits(body.edits)
        response.status_code = 201 if any(r.id for r in results) else 200
        return EditBatchResponse(results=results)

    @app.get("/v1/edits", dependencies=api, response_model=EditList)
    async def list_edits() -> EditList:
        """Every stored edit, oldest first, with its provenance."""
        return EditList(
            base_model=patcher.base_model_name,
            fingerprint=patcher.fingerprint,
            neurons=patcher.num_neurons,
            data=[service.edit_info(edit_id) for edit_id in list(patcher.records)],
        )

    @app.get("/v1/edits/{edit_id}", dependencies=api, response_model=EditInfo)
    async def get_edit(edit_id: EditIdPath) -> EditInfo:
        return service.edit_info(edit_id)

    @app.delete("/v1/edits/{edit_id}", dependencies=edit, response_model=DeletedEdit)
    async def delete_edit(edit_id: EditIdPath) -> DeletedEdit:
        """Roll the edit back, durably, after any edits queued before this request."""
        await service.in_edit_worker(lambda: service.rollback(edit_id))
        return DeletedEdit(id=edit_id)

    return app
