"""OpenAI-compatible routes mapped onto dreamcore's native API (no Ray here; unit-tested alone).

Two routes speak OpenAI's wire format so the official `openai` client (and anything built on it)
can call a dreamcore endpoint unchanged: `POST /v1/chat/completions` and `POST
/v1/images/generations`. Neither has its own generation logic. A chat request becomes the native
/v1/generate request (`GenerateRequest`) and goes through `check_generate`, so the server's limits
and image decoding are the native ones. An image request becomes `ImagesRequest` + `check_images`.
The Ingress then drives the same `dreamcore.generate.Document` loop over the same deployments.

A DreamLLM checkpoint of stage I or II continues documents; it has no chat template. The
messages' text and image parts then become the document prompt in order, with no role markers. A
checkpoint trained on conversations (stage SFT, DreamLLM's III) is prompted with the chat template it was
trained with (`ModelConfig.chat_template`, dreamcore.chat), laid out exactly as in training and
ending at the assistant's marker. Either way images in assistant messages are ones the model drew
earlier, so they are laid out as drawn images (dream block, then comprehension block), as in
training and in `Document`.

`ChatCompletionBuilder` turns a document's output (text deltas of any length and images) into
OpenAI's `chat.completion` or `chat.completion.chunk` objects. It applies `stop` sequences, holding
back text that could still become one. Per-segment text (now) and per-token text (later) feed it
the same way.

Errors on these routes use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`), and a
422 or 413 becomes a 400, as OpenAI answers. See docs/serving.md for the field tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreamcore.chat import EndOfTurn, chat_segments
from dreamcore.engine import DocPart, Drawn
from dreamcore.generate import GenerationParams
from pipelines.serve.api import (
    GenerateRequest,
    ImagePart,
    ImagesRequest,
    RequestError,
    SamplingFields,
    TextPart,
    check_generate,
    check_images,
    error_body,
)
from pipelines.serve.config import DefaultsConfig, LimitsConfig

CHAT_PATH = "/v1/chat/completions"
IMAGES_PATH = "/v1/images/generations"
MAX_STOP = 4  # OpenAI's limit on `stop` sequences
DATA_URL_PREFIX = "data:image/png;base64,"


def is_openai_path(path: str) -> bool:
    """True for the OpenAI-compatible routes, whose errors take OpenAI's shape (any route prefix)."""
    return path.rstrip("/").endswith((CHAT_PATH, IMAGES_PATH))


# ----------------------------------------------------------------------------------------------
# Errors


def from_request_error(err: RequestError, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """A native refusal as (status, OpenAI error body); `param` is the field it names.

    OpenAI answers 400 where the native routes say 422 (invalid) or 413 (too large); a prompt
    over the limits gets OpenAI's `context_length_exceeded` code, which clients look for.
    """
    param = err.param
    status, code = err.status, None
    if status in (413, 422):
        status = 400
        if err.status == 413:
            code = "context_length_exceeded" if param in ("messages", "prompt") else "request_too_large"
    elif status == 404 and param == "model":
        code = "model_not_found"
    return status, error_body(str(err) if param else err.message, status, param, code, request_id)


# ----------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    # An unsupported OpenAI parameter is a 400, not ignored; types are strict, as in the native API.
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: str = Field(description="data:image/png;base64,... or data:image/jpeg;base64,... (URLs are not fetched)")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted and ignored")


class ChatTextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[ChatTextPart | ChatImagePart, Field(discriminator="type")]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[ChatTextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]
ROLE_OF = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="a last chunk with `usage` and no choices")


class ChatCompletionRequest(SamplingFields):
    """OpenAI's chat completion request, the subset dreamcore can honour (anything else is a 400).

    `seed` is OpenAI's; `num_inference_steps`, `guidance_scale` (from SamplingFields) and
    `max_images` are dreamcore's, sent by the `openai` client with `extra_body={...}`.
    """

    model: str = Field(description="the served model's id (GET /v1/models)")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated OpenAI name of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="sampled tokens over the whole answer")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="only 1 is supported")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings; the answer ends before one")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    max_images: int | None = Field(None, ge=0, description="images the model may draw (extra_body)")


class ImageGenerationRequest(SamplingFields):
    """OpenAI's image generation request: text to image through the dream conditions.

    `seed`, `num_inference_steps` and `guidance_scale` are dreamcore's (`extra_body={...}`).
    """

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, description="images, each with seed + i")
    size: str | None = Field(None, description='"auto" or the model\'s resolution, e.g. "16x16"')
    response_format: Literal["b64_json", "url"] | None = Field(None, description='only "b64_json"')
    output_format: Literal["png"] | None = None
    user: str | None = Field(None, description="accepted and ignored")


# ----------------------------------------------------------------------------------------------
# Checked requests


