"""The three Ray Serve deployments: LLMServer (text + dream conditions), ImageDecoder, Ingress.

Why three: text is cheap per token while an image costs many UNet calls, so the LLM and the
decoder scale separately (each its own autoscaling_config), and the ingress composes them over
DeploymentHandles. The LLM side is stateless between calls: each call gets the document so far,
so any LLM replica can continue any document and a replaced replica loses nothing.

Both model deployments batch continuously: the LLM per decode step (dreamcore/scheduler.py), the
decoder per denoising step (dreamcore/denoiser.py). The model work runs in each replica's own
step thread so the replica's event loop keeps answering health checks and queue metrics.
"""

# No `from __future__ import annotations`: Serve's class-based FastAPI views need real annotations
# to tell request bodies from query parameters.

import asyncio
import base64
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dreamcore import storage
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
    error_body,
    validation_error,
)
from pipelines.serve.config import ServeConfig
from pipelines.serve.guard import GuardSettings, RequestGuard
from pipelines.serve.openai_api import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionBuilder,
    ChatCompletionRequest,
    ChatPlan,
    ImageGenerationRequest,
    ImagesResponseOut,
    chat_template_of,
    check_chat,
    check_image_generation,
    from_request_error,
    images_response,
    is_openai_path,
    sse,
    usage,
)
from pipelines.serve.replicas import DecodedImage, DecodeRefused, ImageReplica, TextReplica

log = logging.getLogger("ray.serve")


# ----------------------------------------------------------------------------------------------
# Model deployments


@serve.deployment
class LLMServer:
    """DreamLLM without the decoder: continues documents, returns dream conditions at <dream_start>.

    Continuous batching (dreamcore/scheduler.py): a scheduler thread admits rounds at every decode
    step, and a round sent with a `session_id` keeps its document's KV cache for the next round
    (after the image), so only the new part is prefilled. Without a session id a call is stateless.
    A round joins the running batch at the next decode step instead of waiting for a batch to fill.
    """

    def __init__(self, checkpoint: str, device: str = "auto", max_batch_size: int = 8,
                 max_cache_tokens: int = 0,
                 session_ttl_s: float = 600.0, retry_after_s: float = 2.0, dtype: str = "auto") -> None:
        # An object-store checkpoint: downloaded once on this replica's node (storage.local_path).
        self.replica = TextReplica(storage.local_path(checkpoint), device, max_batch_size, max_cache_tokens,
                                   session_ttl_s, retry_after_s, dtype)
        self.scheduler = self.replica.scheduler
        self.scheduler.start()

    async def generate(self, request: TextRequest, session_id: str | None = None) -> TextResult:
        """One text round -> its TextResult; a capacity refusal has `retry_after_s` set (answer 503)."""
        ticket = await asyncio.to_thread(self.replica.submit, request, session_id, False,
                                         asyncio.get_running_loop())
        try:
            return await ticket.wait()
        except asyncio.CancelledError:  # the caller went away: free the slot and the cache now
            self.scheduler.cancel_ticket(ticket)
            raise

    async def generate_stream(self, request: TextRequest, session_id: str | None = None) -> AsyncIterator[Any]:
        """One text round as it is decoded: a TokenEvent per sampled token, then the TextResult.

        Call with `handle.options(stream=True).generate_stream.remote(...)`.
        """
        ticket = await asyncio.to_thread(self.replica.submit, request, session_id, True,
                                         asyncio.get_running_loop())
        try:
            async for item in ticket:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            self.scheduler.cancel_ticket(ticket)
            raise

    async def cancel(self, session_id: str) -> bool:
        """End a document's session: its round in flight stops and its cache is freed (False: unknown)."""
        return await asyncio.to_thread(self.scheduler.cancel, session_id)

    def check_health(self) -> None:
        if not self.scheduler.alive:
            raise RuntimeError("the LLM scheduler thread has stopped")

    def info(self) -> dict[str, Any]:
        return {**self.replica.info(), "pid": os.getpid(), "batch_sizes": list(self.scheduler.batch_sizes)}

    def __del__(self) -> None:
        self.scheduler.stop()


