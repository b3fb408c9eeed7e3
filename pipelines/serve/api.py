"""The HTTP contract of the dreamcore endpoint: request/response models and request validation.

Pydantic checks shapes and types (unknown fields are refused); `check_generate` / `check_images`
then apply the server's limits (`LimitsConfig`) and decode input images, so every refusal is a
`RequestError` that names the field ("input[1].image") and says what would be accepted. A checked
/v1/generate request becomes `dreamcore.generate.GenerationParams`, the settings the in-process
`generate_document` takes too. Nothing here imports Ray.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dreamcore.generate import GenerationParams
from pipelines.serve.config import DefaultsConfig, LimitsConfig


class RequestError(Exception):
    """A request the server will not run; `field` names the offending input, `status` the 4xx."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(field, message, status)  # all args, so it survives pickling between replicas
        self.field = field
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    @property
    def param(self) -> str | None:
        """The request field at fault (None when the fault is not the request's: the server, the key)."""
        return None if self.field in ("server", "Authorization") else self.field

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        return error_body(str(self) if self.param else self.message, self.status, self.param,
                          request_id=request_id)


# HTTP status -> (error type, default code): OpenAI's error vocabulary, which every route answers in.
_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "overloaded"),
    504: ("server_error", "timeout"),
}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None,
               request_id: str | None = None) -> dict[str, Any]:
    """The one error body of every route and status: OpenAI's `{"error": {message, type, param,
    code}}`, plus the `request_id` under which the server logged the request."""
    type_, default_code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    err: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code or default_code}
    if request_id:
        err["request_id"] = request_id
    return {"error": err}


# Discriminator tags of the request unions: pydantic puts them in an error's path after a list index.
_TAGS = {"text", "image", "system", "developer", "user", "assistant", "image_url"}


def validation_error(errors: list[dict[str, Any]], status: int = 422, request_id: str | None = None
                     ) -> dict[str, Any]:
    """FastAPI/pydantic errors -> the error body naming the most specific problem by its field path."""
    if not errors:
        errors = [{"loc": ("body",), "msg": "invalid request", "type": "value_error"}]
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # unions report one error per member
    kind = first.get("type", "")
    msg = first.get("msg", "invalid value")
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    path, prev_index = "", False
    for i, x in enumerate(first.get("loc", ())):
        x = str(x)
        if (i == 0 and x == "body") or "[" in x or x == "str" or (prev_index and x in _TAGS):
            prev_index = False  # the request root, union member labels, a discriminator tag
            continue
        prev_index = x.isdigit()
        path += f"[{x}]" if prev_index else (f".{x}" if path else x)
    if kind == "extra_forbidden":
        msg, code = "unrecognized request argument; this server does not support it (see /docs)", "unknown_parameter"
    elif kind == "missing":
        msg, code = "missing required parameter", "missing_required_parameter"
    elif kind == "json_invalid":  # its path is the character position, not a field
        where = first.get("loc", ("body", "?"))[-1]
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        msg, code, path = f"is not valid JSON ({reason} at character {where})", "invalid_json", ""
    if path.startswith("["):
        path = "body" + path  # the body itself is a list
    where = path or "body"
    return error_body(f"{where}: {msg}", status, path or None, code, request_id)


# ----------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    # A misspelled field is an error, not ignored; and types are strict: "2" is not an int, "yes"
    # is not a boolean (a client that sends them has a bug worth hearing about).
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class ImagePart(_Strict):
    type: Literal["image"] = "image"
    image: str = Field(description="base64 PNG or JPEG (a data: URL prefix is accepted)")


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SamplingFields(_Strict):
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="same seed, same document")
    guidance_scale: float | None = Field(None, ge=1.0, description="classifier-free guidance scale")
    num_inference_steps: int | None = Field(None, ge=1, description="denoising steps per image")


class GenerateRequest(SamplingFields):
    """An interleaved prompt (a string, or text and image parts in order) to continue."""

    input: str | list[Part]
    max_new_tokens: int | None = Field(None, ge=1)
    max_images: int | None = Field(None, ge=0, description="images the model may create")
    temperature: float | None = Field(None, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = Field(False, description="server-sent events, one per part as it is made")


class ImagesRequest(SamplingFields):
    """Text to image only: the prompt's dream conditions straight into the decoder."""

    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1, description="images, each with seed + i")


# ----------------------------------------------------------------------------------------------
# Responses


class OutTextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class OutImagePart(BaseModel):
    type: Literal["image"] = "image"
    image: str = Field(description="base64 PNG")
    seed: int
    width: int
    height: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    images: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    parts: list[OutTextPart | OutImagePart]
    finish_reason: Literal["eos", "length"]
    usage: Usage


class ImagesResponse(BaseModel):
    id: str
    model: str
    images: list[OutImagePart]


