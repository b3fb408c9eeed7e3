"""The three Ray Serve deployments: LLMServer (text + dream conditions), ImageDecoder, Ingress.

Why three: text is cheap per token while an image costs many UNet calls, so the LLM and the
decoder scale separately (each its own autoscaling_config), and the ingress composes them over
DeploymentHandles. The LLM side is stateless between calls: each call gets the document so far,
so any LLM replica can continue any document and a replaced replica loses nothing.

Both model deployments batch concurrent requests with `serve.batch`; the model work runs in a
worker thread so the replica's event loop keeps answering health checks and queue metrics.
"""

# No `from __future__ import annotations`: Serve's class-based FastAPI views need real annotations
# to tell request bodies from query parameters.

import asyncio
import base64
import ipaddress
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from dreamcore.engine import DreamConditions, TextRequest, TextResult
from dreamcore.generate import Document, GenerationParams, dream_requests
from pipelines.serve.api import (
    GenerateRequest,
    GenerateResponse,
    ImagesRequest,
    ImagesResponse,
    ModelList,
    RequestError,
    check_generate,
    check_images,
    validation_error_body,
)
from pipelines.serve.config import ServeConfig
from pipelines.serve.replicas import DecodedImage, ImageReplica, TextReplica

log = logging.getLogger("ray.serve")


# ----------------------------------------------------------------------------------------------
# Model deployments


@serve.deployment
class LLMServer:
    """DreamLLM without the decoder: continues documents, returns dream conditions at <dream_start>."""

    def __init__(self, checkpoint: str, device: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01) -> None:
        self.replica = TextReplica(checkpoint, device)
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # recent batch sizes: lets tests and benches see batching

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, requests: list[TextRequest]) -> list[TextResult]:
        self.batch_sizes = [*self.batch_sizes[-99:], len(requests)]
        return await asyncio.to_thread(self.replica.engine.continue_batch, requests)

    def info(self) -> dict[str, Any]:
        return {**self.replica.info(), "pid": os.getpid(), "batch_sizes": list(self.batch_sizes)}


@serve.deployment
class ImageDecoder:
    """Dream conditions -> PNG; concurrent images share UNet calls (grouped by steps and guidance)."""

    def __init__(self, checkpoint: str, device: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.02) -> None:
        self.replica = ImageReplica(checkpoint, device)
        self.decode.set_max_batch_size(max_batch_size)
        self.decode.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def decode(self, dreams: list[DreamConditions]) -> list[DecodedImage]:
        self.batch_sizes = [*self.batch_sizes[-99:], len(dreams)]
        return await asyncio.to_thread(self.replica.decode_batch, dreams)

    def info(self) -> dict[str, Any]:
        return {**self.replica.info(), "pid": os.getpid(), "batch_sizes": list(self.batch_sizes)}


# ----------------------------------------------------------------------------------------------
# Ingress (FastAPI)

app = FastAPI(
    title="dreamcore",
    version="1",
    description="Interleaved text-and-image generation with a DreamLLM-style model, served on Ray Serve.",
)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error_body(list(exc.errors())), status_code=422)


@app.exception_handler(RequestError)
async def _refused(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=getattr(exc, "headers", None))


class _Unavailable(RequestError):
    """503/504 from a model deployment; carries Retry-After."""

    def __init__(self, message: str, retry_after_s: float, status: int = 503):
        super().__init__("server", message, status)
        self.headers = {"Retry-After": str(max(1, round(retry_after_s)))}


