"""The HTTP API's request and response models (pydantic): news analysis, classification, OpenAI chat."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from newsray.tasks.agnews import LABELS
from newsray.tasks.news import NewsAnswer

Label = Literal["World", "Sports", "Business", "Sci/Tech"]
assert tuple(Label.__args__) == LABELS  # one label set: the task's
ModelId = Annotated[StrictStr, Field(min_length=1, max_length=256)]
Budget = Annotated[StrictInt, Field(ge=1)]


def _not_blank(value: str, name: str) -> str:
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelId | None = Field(None, description="Model id from GET /v1/models; None = the default model.")
    max_new_tokens: Budget | None = Field(None, description="Generation budget; None = serve.max_new_tokens (the most allowed).")


class AnalyzeRequest(_Request):
    """POST /v1/analyze: one newsletter item."""

    title: StrictStr = Field(description="The item's title (non-empty).")
    content: StrictStr = Field(description="The item's text (non-empty; at most serve.max_content_chars characters).")

    @field_validator("title", "content")
    @classmethod
    def _required(cls, v: str, info: Any) -> str:
        return _not_blank(v, info.field_name)


class ClassifyRequest(_Request):
    """POST /v1/classify: one AG News item (title and/or content)."""

    title: StrictStr = Field("", description="The headline.")
    content: StrictStr = Field("", description="The description (at most serve.max_content_chars characters).")

    @model_validator(mode="after")
    def _some_text(self) -> "ClassifyRequest":
        if not (self.title.strip() or self.content.strip()):
            raise ValueError("title and content must not both be empty")
        return self


class _Timed(BaseModel):
    model: str = Field(description="Id of the model that answered.")
    model_ref: str = Field(description="What that id resolved to when the app was deployed: models:/<name>/<version> for a registry alias "
                           "(pinned: every replica serves this version until the app is redeployed), else the adapter directory, runs:/ URI or baseline.")
    latency_ms: float = Field(description="Time spent in the server, including queueing and batching.")
    finish_reason: Literal["stop", "length"] = Field(description="stop: the answer ended itself; length: the budget ran out.")
    constrained: bool = Field(description="Whether the returned answer came from constrained decoding.")


class AnalyzeResponse(NewsAnswer, _Timed):
    """The task's JSON answer (validated against NewsAnswer) plus the model id and latency."""


class ClassifyResponse(_Timed):
    """The topic label plus the model id and latency."""

    label: Label


class ErrorBody(BaseModel):
    type: str = Field(description="Machine-readable kind, e.g. invalid_request, unauthorized, invalid_model_output.")
    message: str = Field(description="One sentence saying what went wrong and what to do.")
    raw_text: str | None = Field(None, description="invalid_model_output only: what the model generated.")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: {"error": {...}} (the OpenAI error shape)."""

    error: ErrorBody


# ------------------------------------------------------------------ OpenAI-compatible chat


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions (OpenAI shape; greedy decoding: sampling parameters are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: ModelId
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: Budget | None = None
    max_completion_tokens: Budget | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    n: Literal[1] = 1
    stream: StrictBool = False
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _checks(self) -> "ChatCompletionRequest":
        if self.stream:
            raise ValueError("stream=true is not supported: send stream=false (or omit it)")
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        for i, m in enumerate(self.messages):
            if not m.text().strip():
                raise ValueError(f"messages[{i}].content must not be empty")
        return self

    def budget(self) -> int | None:
        """The requested completion budget (max_completion_tokens wins over the legacy max_tokens)."""
        return self.max_completion_tokens or self.max_tokens

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = Field(None, description="The model reference the id resolved to at deploy time (as model_ref of /v1/analyze).")
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "newsray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
