"""The OpenAI chat-completions wire format: request schema and checks, errors, responses, streamed text.

Framework-free (pydantic only; no Ray, FastAPI or torch), so every rule here is
unit-tested without a server. `actors.serving` calls, in order:

    parse_chat_request(body, limits, model)   bytes -> ChatRequest, or OpenAIError (4xx)
    ChatRequest.template_messages()           messages for the processor's chat template + image URLs
    TextStream.push(tokens)                   per decoding round: token ids -> text delta (stop strings, max_tokens)
    completion() / chunk() / usage()          response bodies

Every client mistake raises `OpenAIError`, whose `body()` is OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .serve_config import ServeLimits

FinishReason = Literal["stop", "length"]
# Below this temperature a request is decoded greedily: logits / 1e-300 overflow to inf and give NaN
# probabilities, and at 1e-5 the sampling distribution is already the argmax unless the top two logits differ
# by less than ~1e-3 (exp(-1e-3 / 1e-5) = e^-100); documented in docs/serve.md.
MIN_TEMPERATURE = 1e-5


class OpenAIError(Exception):
    """A request the server refuses; ``body()`` is OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,  # response headers, e.g. Retry-After of a 429
    ):
        super().__init__(status, message, type, param, code)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str) -> dict:
    """OpenAI error object for a status the server itself produced (404 route, 405 method, 500)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return OpenAIError(status, message, kind, None, code).body()


# --------------------------------------------------------------------------- request schema
class _Lenient(BaseModel):
    """Unknown fields are ignored (clients send extras such as ``name``); known ones are checked."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v  # {"image_url": "data:..."} as some clients send


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    """``POST /v1/chat/completions``. Features the engine does not have are refused, not ignored."""

    model: str | None = Field(None, description="must equal the served model name when given")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="OpenAI's default 1.0; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension (vLLM's): 0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    # refused when set to anything that would change the output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    def sampling_temperature(self) -> float:
        """The temperature the engine gets: ``temperature``, or 0 (greedy) below `MIN_TEMPERATURE`."""
        return 0.0 if self.temperature < MIN_TEMPERATURE else self.temperature

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def text_chars(self) -> int:
        """Characters of text in the messages and stop strings: what the template and tokenizer will read."""
        n = sum(len(s) for s in self.stops)
        for m in self.messages:
            if isinstance(m.content, str):
                n += len(m.content)
            elif m.content:
                n += sum(len(p.text) for p in m.content if isinstance(p, TextPart))
        return n

    def image_urls(self) -> list[tuple[str, str]]:
        """``(param, url)`` of every image part in message order; param names it for errors."""
        out = []
        for i, m in enumerate(self.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                if isinstance(part, ImagePart):
                    out.append((f"messages.{i}.content.{j}.image_url", part.image_url.url))
        return out

    def template_messages(self) -> list[dict]:
        """Messages in the HF chat-template form: image parts become ``{"type": "image"}`` placeholders."""
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, list):
                parts = [
                    {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                    for p in m.content
                ]
                out.append({"role": role, "content": parts})
            else:
                out.append({"role": role, "content": m.content or ""})
        return out


def parse_chat_request(body: bytes, limits: ServeLimits, served_model: str) -> ChatRequest:
    """Validate one request body; raises `OpenAIError` (400, 404 or 413) naming the problem."""
    if len(body) > limits.max_body_bytes:
        raise OpenAIError(
            413, f"request body is {len(body)} bytes > max_body_bytes={limits.max_body_bytes}", code="request_too_large"
        )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # the parser recurses per level: ~1000 levels of [ or { exhaust Python's stack
        raise OpenAIError(400, "request body is nested too deeply to parse", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except RecursionError:  # (pydantic-core has its own guard; this keeps it a 400 whatever the version)
        raise OpenAIError(400, "request body is nested too deeply", code="invalid_value") from None
    except ValidationError as e:
        errs = e.errors(include_url=False)
        msgs = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in errs[:5]]
        param = ".".join(str(p) for p in errs[0]["loc"]) or None
        raise OpenAIError(400, "invalid request: " + "; ".join(msgs), param=param, code="invalid_value") from None
    if req.model is not None and req.model != served_model:
        raise OpenAIError(
            404, f"The model `{req.model}` does not exist; this server serves `{served_model}`",
            param="model", code="model_not_found",
        )  # fmt: skip
    _check_supported(req)
    _check_limits(req, limits)
    return req


def _unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {what} is not supported by this server", param=param, code="unsupported")


def _check_supported(req: ChatRequest) -> None:
    if req.n != 1:
        raise _unsupported("n", "more than one choice")
    if req.presence_penalty or req.frequency_penalty:
        raise _unsupported("presence_penalty" if req.presence_penalty else "frequency_penalty", "a penalty")
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit bias")
    if req.logprobs:
        raise _unsupported("logprobs", "returning logprobs")
    if req.tools:
        raise _unsupported("tools", "tool calling")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", "structured output")


def _check_limits(req: ChatRequest, limits: ServeLimits) -> None:
    n_images = len(req.image_urls())
    if n_images > limits.max_images:
        raise OpenAIError(400, f"{n_images} images > max_images={limits.max_images}", "invalid_request_error",
                          "messages", "too_many_images")  # fmt: skip
    m = req.requested_max_tokens()
    if m is not None and m > limits.max_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise OpenAIError(400, f"{param}={m} > the server's limit {limits.max_tokens}", param=param,
                          code="max_tokens_too_large")  # fmt: skip
    if len(req.stops) > limits.max_stop:
        raise OpenAIError(400, f"{len(req.stops)} stop strings > max_stop={limits.max_stop}", param="stop")
    chars = req.text_chars()
    if chars > limits.max_prompt_chars:  # before the chat template and tokenizer, which cost far more per char
        raise OpenAIError(400, f"the messages hold {chars} characters of text > max_prompt_chars="
                          f"{limits.max_prompt_chars}", param="messages", code="context_length_exceeded")  # fmt: skip


def completion_tokens_budget(req: ChatRequest, prompt_tokens: int, limits: ServeLimits, context: int) -> int:
    """max_tokens for this request: the one asked for, else the default; raises if the context is exceeded."""
    if prompt_tokens > limits.max_prompt_tokens:
        raise OpenAIError(400, f"prompt is {prompt_tokens} tokens > max_prompt_tokens={limits.max_prompt_tokens}",
                          param="messages", code="context_length_exceeded")  # fmt: skip
    room = context - prompt_tokens
    asked = req.requested_max_tokens()
    if asked is None:
        if room < 1:
            raise OpenAIError(400, f"prompt is {prompt_tokens} tokens; the model's context is {context}",
                              param="messages", code="context_length_exceeded")  # fmt: skip
        return min(limits.default_max_tokens, room)
    if asked > room:
        raise OpenAIError(
            400, f"This model's maximum context length is {context} tokens; the prompt is {prompt_tokens} tokens "
            f"and max_tokens is {asked}: lower max_tokens or the prompt", param="max_tokens",
            code="context_length_exceeded",
        )  # fmt: skip
    return asked


# --------------------------------------------------------------------------- streamed text
class TextStream:
    """One completion's text, built incrementally from token ids as decoding rounds accept them.

    `push` returns the new text since the last call: the decoded text of all
    tokens so far minus what was already handed out, holding back a trailing
    partial UTF-8 character (``"\\ufffd"``) and any tail that could begin a stop
    string. The row finishes at EOS or a stop string (``"stop"``; the stop
    string and everything after it are cut) or at ``max_tokens`` (``"length"``).
    Streaming and non-streaming responses both concatenate these deltas, so
    their texts are equal by construction.
    """

    def __init__(self, decode: Callable[[list[int]], str], eos_ids: Iterable[int], max_tokens: int, stop=()):
        assert max_tokens >= 1
        self.decode, self.eos, self.max_tokens, self.stop = decode, set(eos_ids), max_tokens, list(stop)
        self.tokens: list[int] = []
        self.sent = ""
        self.finish_reason: FinishReason | None = None

    def push(self, new_tokens: list[int], engine_finished: bool = False) -> str:
        """Add one round's tokens; returns the text delta (maybe empty). Sets `finish_reason` when done."""
        assert self.finish_reason is None, "push after finish"
        start = len(self.tokens)
        self.tokens.extend(new_tokens)
        reason: FinishReason | None = None
        for i in range(start, len(self.tokens)):
            if self.tokens[i] in self.eos or i + 1 >= self.max_tokens:
                reason = "stop" if self.tokens[i] in self.eos else "length"
                del self.tokens[i + 1 :]
                break
        if reason is None and engine_finished:
            reason = "length"  # the engine's own max_new_tokens
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[: max(cut, len(self.sent))], "stop"
        if reason is None:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._stop_prefix(text)]
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""  # a rewritten prefix stays as sent
        self.sent += delta
        self.finish_reason = reason
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


# --------------------------------------------------------------------------- responses
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, stats: dict | None) -> dict:
    """OpenAI usage plus the engine's accept length (tokens per target forward), target forwards, the draft that
    decoded the request (``draft_version``, with a draft) and, in ``specvlm`` mode, the compressor the gate chose
    and the visual tokens the draft read for this request."""
    stats = stats or {}
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "accept_length": round(float(stats.get("accept_length", 1.0)), 4),
        "target_forwards": int(stats.get("target_forwards", 0)),
    }
    if stats.get("compressor", "none") != "none":
        out["compressor"] = stats["compressor"]
        out["draft_visual_tokens"] = int(stats.get("draft_visual_tokens", 0))
    if stats.get("draft_version") is not None:
        out["draft_version"] = stats["draft_version"]
    return out


def completion(rid: str, created: int, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": use,
    }


def chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, created: int, model: str, use: dict) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": use}  # fmt: skip


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "specvlm"}]}
