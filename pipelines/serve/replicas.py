"""What the two model replicas hold: a checkpoint half loaded on a device, and PNG encoding.

The model work is dreamcore's one engine (`dreamcore.engine.TextEngine` and `decode_dreams`; the
text side is driven by `dreamcore.scheduler.Scheduler`, the image side by
`dreamcore.denoiser.Denoiser`, both continuous batching); this module adds
only what serving needs around it: loading just the components a replica uses, the model card
the API reports, and images as PNG files (they travel to the LLM replica and the client as file
bytes). Plain Python + torch, no Ray: benchmarks call these in-process as the
baseline of the Serve path.
"""

from __future__ import annotations

import asyncio
import io
import json
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamcore.checkpoint import from_pretrained
from dreamcore.denoiser import DecoderBusyError, Denoiser
from dreamcore.engine import DreamConditions, TextEngine, TextRequest, TextResult, decode_dreams
from dreamcore.scheduler import CacheFullError, Scheduler, Ticket

LLM_COMPONENTS = ("llm", "vision", "projectors")
DECODER_COMPONENTS = ("decoder",)


@dataclass
class DecodedImage:
    png: bytes
    width: int
    height: int
    seed: int


@dataclass
class DecodeRefused:
    """An image the decoder would not draw, as plain data (it crosses Ray like DecodedImage).

    retry_after_s set: no room now (503 + Retry-After); None: the input itself is wrong (422).
    """

    error: str
    retry_after_s: float | None = None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but this replica sees no GPU; give it num_gpus > 0 or use device=auto")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The replica's weight dtype: "auto" is bfloat16 on a GPU that has it, else float32."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a serving dtype; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_card(checkpoint: str) -> dict[str, Any]:
    """Id and sampler defaults of a checkpoint (from its config.json; no weights)."""
    path = Path(checkpoint)
    model_cfg = json.loads((path / "config.json").read_text())["model"]
    dec = model_cfg["decoder"]
    return {"id": path.name, "config": model_cfg, "num_inference_steps": int(dec["num_inference_steps"]),
            "guidance_scale": float(dec["guidance_scale"])}


class TextReplica:
    """The LLM side of a checkpoint (no decoder weights) behind the engine and its scheduler.

    The scheduler (dreamcore/scheduler.py) is created stopped: `LLMServer` starts its thread,
    benchmarks and tests may drive `scheduler.step()` themselves or call `engine` directly.
    """

    def __init__(self, checkpoint: str, device: str = "auto", max_batch_size: int = 8,
                 max_cache_tokens: int = 0, session_ttl_s: float = 600.0, retry_after_s: float = 1.0,
                 dtype: str = "auto") -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.card = model_card(checkpoint)
        model, tokenizer = from_pretrained(checkpoint, components=LLM_COMPONENTS, device=self.device,
                                           dtype=self.dtype)
        self.engine = TextEngine(model.eval(), tokenizer)
        self.scheduler = Scheduler(self.engine, max_batch_size, max_cache_tokens or None, session_ttl_s,
                                   retry_after_s)

    def submit(self, request: TextRequest, session_id: str | None = None, stream: bool = False,
               loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue one round; a full cache answers with a finished ticket whose result says so.

        The refusal is a TextResult (error + retry_after_s), like every other per-request error, so
        it crosses Ray as plain data and the ingress maps it to 503 + Retry-After.
        """
        try:
            return self.scheduler.submit(request, session_id, stream, loop)
        except CacheFullError as e:
            ticket = Ticket(session_id, stream, loop)
            ticket._put(TextResult("", "error", 0, 0, error=str(e), retry_after_s=e.retry_after_s))
            return ticket

    def info(self) -> dict[str, Any]:
        s = self.scheduler
        return {**self.card, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "max_len": self.engine.max_len,
                "scheduler": {"max_batch_size": s.max_batch_size, "max_cache_tokens": s.max_cache_tokens,
                              "reserved_tokens": s.reserved_tokens, "running": s.running, "waiting": s.waiting,
                              "sessions": s.sessions, "prefill_tokens": s.prefill_tokens,
                              "decode_tokens": s.decode_tokens}}


class ImageReplica:
    """The decoder of a checkpoint (no LLM weights): dream conditions -> PNG.

    `denoiser` (dreamcore/denoiser.py) is step-level batching, created stopped: `ImageDecoder`
    starts its thread; `decode_batch` is the same trajectories run to the end in the caller's
    thread (offline generation, benchmarks).
    """

    def __init__(self, checkpoint: str, device: str = "auto", max_batch_size: int = 8,
                 max_waiting: int = 256, retry_after_s: float = 1.0, dtype: str = "auto") -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.card = model_card(checkpoint)
        model, _ = from_pretrained(checkpoint, components=DECODER_COMPONENTS, device=self.device, dtype=self.dtype)
        self.decoder = model.eval().decoder
        self.denoiser = Denoiser(self.decoder, max_batch_size, max_waiting, retry_after_s)

    def info(self) -> dict[str, Any]:
        d = self.denoiser
        return {**self.card, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "resolution": self.decoder.resolution,
                "denoiser": {"max_batch_size": d.max_batch_size, "max_waiting": d.max_waiting,
                             "running": d.running, "waiting": d.waiting, "unet_calls": d.unet_calls,
                             "batch_sizes": list(d.batch_sizes)}}

    def submit(self, dream: DreamConditions) -> Future | DecodeRefused:
        """Queue one image on the denoiser; a refusal (busy, or a bad input) comes back as data."""
        try:
            return self.denoiser.submit(dream)
        except DecoderBusyError as e:
            return DecodeRefused(str(e), e.retry_after_s)
        except ValueError as e:
            return DecodeRefused(str(e))

    @staticmethod
    def png(dream: DreamConditions, pixels: np.ndarray) -> DecodedImage:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return DecodedImage(buf.getvalue(), pixels.shape[1], pixels.shape[0], dream.seed)

    def decode_batch(self, dreams: list[DreamConditions]) -> list[DecodedImage]:
        return [self.png(d, px) for d, px in zip(dreams, decode_dreams(self.decoder, dreams))]
