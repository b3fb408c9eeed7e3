"""Helpers for the curation tests and bench: a real threaded HTTP server on 127.0.0.1 serving
every case the crawler must handle, tiny images, and MMC4 JSONL writers."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(fmt: str, size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    """A random-noise image (distinct perceptual hash per seed) in PIL format name `fmt`."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares width x height pixels; the body is tiny (it never decodes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


GOOD_JPEG = image_bytes("JPEG", (64, 64), 99)  # the fixed body of the non-/img/ routes


class CaseServer:
    """Routes: /img/<name> from `images`; /404; /flaky (500 then 200); /slow (sleeps);
    /to-private (302 to 169.254.169.254); /bomb; /text; /noai; /truncated; /redirect-ok."""

    def __init__(self, images: dict[str, bytes] | None = None, slow_s: float = 3.0):
        self.images = dict(images or {})
        self.slow_s = slow_s
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg", headers=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path.split("?")[0]
                with server.lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                    n = server.hits[path]
                good = GOOD_JPEG
                if path.startswith("/img/") and path[5:] in server.images:
                    self._send(200, server.images[path[5:]])
                elif path == "/flaky":
                    self._send(500, b"busy", "text/plain") if n == 1 else self._send(200, good)
                elif path == "/slow":
                    time.sleep(server.slow_s)
                    self._send(200, good)
                elif path == "/to-private":
                    self._send(302, b"", "text/plain", {"Location": "http://169.254.169.254/latest/meta-data"})
                elif path == "/redirect-ok":
                    self._send(302, b"", "text/plain", {"Location": "/img/" + next(iter(server.images))})
                elif path == "/bomb":
                    self._send(200, bomb_png(), "image/png")
                elif path == "/text":
                    self._send(200, b"<html>not an image</html>", "text/html")
                elif path == "/noai":
                    self._send(200, good, headers={"X-Robots-Tag": "noai"})
                elif path == "/truncated":
                    self._send(200, good[: len(good) // 2])
                else:
                    self._send(404, b"not found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CaseServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


SENTENCES = [
    "A red circle sits in the middle of a white page.",
    "The blue square next to it is twice as large.",
    "Green triangles point upward along the lower edge.",
    "Every shape here was drawn by a small program.",
    "The picture shows how colours mix at the borders.",
    "Some shapes overlap and make new colours where they meet.",
]


def mmc4_doc(url: str, image_urls: list[str], n_sent: int = 4, sims: list[float] | None = None,
             offset: int = 0) -> dict:
    texts = [SENTENCES[(offset + i) % len(SENTENCES)] + f" Item {offset + i}." for i in range(n_sent)]
    infos = []
    for i, u in enumerate(image_urls):
        infos.append({"image_name": f"{i}.jpg", "raw_url": u, "matched_text_index": i % n_sent,
                      "matched_sim": (sims[i] if sims else 0.3), "face_detections": None})
    return {"url": url, "text_list": texts, "image_info": infos, "similarity_matrix": None,
            "could_have_url_duplicate": 0}


def write_jsonl(path: Path, docs: list, raw_lines: list[str] = ()) -> Path:
    lines = [json.dumps(d) for d in docs] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_clip(path: Path) -> Path:
    """A random-init CLIPModel (32 px, 2 layers), its tokenizer and image processor, saved like a
    hub folder: the similarity stage loads it exactly as it would load a real model path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dreamcore.tokenizer import DreamTokenizer

    hf_tok = DreamTokenizer.train(SENTENCES * 4, vocab_size=300)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(hf_tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "eos_token_id": hf_tok.eos_token_id, "bos_token_id": hf_tok.bos_token_id,
                     "pad_token_id": hf_tok.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )
    import torch

    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    hf_tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
