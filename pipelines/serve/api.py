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

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": f"{self.field}: {self.message}"}}


# ----------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled field is an error, not ignored


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
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise RequestError(
                    field, f"image is {w}x{h}, more than {limits.max_image_pixels} pixels", 413
                )
            im.load()  # a truncated or corrupt file fails here, not in the model replica
    except RequestError:
        raise
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
            parts.append(p.text)
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
    if len(req.prompt) > limits.max_prompt_chars:
        raise RequestError("prompt", f"is {len(req.prompt)} characters, more than the limit {limits.max_prompt_chars}", 413)
    if req.n > limits.max_images_per_request:
        raise RequestError("n", f"{req.n} is more than the limit {limits.max_images_per_request}")
    return req.prompt, req.n, _sampling(req, limits, defaults, model_steps, model_guidance, seed)


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """FastAPI/pydantic errors -> our error body: the most specific problem, named by its field path."""
    if not errors:
        errors = [{"loc": ("body",), "msg": "invalid request"}]
    # `input: str | list[Part]` reports one error per union member; the deepest is the real one.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    path = ""
    prev_index = False
    for x in first.get("loc", ()):
        x = str(x)
        if prev_index and x in ("text", "image"):
            prev_index = False  # the discriminator tag after a list index; the field follows
            continue
        if x == "body" or "[" in x or x == "str":
            continue  # request root, union member labels
        prev_index = x.isdigit()
        path += f"[{x}]" if prev_index else (f".{x}" if path else x)
    field = path or "body"
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "is not a known field (see /docs for the request schema)"
    return {"error": {"field": field, "message": f"{field}: {msg}", "errors": len(errors)}}