class ModelCard(BaseModel):
    """OpenAI's model object (`client.models.list()` reads it) plus the checkpoint's `config`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the checkpoint was written")
    owned_by: str = "dreamcore"
    config: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------------------------
# Checked requests: what the deployments receive


IMAGE_FORMATS = ("PNG", "JPEG")  # what the docs promise and the model's image pipeline is tested on


def check_text(text: str, field: str) -> str:
    """`text` if it can be encoded (JSON lets a lone surrogate like "\\ud800" through; the tokenizer cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(field, f"has an unpaired surrogate at character {e.start}; send valid Unicode text") from None
    return text


def decode_image(data: str, field: str, limits: LimitsConfig) -> bytes:
    """base64 -> PNG/JPEG bytes that PIL can read, within the byte and pixel caps; else RequestError."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    # Compare the encoded length first so a huge body is refused without decoding it.
    if len(data) > (limits.max_image_bytes * 4) // 3 + 4:
        raise RequestError(field, f"image is larger than {limits.max_image_bytes} bytes", 413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64 (send the image file's bytes base64-encoded)") from None
    if len(raw) > limits.max_image_bytes:
        raise RequestError(field, f"image is larger than {limits.max_image_bytes} bytes", 413)
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as im:  # reads the header only
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise RequestError(
                    field, f"image is {w}x{h}, more than {limits.max_image_pixels} pixels", 413
                )
            im.load()  # a truncated or corrupt file fails here, not in the model replica
    except RequestError:
        raise
    except Image.DecompressionBombError:  # PIL's own cap, when it is below ours
        raise RequestError(field, f"image has more than {limits.max_image_pixels} pixels", 413) from None
    except Image.UnidentifiedImageError:
        raise RequestError(field, f"is not a {' or '.join(IMAGE_FORMATS)} image (other formats are not accepted)") from None
    except Exception as e:  # PIL raises many types for undecodable data
        raise RequestError(field, f"is not a decodable image ({type(e).__name__}: {e})") from None
    return raw


def _sampling(req: SamplingFields, limits: LimitsConfig, defaults: DefaultsConfig,
              model_steps: int, model_guidance: float, seed: int) -> dict[str, Any]:
    steps = req.num_inference_steps or defaults.num_inference_steps or model_steps
    if steps > limits.max_inference_steps:
        raise RequestError("num_inference_steps", f"{steps} is more than the limit {limits.max_inference_steps}")
    guidance = req.guidance_scale or defaults.guidance_scale or model_guidance
    if guidance > limits.max_guidance_scale:
        raise RequestError("guidance_scale", f"{guidance} is more than the limit {limits.max_guidance_scale}")
    return {"seed": req.seed if req.seed is not None else seed, "num_inference_steps": steps,
            "guidance_scale": float(guidance)}


def check_generate(
    req: GenerateRequest, limits: LimitsConfig, defaults: DefaultsConfig, model_steps: int,
    model_guidance: float, seed: int,
) -> tuple[list[str | bytes], GenerationParams]:
    """Validate a /v1/generate request against the limits: (prompt parts, sampling) or RequestError.

    Prompt parts are text (`str`) and image file bytes (`bytes`), in the request's order.
    """
    parts_in = [TextPart(text=req.input)] if isinstance(req.input, str) else req.input
    if not parts_in:
        raise RequestError("input", "is empty; send a string or at least one text or image part")
    n_images = sum(isinstance(p, ImagePart) for p in parts_in)
    if n_images > limits.max_input_images:
        raise RequestError("input", f"has {n_images} images, more than the limit {limits.max_input_images}")
    chars = sum(len(p.text) for p in parts_in if isinstance(p, TextPart))
    if chars > limits.max_prompt_chars:
        raise RequestError("input", f"text is {chars} characters, more than the limit {limits.max_prompt_chars}", 413)
    parts: list[str | bytes] = []
    for i, p in enumerate(parts_in):
        where = "input" if isinstance(req.input, str) else f"input[{i}]"
        if isinstance(p, TextPart):
            parts.append(check_text(p.text, where if isinstance(req.input, str) else f"{where}.text"))
        else:
            parts.append(decode_image(p.image, f"{where}.image", limits))
    max_new = req.max_new_tokens or defaults.max_new_tokens
    if max_new > limits.max_new_tokens:
        raise RequestError("max_new_tokens", f"{max_new} is more than the limit {limits.max_new_tokens}")
    max_images = defaults.max_images if req.max_images is None else req.max_images
    if max_images > limits.max_images:
        raise RequestError("max_images", f"{max_images} is more than the limit {limits.max_images}")
    params = GenerationParams(
        max_new_tokens=max_new,
        max_images=max_images,
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=req.top_p or defaults.top_p,
        **_sampling(req, limits, defaults, model_steps, model_guidance, seed),
    )
    return parts, params


def check_images(
    req: ImagesRequest, limits: LimitsConfig, defaults: DefaultsConfig, model_steps: int,
    model_guidance: float, seed: int,
) -> tuple[str, int, dict[str, Any]]:
    """Validate a /v1/images request: (prompt, n, {seed, num_inference_steps, guidance_scale})."""
    check_text(req.prompt, "prompt")
    if len(req.prompt) > limits.max_prompt_chars:
        raise RequestError("prompt", f"is {len(req.prompt)} characters, more than the limit {limits.max_prompt_chars}", 413)
    if req.n > limits.max_images_per_request:
        raise RequestError("n", f"{req.n} is more than the limit {limits.max_images_per_request}")
    return req.prompt, req.n, _sampling(req, limits, defaults, model_steps, model_guidance, seed)

