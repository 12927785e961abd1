"""All of the service's text generation, behind one class (:class:`Generator`).

Generation runs in a small thread pool, never on the event loop. The patched model is a
plain HF model whose published neurons are an immutable state that an edit swaps in whole,
so a forward pass sees a new edit all or nothing. A batched implementation can replace
:class:`Generator` as long as it keeps :meth:`~Generator.complete`,
:meth:`~Generator.stream` and :meth:`~Generator.compare`.

Prompts are tokenised by :func:`tpatcher.encoding.encode_prompt` (which also refuses a
prompt that does not fit the context), exactly as edits are.
"""

from __future__ import annotations

import asyncio
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

from .errors import ServiceError

#: Temperatures below this cannot be sampled meaningfully (logits / T overflows): greedy.
MIN_TEMPERATURE = 1e-5

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


class Generator:
    """Blocking, streaming and side-by-side generation on a thread pool of ``workers``."""

    def __init__(self, patcher: Patcher, workers: int) -> None:
        self.patcher = patcher
        self.tokenizer = patcher.tokenizer
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        gen_eos = patcher.model.generation_config.eos_token_id
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = {int(e) for e in [*eos, self.tokenizer.eos_token_id] if e is not None}

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tpatcher-generate")

    def stop(self) -> None:
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

    # -- blocking ------------------------------------------------------------------------
    def generate_here(self, prompt: str, sampling: Sampling) -> Generation:
        """Generate on the calling thread (a generation thread)."""
        enc = self.encode(prompt, sampling.max_new)
        n = enc["input_ids"].shape[1]
        stop = _StopOnText(self.tokenizer, n, sampling.stops, threading.Event())
        with torch.no_grad():
            out = self.patcher.model.generate(
                **self._kwargs(enc, sampling), stopping_criteria=StoppingCriteriaList([stop])
            )
        new_ids = out[0, n:].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, sampling.stops)
        return Generation(text, n, len(new_ids), self._reason(new_ids, stopped, sampling.max_new))

    async def complete(self, prompt: str, sampling: Sampling) -> Generation:
        """The whole completion of ``prompt`` by the patched model."""
        return await self.run(lambda: self.generate_here(prompt, sampling))

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
            async for piece in self._pieces(streamer, sampling.stops, cancel):
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
        streamer: TextIteratorStreamer, stops: tuple[str, ...], cancel: threading.Event
    ) -> AsyncIterator[str | None]:
        """Text safe to send (none of it could start a stop string); ``None`` once a stop
        string was found (after the text before it)."""
        hold = max((len(s) for s in stops), default=1) - 1
        buffer = ""
        async for piece in iterate_in_threadpool(iter(streamer)):
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
