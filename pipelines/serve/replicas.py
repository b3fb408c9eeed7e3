"""What the two model replicas hold: a checkpoint half loaded on a device, and PNG encoding.

The model work is dreamcore's one engine (`dreamcore.engine.TextEngine` and `decode_dreams`; the
text side is driven by `dreamcore.scheduler.Scheduler`, continuous batching); this module adds
only what serving needs around it: loading just the components a replica uses, the model card
the API reports, and images as PNG files (they travel to the LLM replica and the client as file
bytes). Plain Python + torch, no Ray: benchmarks call these in-process as the
baseline of the Serve path.
"""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreamcore.checkpoint import from_pretrained
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


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but this replica sees no GPU; give it num_gpus > 0 or use device=auto")
    return torch.device(device)


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
                 max_cache_tokens: int = 0, session_ttl_s: float = 600.0, retry_after_s: float = 1.0) -> None:
        self.device = pick_device(device)
        self.card = model_card(checkpoint)
        model, tokenizer = from_pretrained(checkpoint, components=LLM_COMPONENTS)
        self.engine = TextEngine(model.to(self.device).eval(), tokenizer)
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
        return {**self.card, "device": str(self.device), "max_len": self.engine.max_len,
                "scheduler": {"max_batch_size": s.max_batch_size, "max_cache_tokens": s.max_cache_tokens,
                              "reserved_tokens": s.reserved_tokens, "running": s.running, "waiting": s.waiting,
                              "sessions": s.sessions, "prefill_tokens": s.prefill_tokens,
                              "decode_tokens": s.decode_tokens}}


class ImageReplica:
    """The decoder of a checkpoint (no LLM weights): dream conditions -> PNG."""

    def __init__(self, checkpoint: str, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.card = model_card(checkpoint)
        model, _ = from_pretrained(checkpoint, components=DECODER_COMPONENTS)
        self.decoder = model.to(self.device).eval().decoder

    def info(self) -> dict[str, Any]:
        return {**self.card, "device": str(self.device), "resolution": self.decoder.resolution}

    def decode_batch(self, dreams: list[DreamConditions]) -> list[DecodedImage]:
        out = []
        for d, pixels in zip(dreams, decode_dreams(self.decoder, dreams)):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            out.append(DecodedImage(buf.getvalue(), pixels.shape[1], pixels.shape[0], d.seed))
        return out
