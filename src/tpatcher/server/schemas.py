"""Request and response bodies of the service, validated by pydantic.

Every size has a cap so that one request cannot tie up the single edit worker or the
generation threads for long. OpenAI-compatible bodies ignore fields we do not implement
(official clients send many); edit bodies forbid unknown fields, because a typo there
(``targte``) would otherwise silently train the wrong thing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .limits import MAX_TOKENS_LIMIT

#: Longest prompt (characters) accepted for generation or editing.
MAX_PROMPT_CHARS = 16_000
#: Longest edit target (characters).
MAX_TARGET_CHARS = 2_000
#: Most chat messages in one request.
MAX_MESSAGES = 64
#: Most edits in one batch request.
MAX_BATCH = 32
MAX_WORDINGS = 8
#: Most stop sequences, and the longest one (as in the OpenAI API).
MAX_STOP = 4
MAX_STOP_CHARS = 64

NonEmptyText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
EditId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _OpenAIBody(BaseModel):
    """Lenient about unknown fields (clients send them), strict about the ones we read."""

    model_config = ConfigDict(extra="ignore")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]


def _stop_list(stop: str | list[StopText] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _GenerationBody(_OpenAIBody):
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    temperature: float = Field(
        1.0, ge=0.0, le=2.0, description="below 1e-5 (0 included) the reply is greedy"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only one choice per request is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
        | Annotated[list[StopText], Field(max_length=MAX_STOP)]
        | None
    ) = None

    @property
    def stop_list(self) -> list[str]:
        return _stop_list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationBody):
    """``POST /v1/completions``: plain-text continuation of ``prompt``."""

    prompt: NonEmptyText
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    echo: bool = False


class ChatCompletionRequest(_GenerationBody):
    """``POST /v1/chat/completions``: the conversation rendered with the chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EditRequest(BaseModel):
    """One correction: ``prompt`` (or chat ``messages``) should be answered with ``target``.

    ``messages`` are rendered with the chat template and the generation prompt, so the
    target is what the assistant should reply. ``also``: other wordings (raw prompts) that
    must give the same target, trained jointly. ``wordings="auto"`` (``messages`` of one
    user turn) adds the bare question and the model's own answer up to where it states the
    answer, so the fix also reaches plain prompts and answers that restate the question.
    ``subject``: what the correction is about, as the prompt (or last message) names it;
    where the server's Patcher has ``subject_negatives`` (or ``known_subject_negatives``),
    the same wordings about other subjects are kept as they were (without it, the subject is
    guessed from the last user message or the prompt: :func:`tpatcher.guess_subject`).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: NonEmptyText | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = (
        None
    )
    target: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TARGET_CHARS)]
    also: Annotated[list[NonEmptyText], Field(max_length=MAX_WORDINGS)] = []
    wordings: Literal["given", "auto"] = "given"
    subject: NonEmptyText | None = None

    @model_validator(mode="after")
    def _one_input(self) -> EditRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.wordings == "auto" and (
            self.messages is None or [m.role for m in self.messages] != ["user"]
        ):
            raise ValueError("wordings 'auto' needs 'messages' holding one user message")
        if any(not text.strip() for text in self.also):
            raise ValueError("an 'also' wording is blank")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' is blank")
        if not self.target.strip():
            raise ValueError("'target' is blank")
        return self


class EditBatchRequest(BaseModel):
    """``POST /v1/edits:batch``: edits applied one after another, in list order."""

    model_config = ConfigDict(extra="forbid")

    edits: Annotated[list[EditRequest], Field(min_length=1, max_length=MAX_BATCH)]


class EditResponse(BaseModel):
    """What one edit did. ``id`` is null when nothing was added (already right or failed)."""

    id: str | None
    success: bool
    already_correct: bool
    steps: int
    seconds: float
    neurons: int
    message: str = ""
    losses: dict[str, float] = Field(default_factory=dict)


class EditBatchResponse(BaseModel):
    results: list[EditResponse]


class EditInfo(BaseModel):
    """A stored edit and its provenance, as in the store's manifest.

    ``acknowledged`` is false for an edit that was written durably (and is served) but whose
    response was never sent: the service stopped, or the client went away, in between.
    """

    model_config = ConfigDict(extra="allow")

    id: str
    prompt: str
    target: str | None
    created: str
    neurons: int
    steps: int
    seconds: float
    sha256: str | None = None
    acknowledged: bool = True


class EditList(BaseModel):
    object: Literal["list"] = "list"
    base_model: str
    fingerprint: str
    neurons: int
    data: list[EditInfo]


class DeletedEdit(BaseModel):
    id: str
    object: Literal["edit"] = "edit"
    deleted: bool = True


class CompareRequest(BaseModel):
    """``POST /v1/compare``: greedy completions by the patched and the unpatched model.
    ``messages``, when given, are rendered with the chat template and ``prompt`` is ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] = ""
    max_tokens: int = Field(32, ge=1, le=MAX_TOKENS_LIMIT)
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = (
        None
    )

    @model_validator(mode="after")
    def _has_input(self) -> CompareRequest:
        if self.messages is None and not self.prompt.strip():
            raise ValueError("give a non-blank 'prompt' or chat 'messages'")
        return self


class CompareResponse(BaseModel):
    patched: str
    base: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    detail: list[dict[str, Any]] | None = None
    limit: float | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, so that the ``openai`` client raises a readable error."""

    error: ErrorBody