@serve.deployment
class ImageDecoder:
    """Dream conditions -> PNG, with step-level batching (dreamcore/denoiser.py).

    A denoiser thread runs one UNet call per step over every image in flight; an image that
    arrives while others denoise joins at the next step (guided rows in the same call), and one
    whose caller went away leaves at the next step. Nothing waits for a batch to fill.
    """

    def __init__(self, checkpoint: str, device: str = "auto", max_batch_size: int = 8,
                 max_waiting: int = 256, retry_after_s: float = 1.0, dtype: str = "auto") -> None:
        self.replica = ImageReplica(storage.local_path(checkpoint), device, max_batch_size, max_waiting,
                                    retry_after_s, dtype)
        self.denoiser = self.replica.denoiser
        self.denoiser.start()

    async def decode(self, dream: DreamConditions) -> DecodedImage | DecodeRefused:
        """One image; a refusal (busy: retry_after_s set; a bad input) comes back as DecodeRefused."""
        fut = self.replica.submit(dream)
        if isinstance(fut, DecodeRefused):
            return fut
        try:
            pixels = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the caller went away: the image leaves the batch next step
            fut.cancel()
            raise
        except RuntimeError as e:  # the decoder failed on this image alone (Denoiser._isolate)
            return DecodeRefused(str(e), self.replica.denoiser.retry_after_s)
        return await asyncio.to_thread(self.replica.png, dream, pixels)

    def check_health(self) -> None:
        if not self.denoiser.alive:
            raise RuntimeError("the denoiser thread has stopped")

    def info(self) -> dict[str, Any]:
        return {**self.replica.info(), "pid": os.getpid(), "batch_sizes": list(self.denoiser.batch_sizes)}

    def __del__(self) -> None:
        self.denoiser.stop()


# ----------------------------------------------------------------------------------------------
# Ingress (FastAPI)

app = FastAPI(
    title="dreamcore",
    version="1",
    description="Interleaved text-and-image generation with a DreamLLM-style model, served on Ray Serve.",
)


app.add_middleware(RequestGuard)  # request id, auth and body limit before any body is read