def _check_model(model: str | None, model_id: str) -> None:
    if model is not None and model != model_id:
        raise RequestError("model", f"the model {model!r} does not exist here; this server serves {model_id!r}",
                           404)


@dataclass
class ChatPlan:
    """A checked chat request: the document prompt, its sampling, and how to answer."""

    prompt: list[DocPart]
    params: GenerationParams
    stop: list[str]
    include_usage: bool
    fields: dict[str, str] = field(default_factory=dict)  # native field -> OpenAI parameter path

    def rename(self, err: RequestError) -> RequestError:
        """A native refusal (e.g. the engine's "input" too long) named by the OpenAI parameter."""
        if err.field not in self.fields:
            return err  # keeps its type and headers (a 503's Retry-After)
        return RequestError(self.fields[err.field], err.message, err.status)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise RequestError("stop", f"has {len(stops)} sequences; at most {MAX_STOP} are supported")
    if any(s == "" for s in stops):
        raise RequestError("stop", "an empty stop sequence would stop before any text; remove it")
    return stops


def chat_to_generate(req: ChatCompletionRequest) -> tuple[GenerateRequest, list[str], dict[str, str]]:
    """The native /v1/generate request a chat maps onto.

    Returns (request, roles, fields): `roles[i]` is the role ("system", "user", "assistant") of the
    message input part i comes from (an image in an assistant message is one the model drew), and
    `fields` renames native fields to OpenAI parameters.
    """
    if req.n != 1:
        raise RequestError("n", f"{req.n} choices asked; this server answers n=1 only (send n separate requests)")
    parts: list[TextPart | ImagePart] = []
    roles: list[str] = []
    tokens = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    fields = {"input": "messages", "max_new_tokens": tokens}
    for m, msg in enumerate(req.messages):
        content = [ChatTextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        for k, part in enumerate(content or []):
            if isinstance(part, ChatTextPart):
                parts.append(TextPart(text=part.text))
                roles.append(ROLE_OF[msg.role])
                continue
            where = f"messages[{m}].content[{k}].image_url.url"
            if not part.image_url.url.startswith("data:"):
                raise RequestError(where, "only data: URLs are accepted (data:image/png;base64,...); "
                                          "this server does not fetch images from the network")
            fields[f"input[{len(parts)}].image"] = where
            parts.append(ImagePart(image=part.image_url.url))
            roles.append(ROLE_OF[msg.role])
    if not parts:
        raise RequestError("messages", "have no content; send at least one text or image part")
    native = GenerateRequest(
        input=parts, max_new_tokens=req.max_completion_tokens or req.max_tokens, max_images=req.max_images,
        temperature=req.temperature, top_p=req.top_p, seed=req.seed,
        num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
    )
    return native, roles, fields


def chat_template_of(model_config: dict[str, Any]) -> str | None:
    """The chat template a served checkpoint was trained with (its config.json "model"): an SFT
    checkpoint's, else None (stages I and II continue documents)."""
    return model_config.get("chat_template", "vicuna_v1") if model_config.get("stage") == "SFT" else None


def chat_prompt(parts: list[Any], roles: list[str], template: str | None) -> list[Any]:
    """Checked input parts -> the document prompt. Without a template (a model that continues
    documents) the parts in order, assistant images as drawn ones; with one (a model trained on
    conversations, stage SFT) the conversation laid out by it, as in training (dreamcore.chat),
    ending where the assistant answers."""
    if template is None:
        return [Drawn(p) if r == "assistant" and not isinstance(p, str) else p for p, r in zip(parts, roles)]
    turns = [(r, p if isinstance(p, str) else i) for i, (p, r) in enumerate(zip(parts, roles))]
    out: list[Any] = []
    for seg in chat_segments(template, turns, generation_prompt=True):
        if seg.kind == "eos":
            out.append(EndOfTurn())
        elif isinstance(seg.value, str):
            out.append(seg.value)
        else:
            out.append(Drawn(parts[seg.value]) if seg.kind == "draw" else parts[seg.value])
    return out


def check_chat(
    req: ChatCompletionRequest, model_id: str, limits: LimitsConfig, defaults: DefaultsConfig,
    model_steps: int, model_guidance: float, seed: int, chat_template: str | None = None,
) -> ChatPlan:
    """Validate a chat request against the served model and the limits: a ChatPlan or RequestError.
    `chat_template`: the served model's template when it was trained on conversations, else None."""
    _check_model(req.model, model_id)
    stop = _stop_list(req.stop)
    native, roles, fields = chat_to_generate(req)
    plan = ChatPlan([], GenerationParams(), stop, bool(req.stream_options and req.stream_options.include_usage),
                    fields)
    try:
        parts, plan.params = check_generate(native, limits, defaults, model_steps, model_guidance, seed)
    except RequestError as e:
        raise plan.rename(e) from None
    plan.prompt = chat_prompt(parts, roles, chat_template)
    return plan


def check_image_generation(
    req: ImageGenerationRequest, model_id: str, resolution: int, limits: LimitsConfig,
    defaults: DefaultsConfig, model_steps: int, model_guidance: float, seed: int,
) -> tuple[str, int, dict[str, Any]]:
    """Validate an image generation: (prompt, n, {seed, num_inference_steps, guidance_scale})."""
    _check_model(req.model, model_id)
    size = f"{resolution}x{resolution}"
    if req.size not in (None, "auto", size):
        raise RequestError("size", f"{req.size!r} is not available; this model draws {size} only (or send \"auto\")")
    if req.response_format == "url":
        raise RequestError("response_format", 'this server stores no images, so it cannot answer with URLs; '
                                              'use "b64_json"')
    native = ImagesRequest(prompt=req.prompt, n=req.n, seed=req.seed,
                           num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale)
    return check_images(native, limits, defaults, model_steps, model_guidance, seed)


# ----------------------------------------------------------------------------------------------
# Responses


def image_url_part(b64_png: str) -> dict[str, Any]:
    """An image of the answer as an OpenAI content part (a data URL; the server stores nothing)."""
    return {"type": "image_url", "image_url": {"url": DATA_URL_PREFIX + b64_png}}


def images_response(created: int, b64_pngs: list[str], size: str) -> dict[str, Any]:
    return {"created": created, "data": [{"b64_json": b} for b in b64_pngs], "output_format": "png",
            "size": size}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class StopMatcher:
    """Cuts text at the first stop sequence, across deltas of any length (per token too).

    `feed` returns the text that is safe to emit: a tail that might be the start of a stop sequence
    is held back until the next delta settles it (`flush` releases it at an image or the end).
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[:min(hits)]
        hold = max((n for s in self.stops for n in range(1, len(s)) if buf.endswith(s[:n])), default=0)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ChatCompletionBuilder:
    """One chat answer from document output: deltas for streaming, or the whole completion.

    Feed text (any length) and images in document order; each call returns the delta to stream
    (None when there is nothing to send yet). `content` accumulates the same parts for the
    non-streamed answer: text parts merged, images as `image_url` parts.

    Streamed deltas (docs/serving.md): text as `{"content": "..."}` like any OpenAI stream, so
    text-only clients work unchanged; an image as `{"images": [image_url part]}` (the content
    part the non-streamed answer holds at that point). Concatenating the text and placing the
    images where their chunks came gives back the non-streamed `content`.
    """

    def __init__(self, rid: str, created: int, model: str, stop: list[str] | None = None) -> None:
        self.rid, self.created, self.model = rid, created, model
        self.stop = StopMatcher(stop or [])
        self.content: list[dict[str, Any]] = []

    @property
    def stopped(self) -> bool:
        """A stop sequence was met: drive no further (no more text, no more images)."""
        return self.stop.stopped

    def _text(self, text: str) -> dict[str, Any] | None:
        if not text:
            return None
        if self.content and self.content[-1]["type"] == "text":
            self.content[-1]["text"] += text
        else:
            self.content.append({"type": "text", "text": text})
        return {"content": text}

    def add_text(self, text: str) -> dict[str, Any] | None:
        return self._text(self.stop.feed(text))

    def add_image(self, b64_png: str) -> list[dict[str, Any]]:
        """Deltas for an image: any held-back text first, then the image."""
        if self.stopped:
            return []
        held = self._text(self.stop.flush())
        part = image_url_part(b64_png)
        self.content.append(part)
        return [d for d in (held, {"images": [part]}) if d]

    def finish(self) -> dict[str, Any] | None:
        """The held-back text at the end of the answer (no stop sequence completed)."""
        return self._text(self.stop.flush())

    def finish_reason(self, doc_reason: str | None) -> str:
        """OpenAI's finish_reason: "stop" at EOS or a stop sequence, "length" at the token budget."""
        return "stop" if self.stopped or doc_reason != "length" else "length"

    def completion(self, doc_reason: str | None, use: dict[str, int]) -> dict[str, Any]:
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.content},
                             "finish_reason": self.finish_reason(doc_reason), "logprobs": None}],
                "usage": use}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": use}


# Response models: the OpenAPI schema of the routes (what /docs shows) and a check on what they send.


class _OutImageURL(BaseModel):
    url: str


class OutTextPart(BaseModel):
    type: Literal["text"]
    text: str


class OutImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: _OutImageURL


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: list[Annotated[OutTextPart | OutImagePart, Field(discriminator="type")]]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponseOut(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png"]
    size: str


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event as OpenAI streams send them: a `data:` line of JSON, no event name."""
    return f"data: {json.dumps(obj)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"  # the end of an OpenAI stream
