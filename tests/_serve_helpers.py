"""The debug DreamLLM as a checkpoint for the serving tests, saved with checkpoint.save_pretrained.

Untrained weights would almost never sample `<dream_start>` (1 token of a few hundred), so the
tests could not see an image. The checkpoint is nudged instead: one embedding dimension is set to
a constant for every token, so the final hidden state carries a steady component, and the LM
head row of `<dream_start>` reads it. The model then draws an image every few tokens while the
rest of its text stays random. Nothing in the server knows about this; it only changes weights.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from _model_helpers import debug_config

from dreamcore.checkpoint import save_pretrained
from dreamcore.model import DreamLLM
from dreamcore.tokenizer import DreamTokenizer

SENTENCES = [
    "a red circle sits on a white page",
    "the green square is next to a blue triangle",
    "draw a yellow circle and then a red square",
    "here is a picture of a blue square",
]


def make_checkpoint(directory: Path, dream_logit: float = 0.3) -> Path:
    """Build the debug model, nudge it (see module docstring) and save it; returns the folder."""
    torch.manual_seed(0)
    cfg = debug_config()
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                               corpus_texts=SENTENCES * 4)
    model = DreamLLM(cfg, tok)
    with torch.no_grad():
        emb = model.llm.get_input_embeddings().weight  # (V, D)
        head = model.llm.get_output_embeddings().weight  # (V, D)
        emb[:, 0] = 0.5  # a steady component in every position's residual stream
        head[:, 0] = 0.0
        head[tok.dream_start_id] = 0.0
        head[tok.dream_start_id, 0] = dream_logit
    save_pretrained(model, tok, directory)
    return directory


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's Serve HTTP proxy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(tmp: Path, key: str, overrides: list[str], checkpoint_name: str = "ckpt") -> str:
    """The nudged checkpoint served on the session's Ray with Bearer `key` and ServeConfig
    `overrides`, on a free port; returns the base URL (pipelines.serve.shutdown() stops it)."""
    from pipelines.serve import load_serve_config, start_local

    ckpt = make_checkpoint(tmp / checkpoint_name)
    key_file = tmp / "api-key"
    key_file.write_text(key + "\n")
    cfg = load_serve_config(None, overrides, checkpoint=str(ckpt), port=free_port(),
                            auth={"api_key_file": str(key_file)})
    return start_local(config=cfg, timeout_s=240)


def post_raw(url: str, path: str, body: Any, key: str | None, headers: dict[str, str] | None = None,
             timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, raw body) of a POST; 4xx/5xx are returned, not raised; bytes
    bodies are sent as they are (broken JSON too)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    req = urllib.request.Request(url + path, data, hdrs, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