def _rid(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    status = 400 if is_openai_path(request.url.path) else 422  # OpenAI answers 400 where we say 422
    return JSONResponse(validation_error(list(exc.errors()), status, _rid(request)), status_code=status)


@app.exception_handler(RequestError)
async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    if is_openai_path(request.url.path):
        status, body = from_request_error(exc, _rid(request))
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(exc.body(_rid(request)), status_code=exc.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own refusals (a body it cannot parse, a wrong method or path) in the one error shape."""
    status, message, param = exc.status_code, str(exc.detail), None
    if status == 400 and message == "There was an error parsing the body":  # e.g. JSON nested too deeply
        status = 400 if is_openai_path(request.url.path) else 422
        message, param = "body: could not be parsed as JSON (is it nested too deeply?)", "body"
    elif status == 404:
        message = f"{request.url.path}: no such route (see /docs)"
    elif status == 405:
        message = f"{request.method} {request.url.path}: method not allowed (see /docs)"
    return JSONResponse(error_body(message, status, param, request_id=_rid(request)), status_code=status,
                        headers=exc.headers)


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
        # What the RequestGuard middleware enforces before any route runs (pipelines/serve/guard.py).
        app.state.guard = GuardSettings(self.api_key, self.cfg.auth.api_key_env, self.cfg.limits.max_body_bytes)
        self._model: dict[str, Any] | None = None
        # Deployments seen losing a replica (name -> its handle) and the probe that asks whether one
        # answers again: while it does not, requests get 503 + Retry-After at once instead of
        # waiting in Serve's queue for a replica that does not exist yet.
        self._down: dict[str, DeploymentHandle] = {}
        self._probes: dict[str, asyncio.Task] = {}
        self._answered: dict[str, float] = {}  # deployment -> when a call to it last finished (monotonic)
        self._typical: dict[str, float] = {}  # deployment -> moving average of its calls' time (s)
        # OpenAI's model `created`: when the checkpoint was written (this replica's start if its
        # folder is on another node).
        card = Path(self.cfg.checkpoint, "config.json")
        self.created = int(card.stat().st_mtime if card.is_file() else time.time())
        if self.api_key:
            log.info("dreamcore ingress: Bearer key required on /v1/*")
        else:
            log.warning(
                "dreamcore ingress: no API key configured (auth.api_key_file or $%s); answering "
                "loopback clients only", self.cfg.auth.api_key_env,
            )

    # -- helpers ---------------------------------------------------------------------------------

    async def _call(self, response: Any, deployment: str = "", handle: DeploymentHandle | None = None) -> Any:
        """Await a DeploymentResponse with the per-call timeout; map overload and crashes to 503/504.

        A replica failure marks `deployment` as recovering (see `_ready`). So does a call that is
        still waiting after `recovery_probe_s` while no replica of `deployment` answers (`_alive`):
        when a node dies with the only replica, Serve's router keeps retrying it and then waits for
        a replacement, without an error; the request would hang until call_timeout_s."""
        retry = self.cfg.retry_after_s
        call = asyncio.ensure_future(response)
        started = time.monotonic()
        deadline = started + self.cfg.call_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=max(0.0, min(self._patience(deployment),
                                                                          deadline - time.monotonic())))
                if done:
                    result = call.result()
                    now = time.monotonic()
                    self._answered[deployment] = now
                    typical = self._typical.get(deployment)
                    self._typical[deployment] = now - started if typical is None else \
                        0.8 * typical + 0.2 * (now - started)
                    return result
                if time.monotonic() >= deadline:
                    raise asyncio.TimeoutError
                if handle is not None and not await self._alive(deployment, handle):
                    self._down[deployment] = handle
                    raise _Unavailable(f"the {deployment} has no replica that answers (it was lost, e.g. with its "
                                       "node, and Serve is replacing it); retry in a few seconds", retry)
        except BackPressureError:
            raise _Unavailable("the model is overloaded (queue full); retry later", retry) from None
        except asyncio.TimeoutError:
            raise _Unavailable(f"the model did not answer within {self.cfg.call_timeout_s} s", retry, 504) from None
        except RayActorError:
            # The replica died mid-request; Serve is replacing it. The client may retry.
            if handle is not None:
                self._down[deployment] = handle
            raise _Unavailable("a model replica failed while serving this request; retry", retry) from None
        finally:
            if not call.done():  # given up on: leave nothing queued in Serve for it
                call.cancel()
                response.cancel()

    def _patience(self, deployment: str) -> float:
        """How long a call may wait before the deployment's liveness is asked: `recovery_probe_s`, or
        twice its calls' typical time where that is longer (a saturated decoder whose batches take
        10 s on a GPU answers nothing for 10 s, yet is alive)."""
        return max(self.cfg.recovery_probe_s, 2 * self._typical.get(deployment, 0.0))

    async def _alive(self, deployment: str, handle: DeploymentHandle) -> bool:
        """Whether some replica of `deployment` answers: a call to it finished within the last two
        patience periods (busy, not gone), or a probe (shared by concurrent callers) answers within
        `recovery_probe_s`. The probe is queued like any call, so it is asked only when nothing
        finished lately: a deployment that is merely full keeps finishing calls."""
        if time.monotonic() - self._answered.get(deployment, float("-inf")) < 2 * self._patience(deployment):
            return True
        probe = self._probes.get(deployment)
        if probe is None or probe.done():
            probe = self._probes[deployment] = asyncio.ensure_future(self._probe(handle))
        try:
            await asyncio.shield(probe)
        except Exception:  # no answer within recovery_probe_s
            return False
        self._answered[deployment] = time.monotonic()
        return True

    async def _ready(self, deployment: str) -> None:
        """503 + Retry-After at once while `deployment` has lost a replica and none answers yet.

        After a replica failure, one probe at a time (`info`, answered by the replica's event loop
        even while its model thread is busy) asks whether a replica answers within
        `recovery_probe_s`; concurrent requests share it. The first answer ends the recovery."""
        handle = self._down.get(deployment)
        if handle is None:
            return
        probe = self._probes.get(deployment)
        if probe is None or probe.done():
            probe = self._probes[deployment] = asyncio.ensure_future(self._probe(handle))
        try:
            await asyncio.shield(probe)
        except Exception:  # timed out, or answered by another dying replica
            raise _Unavailable(f"the {deployment} has no healthy replica right now (one failed and Serve is "
                               f"replacing it); retry in a few seconds", self.cfg.retry_after_s) from None
        self._down.pop(deployment, None)

    async def _probe(self, handle: DeploymentHandle) -> None:
        response = handle.info.remote()
        try:
            await asyncio.wait_for(response, self.cfg.recovery_probe_s)
        except asyncio.TimeoutError:
            response.cancel()  # leave no probe queued for the replacement
            raise

    async def _model_info(self) -> dict[str, Any]:
        if self._model is None:
            await self._ready("LLMServer")
            self._model = await self._call(self.llm.info.remote(), "LLMServer", self.llm)
        return self._model

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness of the ingress (no model call: load balancers poll this often)."""
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    async def models(self, request: Request) -> dict[str, Any]:
        info = await self._model_info()
        card = {"id": info["id"], "object": "model", "created": self.created, "owned_by": "dreamcore",
                "config": info["config"]}  # OpenAI's model object; `config` is dreamcore's
        return {"object": "list", "data": [card]}

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def generate(self, body: GenerateRequest, request: Request):
        """Continue an interleaved prompt; images appear where the model emits <dream_start>."""
        info = await self._model_info()
        parts, params = check_generate(
            body, self.cfg.limits, self.cfg.defaults, info["num_inference_steps"], info["guidance_scale"],
            seed=secrets.randbelow(2**31),
        )
        rid = f"gen-{uuid.uuid4().hex[:16]}"
        if body.stream:
            return StreamingResponse(self._stream(rid, info["id"], parts, params, request.state.request_id),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        async for kind, data in self._document(Document(parts, params)):
            if kind == "part":
                out.append(data)
            else:
                summary = data
        return {"id": rid, "model": info["id"], "parts": out, **summary}

    async def _stream(self, rid: str, model: str, parts: list[str | bytes], params: GenerationParams,
                      request_id: str) -> AsyncIterator[bytes]:
        try:
            async for kind, data in self._document(Document(parts, params), stream=True):
                yield _sse(kind, {"id": rid, "model": model, **data} if kind == "done" else data)
        except RequestError as e:  # headers are already sent: report in-band, then end the stream
            data: dict[str, Any] = {"status": e.status, "message": str(e), "request_id": request_id}
            retry = (getattr(e, "headers", None) or {}).get("Retry-After")
            if retry is not None:  # a retryable failure (a replica died, overload): when to come back
                data["retry_after"] = int(retry)
            yield _sse("error", data)
        except Exception:  # never a traceback to the client; the log has it under the request id
            log.exception("generate stream %s (request %s) failed", rid, request_id)
            yield _sse("error", {"status": 500, "request_id": request_id,
                                 "message": f"the server failed while generating; it is logged under request id "
                                            f"{request_id}; retry"})

    @staticmethod
    def _checked(res: TextResult) -> TextResult:
        if res.error is not None:
            if res.retry_after_s:  # the LLM replica's KV cache is full: a retryable refusal
                raise _Unavailable(res.error, res.retry_after_s)
            raise RequestError("input", res.error, 413 if res.too_long else 422)
        return res

    async def _text(self, request: TextRequest, session: str | None = None) -> TextResult:
        await self._ready("LLMServer")
        return self._checked(await self._call(self.llm.generate.remote(request, session), "LLMServer", self.llm))

    async def _round(self, request: TextRequest, session: str, stream: bool) -> AsyncIterator[str | TextResult]:
        """One text round of a document: with `stream`, each sampled token's text as it is decoded;
        then the checked TextResult (whose text is those pieces joined)."""
        if not stream:
            yield await self._text(request, session)
            return
        await self._ready("LLMServer")
        tokens = self.llm.options(stream=True).generate_stream.remote(request, session).__aiter__()
        while True:
            try:  # each token under the per-call timeout, overload and replica failures mapped as _call does
                item = await self._call(asyncio.ensure_future(tokens.__anext__()), "LLMServer", self.llm)
            except StopAsyncIteration:
                raise _Unavailable("the model ended a round without its result; retry", self.cfg.retry_after_s) from None
            if isinstance(item, TextResult):
                yield self._checked(item)
                return
            if item.text:
                yield item.text

    async def _document(self, doc: Document, stream: bool = False) -> AsyncIterator[tuple[str, dict]]:
        """dreamcore.generate.Document driven over the two deployments (as generate_document in-process).

        Yields ("delta", {"text"}) per token when `stream`, ("part", part) per text chunk and image,
        then ("done", summary). The document's rounds share one LLM session, so the replica keeps its
        KV cache across the images (only the new image block is prefilled); when the document ends,
        fails or its client goes away (the generator is closed), the session is cancelled: its
        round in flight stops and its cache is freed at once. The caller owns `doc`, so it can read
        the token counts when it stops early (a `stop` sequence).
        """
        session = f"doc-{uuid.uuid4().hex}"
        try:
            while not doc.finished:
                res: TextResult | None = None
                async for item in self._round(doc.text_request(), session, stream):
                    if isinstance(item, str):
                        yield "delta", {"text": item}
                    else:
                        res = item
                text = doc.add_text(res)
                if text:
                    yield "part", {"type": "text", "text": text}
                if doc.wants_image:
                    img = await self._image(doc.image_request())
                    doc.add_image(img.png)
                    yield "part", _image_part(img)
            yield "done", {"finish_reason": doc.finish_reason,
                           "usage": {"prompt_tokens": doc.prompt_tokens, "completion_tokens": doc.completion_tokens,
                                     "images": doc.images}}
        finally:  # finished documents free themselves unless the last round was a dream: free it now
            self.llm.cancel.remote(session)

    @app.post("/v1/images", response_model=ImagesResponse)
    async def images(self, body: ImagesRequest, request: Request) -> dict[str, Any]:
        """Text to image: the prompt's dream conditions, decoded `n` times with seeds seed..seed+n-1."""
        info = await self._model_info()
        prompt, n, sp = check_images(body, self.cfg.limits, self.cfg.defaults, info["num_inference_steps"],
                                     info["guidance_scale"], seed=secrets.randbelow(2**31))
        decoded = await self._draw(prompt, n, sp)
        return {"id": f"img-{uuid.uuid4().hex[:16]}", "model": info["id"],
                "images": [_image_part(d) for d in decoded]}

    async def _draw(self, prompt: str, n: int, sp: dict[str, Any]) -> list[DecodedImage]:
        """Text to image (/v1/images and /v1/images/generations): one dream, decoded with seeds seed + i."""
        res = await self._text(dream_requests([prompt], sp["seed"])[0])
        # The n images go out together so the decoder batches them into shared UNet calls.
        return list(await asyncio.gather(*(self._image(DreamConditions(
            res.cond, res.uncond, sp["seed"] + i, sp["num_inference_steps"], sp["guidance_scale"]))
            for i in range(n))))

    async def _image(self, dream: DreamConditions) -> DecodedImage:
        """One image from the decoder deployment; its refusals become 503 (busy) or 422 (bad input)."""
        await self._ready("ImageDecoder")
        img = await self._call(self.decoder.decode.remote(dream), "ImageDecoder", self.decoder)
        if isinstance(img, DecodeRefused):
            if img.retry_after_s is not None:
                raise _Unavailable(img.error, img.retry_after_s)
            raise RequestError("image", img.error)
        return img

    # -- OpenAI-compatible routes (pipelines/serve/openai_api.py, docs/serving.md) ---------------

    @app.post("/v1/images/generations", response_model=ImagesResponseOut)
    async def image_generations(self, body: ImageGenerationRequest, request: Request) -> dict[str, Any]:
        """OpenAI's image generation: the /v1/images path, answered as base64 PNGs (`b64_json`)."""
        info = await self._model_info()
        side = int(info["config"]["decoder"]["resolution"])
        prompt, n, sp = check_image_generation(
            body, info["id"], side, self.cfg.limits, self.cfg.defaults, info["num_inference_steps"],
            info["guidance_scale"], seed=secrets.randbelow(2**31),
        )
        try:
            decoded = await self._draw(prompt, n, sp)
        except RequestError as e:
            if e.field != "input":
                raise
            raise RequestError("prompt", e.message, e.status) from None
        return images_response(int(time.time()), [base64.b64encode(d.png).decode() for d in decoded],
                               f"{side}x{side}")

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        """OpenAI's chat completions: the messages are the document prompt; the answer interleaves
        text and `image_url` parts (streamed as `chat.completion.chunk` events when `stream`)."""
        info = await self._model_info()
        plan = check_chat(body, info["id"], self.cfg.limits, self.cfg.defaults, info["num_inference_steps"],
                          info["guidance_scale"], seed=secrets.randbelow(2**31),
                          chat_template=chat_template_of(info["config"]))
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        chat = ChatCompletionBuilder(rid, int(time.time()), info["id"], plan.stop)
        doc = Document(plan.prompt, plan.params)
        if body.stream:
            return StreamingResponse(self._chat_stream(chat, doc, plan, request.state.request_id),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for _ in self._chat_deltas(chat, doc, stream=False):
                pass
        except RequestError as e:
            raise plan.rename(e) from None
        return chat.completion(doc.finish_reason, usage(doc.prompt_tokens, doc.completion_tokens))

    async def _chat_deltas(self, chat: ChatCompletionBuilder, doc: Document, stream: bool = True
                           ) -> AsyncIterator[dict[str, Any]]:
        """The answer's deltas as `_document` makes them (per token when `stream`, else per part);
        it stops at a stop sequence."""
        parts = self._document(doc, stream=stream)
        try:
            async for kind, data in parts:
                if kind == "delta":
                    deltas = [chat.add_text(data["text"])]
                elif kind != "part":
                    continue
                elif data["type"] == "text":
                    deltas = [] if stream else [chat.add_text(data["text"])]  # streamed: its tokens came as deltas
                else:
                    deltas = chat.add_image(data["image"])
                for delta in deltas:
                    if delta:
                        yield delta
                if chat.stopped:
                    break  # no more text or images: the rest of the document is not generated
        finally:
            await parts.aclose()
        tail = chat.finish()
        if tail:
            yield tail

    async def _chat_stream(self, chat: ChatCompletionBuilder, doc: Document, plan: ChatPlan, request_id: str
                           ) -> AsyncIterator[bytes]:
        try:
            yield sse(chat.chunk({"role": "assistant", "content": ""}))
            async for delta in self._chat_deltas(chat, doc):
                yield sse(chat.chunk(delta))
            yield sse(chat.chunk({}, chat.finish_reason(doc.finish_reason)))
            if plan.include_usage:
                yield sse(chat.usage_chunk(usage(doc.prompt_tokens, doc.completion_tokens)))
        except RequestError as e:  # headers are already sent: the error goes in-band, as OpenAI's do
            yield sse(from_request_error(plan.rename(e), request_id)[1])
        except Exception:  # never a traceback to the client; the log has it under the request id
            log.exception("chat stream %s (request %s) failed", chat.rid, request_id)
            yield sse(error_body(f"the server failed while generating; it is logged under request id {request_id}; "
                                 "retry", 500, request_id=request_id))
        yield SSE_DONE

    @app.get("/v1/stats", include_in_schema=False)
    async def stats(self, request: Request) -> dict[str, Any]:
        """Batch sizes seen by one replica of each model deployment (benchmarks and tests)."""
        t = time.time()
        llm, dec = await asyncio.gather(self._call(self.llm.info.remote(), "LLMServer", self.llm),
                                        self._call(self.decoder.info.remote(), "ImageDecoder", self.decoder))
        return {"llm": llm, "decoder": dec, "ingress": {"pid": os.getpid()}, "took_s": time.time() - t}
