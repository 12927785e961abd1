"""All of the service's text generation, behind one class (:class:`Generator`).

Completions and streams of a decoder-only model are batched: concurrent requests share
forward passes on one scheduler thread (:mod:`.batching`), each with its own sampling
settings, stop strings and cancellation. The patched model is a plain HF model whose
published neurons are an immutable state that an edit swaps in whole, and each decoding
step is one forward pass over the whole batch, so every running request sees a new edit
from the same step on. ``compare`` (whose base-model half is private to its thread) and
encoder-decoder models run ``generate`` on a small thread pool instead.

Prompts are tokenised by :func:`tpatcher.encoding.encode_prompt` (which also refuses a
prompt that does not fit the context), exactly as edits are.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from starlette.concurrency import iterate_in_threadpool
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from tpatcher.encoding import ContextLengthError, encode_prompt
from tpatcher.patcher import Patcher

from .batching import MIN_TEMPERATURE, Job, Outcome, Scheduler
from .errors import ServiceError

#: Requests decoded together by default (``tpatcher serve --max-batch``).
DEFAULT_MAX_BATCH = 8

__all__ = ["MIN_TEMPERATURE", "Generation", "Generator", "Sampling", "StreamResult"]

T = TypeVar("T")


@dataclass(frozen=True)
class Sampling:
    """How to generate: ``max_new`` tokens, temperature/top-p, and stop strings."""

    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    stops: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


@dataclass
class Generation:
    """Finished generation: text after stop handling, token counts, and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class StreamResult:
    """Filled in by :meth:`Generator.stream` when the stream ends."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _StopOnText(StoppingCriteria):
    """Stops when a stop string appears in the new text or the consumer cancels."""

    def __init__(
        self, tokenizer: Any, prompt_len: int, stops: tuple[str, ...], cancel: threading.Event
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


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a background generation's outcome as seen (it is reported elsewhere, if at all)."""
    if not future.cancelled():
        future.exception()


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _TokenText:
    """Text of a growing token list, handed out in pieces that later tokens cannot change
    (up to the last space or newline, as ``TextStreamer`` does), then the rest at the end."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters handed out

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\n"):
            end = len(text)
        elif text.endswith("\ufffd"):  # an incomplete character
            return ""
        else:
            end = text.rfind(" ") + 1
        return self._take(text, end)

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class Generator:
    """Batched completions and streams (up to ``max_batch`` at once, one scheduler thread),
    and ``compare`` on a thread pool of ``workers``."""

    def __init__(self, patcher: Patcher, workers: int, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.patcher = patcher
        self.tokenizer = patcher.tokenizer
        self.workers = workers
        self.max_batch = max_batch
        self._pool: ThreadPoolExecutor | None = None
        self._scheduler: Scheduler | None = None
        gen_eos = patcher.model.generation_config.eos_token_id
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = {int(e) for e in [*eos, self.tokenizer.eos_token_id] if e is not None}

    @property
    def batched(self) -> bool:
        """Whether completions go through the scheduler (decoder-only models)."""
        return not self.patcher.model.config.is_encoder_decoder

    @property
    def scheduler(self) -> Scheduler | None:
        return self._scheduler

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tpatcher-generate")
        if self.batched:
            model = self.patcher.model
            self._scheduler = Scheduler(model, self.tokenizer, self.eos_ids, self.max_batch)
            self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a generation thread."""
        if self._pool is None:
            raise RuntimeError("the generator is not started")
        return await asyncio.wrap_future(self._pool.submit(fn))

    # -- prompts -------------------------------------------------------------------------
    def encode(self, prompt: str, max_new: int) -> dict[str, torch.Tensor]:
        """The prompt's model inputs; 400 when it and ``max_new`` tokens exceed the context."""
        try:
            enc = encode_prompt(self.tokenizer, self.patcher.model, prompt, reserve=max_new)
        except ContextLengthError as exc:
            raise ServiceError(
                400, str(exc), "invalid_request_error", "context_length_exceeded"
            ) from exc
        return {k: v.to(self.patcher.input_device) for k, v in enc.items()}

    def _kwargs(self, enc: dict[str, torch.Tensor], sampling: Sampling) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(enc, max_new_tokens=sampling.max_new)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None
            )
        pad = self.tokenizer.pad_token_id
        kwargs["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        return kwargs

    def _reason(self, new_ids: list[int], stopped: bool, max_new: int) -> str:
        natural = bool(new_ids) and new_ids[-1] in self.eos_ids
        return "stop" if stopped or natural or len(new_ids) < max_new else "length"

    def _job(
        self, prompt: str, sampling: Sampling, emit: Callable[[int | None], None] | None = None
    ) -> Job:
        ids = self.encode(prompt, sampling.max_new)["input_ids"]
        return Job(
            ids, sampling.max_new, sampling.temperature, sampling.top_p, sampling.stops, emit
        )

    # -- blocking ------------------------------------------------------------------------
    def generate_here(self, prompt: str, sampling: Sampling) -> Generation:
        """Generate unbatched on the calling thread (a generation thread)."""
        enc = self.encode(prompt, sampling.max_new)
        n = enc["input_ids"].shape[1]
        stop = _StopOnText(self.tokenizer, n, sampling.stops, threading.Event())
        with torch.no_grad():
            out = self.patcher.model.generate(
                **self._kwargs(enc, sampling), stopping_criteria=StoppingCriteriaList([stop])
            )
        new_ids = out[0, n:].tolist()
        return self._generation(new_ids, n, False, sampling)

    def _generation(
        self, new_ids: list[int], n: int, stopped: bool, sampling: Sampling
    ) -> Generation:
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, found = cut_at_stop(text, sampling.stops)
        reason = self._reason(new_ids, stopped or found, sampling.max_new)
        return Generation(text, n, len(new_ids), reason)

    async def complete(self, prompt: str, sampling: Sampling) -> Generation:
        """The whole completion of ``prompt`` by the patched model (batched with others)."""
        if self._scheduler is None:
            return await self.run(lambda: self.generate_here(prompt, sampling))
        job = self._job(prompt, sampling)
        try:
            outcome = await asyncio.wrap_future(self._scheduler.submit(job))
        finally:
            job.cancel.set()  # a no-op when it finished; frees its row when we were cancelled
        return self._generation(outcome.new_ids, job.input_ids.shape[1], outcome.stopped, sampling)

    async def compare(self, prompt: str, max_new: int) -> tuple[str, str]:
        """Greedy completions by the patched and the base model, on one generation thread
        (the base model only for that thread: :meth:`Patcher.unpatched_here`)."""
        sampling = Sampling(max_new=max_new)

        def both() -> tuple[str, str]:
            patched = self.generate_here(prompt, sampling).text
            with self.patcher.unpatched_here():
                base = self.generate_here(prompt, sampling).text
            return patched, base

        return await self.run(both)

    # -- streaming -----------------------------------------------------------------------
    async def stream(
        self, prompt: str, sampling: Sampling, result: StreamResult
    ) -> AsyncIterator[str]:
        """Yield text pieces as they are generated, holding back what could start a stop
        string; ``result`` receives the finish reason and token counts at the end."""
        if self._scheduler is None:
            async for piece in self._stream_unbatched(prompt, sampling, result):
                yield piece
            return
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        def emit(token: int | None) -> None:  # on the scheduler thread
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody reads
                loop.call_soon_threadsafe(tokens.put_nowait, token)

        job = self._job(prompt, sampling, emit)
        future = asyncio.wrap_future(self._scheduler.submit(job))
        future.add_done_callback(_retrieve)
        try:
            stopped = False
            async for piece in self._pieces(self._texts(tokens), sampling.stops, job.cancel):
                if piece is None:
                    stopped = True
                    continue
                yield piece
            outcome: Outcome = await future
            new_ids = outcome.new_ids
            result.finish_reason = self._reason(
                new_ids, stopped or outcome.stopped, sampling.max_new
            )
            result.prompt_tokens, result.completion_tokens = job.input_ids.shape[1], len(new_ids)
        finally:
            job.cancel.set()  # the client went away or we stopped: its row is retired

    async def _texts(self, tokens: asyncio.Queue[int | None]) -> AsyncIterator[str]:
        """Text pieces of the tokens the scheduler emits, until it emits ``None``."""
        text = _TokenText(self.tokenizer)
        while (token := await tokens.get()) is not None:
            if piece := text.push(token):
                yield piece
        if rest := text.flush():
            yield rest

    async def _stream_unbatched(
        self, prompt: str, sampling: Sampling, result: StreamResult
    ) -> AsyncIterator[str]:
        """:meth:`stream` by ``generate`` on a generation thread (encoder-decoder models)."""
        enc = self.encode(prompt, sampling.max_new)
        n = enc["input_ids"].shape[1]
        cancel = threading.Event()
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        kwargs = self._kwargs(enc, sampling)
        criteria = StoppingCriteriaList([_StopOnText(self.tokenizer, n, (), cancel)])

        def run() -> torch.Tensor:
            try:
                with torch.no_grad():
                    return self.patcher.model.generate(
                        **kwargs, streamer=streamer, stopping_criteria=criteria
                    )
            finally:
                streamer.end()  # unblock the consumer even if generate raised

        future = asyncio.ensure_future(self.run(run))
        future.add_done_callback(_retrieve)  # a stream the client left still finishes
        try:
            stopped = False
            pieces = iterate_in_threadpool(iter(streamer))
            async for piece in self._pieces(pieces, sampling.stops, cancel):
                if piece is None:
                    stopped = True
                    continue
                yield piece
            out = await future
            new_ids = out[0, n:].tolist()
            result.finish_reason = self._reason(new_ids, stopped, sampling.max_new)
            result.prompt_tokens, result.completion_tokens = n, len(new_ids)
        finally:
            cancel.set()  # the client went away or we stopped: free the generation thread

    @staticmethod
    async def _pieces(
        texts: AsyncIterator[str], stops: tuple[str, ...], cancel: threading.Event
    ) -> AsyncIterator[str | None]:
        """Text safe to send (none of it could start a stop string); ``None`` once a stop
        string was found (after the text before it)."""
        hold = max((len(s) for s in stops), default=1) - 1
        buffer = ""
        async for piece in texts:
            buffer += piece
            text, stopped = cut_at_stop(buffer, stops)
            if stopped:
                cancel.set()
                if text:
                    yield text
                yield None  # generation ends at its next step (``cancel``)
                return
            safe = len(buffer) - hold
            if safe > 0:
                yield buffer[:safe]
                buffer = buffer[safe:]
        if buffer:
            yield buffer
