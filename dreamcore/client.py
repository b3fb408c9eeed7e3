"""`dreamcore generate`: a small HTTP client of a served dreamcore endpoint (stdlib only).

It posts an interleaved prompt to `/v1/generate`, and writes the returned document as one HTML file
with its images embedded (dreamcore.report). No Ray or torch import: it runs anywhere Python does.
`generate()` and `stream()` are the same calls for Python callers (the demo, the benchmarks).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dreamcore.report import write_document

API_KEY_ENV = "DREAMCORE_API_KEY"


class ClientError(RuntimeError):
    """The endpoint refused or failed a request; `status` is the HTTP code (0: not reachable)."""

    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _request(endpoint: str, path: str, body: dict[str, Any] | None, api_key: str | None,
             timeout: float, accept: str = "application/json"):
    url = endpoint.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Accept": accept}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raw = e.read().decode("utf-8", "replace")
        try:
            msg = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = raw.strip() or e.reason
        raise ClientError(e.code, str(msg), e.headers.get("Retry-After")) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ClientError(0, f"cannot reach {url}: {reason} (is `dreamcore serve` running there?)") from None


def prompt_parts(prompt: str, images: list[str | Path] = ()) -> list[dict[str, str]]:
    """Input parts: the given image files first (base64), then the prompt text."""
    parts = [{"type": "image", "image": base64.b64encode(Path(p).read_bytes()).decode()} for p in images]
    return [*parts, {"type": "text", "text": prompt}]


def generate(endpoint: str, input: str | list[dict[str, str]], api_key: str | None = None,
             timeout: float = 300.0, **params: Any) -> dict[str, Any]:
    """POST /v1/generate; returns the response JSON (`parts`, `finish_reason`, `usage`)."""
    body = {"input": input, **{k: v for k, v in params.items() if v is not None}}
    with _request(endpoint, "/v1/generate", body, api_key, timeout) as resp:
        return json.loads(resp.read())


def stream(endpoint: str, input: str | list[dict[str, str]], api_key: str | None = None,
           timeout: float = 300.0, **params: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """POST /v1/generate with `stream: true`; yields (event, data) as the server sends them."""
    body = {"input": input, "stream": True, **{k: v for k, v in params.items() if v is not None}}
    with _request(endpoint, "/v1/generate", body, api_key, timeout, accept="text/event-stream") as resp:
        event, data = "message", []
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:  # a blank line ends one event
                if data:
                    yield event, json.loads("\n".join(data))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())


def images(endpoint: str, prompt: str, api_key: str | None = None, timeout: float = 300.0,
           **params: Any) -> dict[str, Any]:
    """POST /v1/images (text to image); returns the response JSON (`images`)."""
    body = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
    with _request(endpoint, "/v1/images", body, api_key, timeout) as resp:
        return json.loads(resp.read())


def resolve_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """--api-key, else --api-key-file, else $DREAMCORE_API_KEY, else none."""
    if api_key:
        return api_key
    if api_key_file:
        return Path(api_key_file).read_text().strip().splitlines()[0]
    return os.environ.get(API_KEY_ENV) or None


# ----------------------------------------------------------------------------------------------
# CLI verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--endpoint", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--output", default="document.html", help="HTML file to write (default: document.html)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an input image placed before the prompt (repeatable)")
    p.add_argument("--api-key", help=f"Bearer key (default: --api-key-file, then ${API_KEY_ENV})")
    p.add_argument("--api-key-file", help="file whose first line is the Bearer key")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-images", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps per image")
    p.add_argument("--stream", action="store_true", help="print parts as the server makes them")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the document")


def main(args: argparse.Namespace) -> int:
    for f in args.image:
        if not Path(f).is_file():
            print(f"error: --image {f}: no such file", file=sys.stderr)
            return 2
    try:
        key = resolve_api_key(args.api_key, args.api_key_file)
    except OSError as e:
        print(f"error: --api-key-file: {e}", file=sys.stderr)
        return 2
    params = {k: getattr(args, k) for k in ("max_new_tokens", "max_images", "temperature", "top_p", "seed",
                                             "guidance_scale", "num_inference_steps")}
    input_parts = prompt_parts(args.prompt, args.image) if args.image else args.prompt
    try:
        if args.stream:
            parts, doc = [], {}
            for event, data in stream(args.endpoint, input_parts, key, args.timeout, **params):
                if event == "part":
                    parts.append(data)
                    shown = data["text"] if data["type"] == "text" else f"[image {data['width']}x{data['height']}]"
                    print(shown, flush=True)
                elif event == "done":
                    doc = {**data, "parts": parts}
                elif event == "error":
                    raise ClientError(int(data.get("status", 500)), data.get("message", "stream failed"))
        else:
            doc = generate(args.endpoint, input_parts, key, args.timeout, **params)
    except ClientError as e:
        hint = f" (retry after {e.retry_after} s)" if e.retry_after else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    meta = f"finish: {doc.get('finish_reason')}; usage: {doc.get('usage')}; endpoint: {args.endpoint}"
    out = write_document(args.output, doc["parts"], title="dreamcore document", prompt=args.prompt, meta=meta)
    n_img = sum(p["type"] == "image" for p in doc["parts"])
    print(f"wrote {out} ({len(doc['parts'])} parts, {n_img} images)")
    return 0