def read_api_key(key_file: str | None, key_env: str) -> str | None:
    """The configured Bearer key: first line of `key_file`, else $key_env, else None (no auth)."""
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise FileNotFoundError(f"auth.api_key_file={key_file} does not exist; create it or unset it")
        lines = path.read_text().strip().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"auth.api_key_file={key_file} is empty; put the key on its first line")
        return lines[0].strip()
    return os.environ.get(key_env) or None


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _image_part(img: DecodedImage) -> dict[str, Any]:
    return {"type": "image", "image": base64.b64encode(img.png).decode(), "seed": img.seed,
            "width": img.width, "height": img.height}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP API: validation, auth, streaming; composes LLMServer and ImageDecoder."""

    def __init__(self, llm: DeploymentHandle, decoder: DeploymentHandle, config: dict[str, Any]) -> None:
        from dreamcore.config import from_dict

        self.cfg: ServeConfig = from_dict(ServeConfig, config)
        self.llm = llm
        self.decoder = decoder
        self.api_key = read_api_key(self.cfg.auth.api_key_file, self.cfg.auth.api_key_env)
        self._model: dict[str, Any] | None = None
        if self.api_key:
            log.info("dreamcore ingress: Bearer key required on /v1/*")
        else:
            log.warning(
                "dreamcore ingress: no API key configured (auth.api_key_file or $%s); answering "
                "loopback clients only", self.cfg.auth.api_key_env,
            )

    # -- helpers ---------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            client = request.client.host if request.client else None
            if not _is_loopback(client):
                raise RequestError(
                    "Authorization",
                    f"this server has no API key configured and answers loopback clients only (you are "
                    f"{client}); configure auth.api_key_file or ${self.cfg.auth.api_key_env} to serve others",
                    403,
                )
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.api_key):
            err = RequestError("Authorization", "missing or wrong Bearer key (send 'Authorization: Bearer <key>')", 401)
            err.headers = {"WWW-Authenticate": "Bearer"}
            raise err

    async def _call(self, response: Any) -> Any:
        """Await a DeploymentResponse with the per-call timeout; map overload and crashes to 503/504."""
        retry = self.cfg.retry_after_s
        try:
            return await asyncio.wait_for(response, self.cfg.call_timeout_s)
        except BackPressureError:
            raise _Unavailable("the model is overloaded (queue full); retry later", retry) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise _Unavailable(f"the model did not answer within {self.cfg.call_timeout_s} s", retry, 504) from None
        except RayActorError:
            # The replica died mid-request; Serve is replacing it. The client may retry at once.
            raise _Unavailable("a model replica failed while serving this request; retry", retry) from None

    async def _model_info(self) -> dict[str, Any]:
        if self._model is None:
            self._model = await self._call(self.llm.info.remote())
        return self._model

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness of the ingress (no model call: load balancers poll this often)."""
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        info = await self._model_info()
        return {"object": "list", "data": [{"id": info["id"], "object": "model", "config": info["config"]}]}

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def generate(self, body: GenerateRequest, request: Request):
        """Continue an interleaved prompt; images appear where the model emits <dream_start>."""
        self._authorize(request)
        info = await self._model_info()
        parts, params = check_generate(
            body, self.cfg.limits, self.cfg.defaults, info["num_inference_steps"], info["guidance_scale"],
            seed=secrets.randbelow(2**31),
        )
        rid = f"gen-{uuid.uuid4().hex[:16]}"
        if body.stream:
            return StreamingResponse(self._stream(rid, info["id"], parts, params),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        out: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        async for kind, data in self._document(parts, params):
            if kind == "part":
                out.append(data)
            else:
                summary = data
        return {"id": rid, "model": info["id"], "parts": out, **summary}

    async def _stream(self, rid: str, model: str, parts: list[str | bytes], params: GenerationParams
                      ) -> AsyncIterator[bytes]:
        try:
            async for kind, data in self._document(parts, params):
                yield _sse(kind, {"id": rid, "model": model, **data} if kind == "done" else data)
        except RequestError as e:  # headers are already sent: report in-band, then end the stream
            yield _sse("error", {"status": e.status, "message": str(e)})

    async def _text(self, request: TextRequest) -> TextResult:
        res: TextResult = await self._call(self.llm.generate.remote(request))
        if res.error is not None:
            raise RequestError("input", res.error, 413 if res.too_long else 422)
        return res

    async def _document(self, prompt: list[str | bytes], params: GenerationParams
                        ) -> AsyncIterator[tuple[str, dict]]:
        """dreamcore.generate.Document driven over the two deployments (as generate_document in-process)."""
        doc = Document(prompt, params)
        while not doc.finished:
            text = doc.add_text(await self._text(doc.text_request()))
            if text:
                yield "part", {"type": "text", "text": text}
            if doc.wants_image:
                img: DecodedImage = await self._call(self.decoder.decode.remote(doc.image_request()))
                doc.add_image(img.png)
                yield "part", _image_part(img)
        yield "done", {"finish_reason": doc.finish_reason,
                       "usage": {"prompt_tokens": doc.prompt_tokens, "completion_tokens": doc.completion_tokens,
                                 "images": doc.images}}

    @app.post("/v1/images", response_model=ImagesResponse)
    async def images(self, body: ImagesRequest, request: Request) -> dict[str, Any]:
        """Text to image: the prompt's dream conditions, decoded `n` times with seeds seed..seed+n-1."""
        self._authorize(request)
        info = await self._model_info()
        prompt, n, sp = check_images(body, self.cfg.limits, self.cfg.defaults, info["num_inference_steps"],
                                     info["guidance_scale"], seed=secrets.randbelow(2**31))
        res = await self._text(dream_requests([prompt], sp["seed"])[0])
        # The n images go out together so the decoder batches them into shared UNet calls.
        calls = [self.decoder.decode.remote(DreamConditions(
            res.cond, res.uncond, sp["seed"] + i, sp["num_inference_steps"], sp["guidance_scale"]))
            for i in range(n)]
        decoded: list[DecodedImage] = [await self._call(c) for c in calls]
        return {"id": f"img-{uuid.uuid4().hex[:16]}", "model": info["id"],
                "images": [_image_part(d) for d in decoded]}

    @app.get("/v1/stats", include_in_schema=False)
    async def stats(self, request: Request) -> dict[str, Any]:
        """Batch sizes seen by one replica of each model deployment (benchmarks and tests)."""
        self._authorize(request)
        t = time.time()
        llm, dec = await asyncio.gather(self._call(self.llm.info.remote()), self._call(self.decoder.info.remote()))
        return {"llm": llm, "decoder": dec, "took_s": time.time() - t}
