"""A hostile client against the real Serve app on loopback: auth before the body, limits, one error
shape, strict types, and poison requests that must not touch the good requests batched with them.

Requests that must be refused before their body is read are written on a raw socket: the headers
announce a body that is never sent, so an answer proves the server did not wait for (or read) it.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _serve_helpers import post_raw, start_app  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

KEY = "hostile-test-key-0123456789"
BODY_LIMIT = 256 * 1024
ERROR_KEYS = {"message", "type", "param", "code", "request_id"}


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from pipelines.serve import shutdown

    yield start_app(tmp_path_factory.mktemp("serve-hostile"), KEY, [
        "llm.num_cpus=0", "decoder.num_cpus=0", "ingress.num_cpus=0",  # the session's Ray has 2 CPUs
        *(f"{d}.autoscaling.max_replicas=1" for d in ("llm", "decoder", "ingress")),
        f"limits.max_body_bytes={BODY_LIMIT}", "limits.max_image_bytes=65536",
        "limits.max_new_tokens=40", "limits.max_inference_steps=3",
    ])
    shutdown()


def post(url: str, path: str, body: Any, key: str | None = KEY, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    return post_raw(url, path, body, key, headers)


def raw(url: str, head: bytes, body: bytes = b"", timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (request line and headers, CRLF-separated, without the blank line) and `body`
    on a fresh socket; the answer as (status, headers, body). Nothing more is sent after `body`."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def head(path: str, *lines: str | bytes) -> bytes:
    parts = [f"POST {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Content-Type: application/json",
             b"Connection: close"]
    parts += [x.encode() if isinstance(x, str) else x for x in lines]
    return b"\r\n".join(parts)


def error_of(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The one error shape, with the request id the headers carry; no internals in the message."""
    err = json.loads(body)["error"]
    assert set(err) == ERROR_KEYS, (status, err)
    assert err["request_id"] == headers["x-request-id"], (err, headers)
    for leak in ("Traceback", "File \"", ".venv", "site-packages", "pid=", "ActorID", "actor_id", "ray::"):
        assert leak not in err["message"], err
    return err


def image_b64(fmt: str = "PNG", size: tuple[int, int] = (8, 8), mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


GOOD = {"input": "a red circle", "max_new_tokens": 12, "max_images": 1, "num_inference_steps": 2,
        "temperature": 1.0, "top_p": 1.0}


# ----------------------------------------------------------------------------------------------
# Auth and the body limit, before the body


def test_no_key_is_401_before_the_body_is_read(served):
    t = time.monotonic()
    status, headers, body = raw(served, head("/v1/generate", "Content-Length: 104857600"))  # 100 MB, never sent
    assert status == 401 and headers["www-authenticate"] == "Bearer", (status, body)
    assert time.monotonic() - t < 10
    error_of(status, headers, body)
    # A bad body without a key: 401, not the schema's 422 (nobody unauthenticated learns the schema).
    status, headers, body = post(served, "/v1/generate", {"bogus": 1}, key=None)
    assert status == 401 and "input" not in error_of(status, headers, body)["message"]
    # A non-ASCII byte in the header is a wrong key (401), not a 500.
    status, headers, body = raw(served, head("/v1/generate", b"Authorization: Bearer \xff\xfe", "Content-Length: 2"),
                                b"{}")
    assert status == 401, body
    status, headers, body = raw(served, head("/v1/images", f"Authorization: Bearer {KEY}x", "Content-Length: 2"), b"{}")
    assert status == 401, body


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    auth = f"Authorization: Bearer {KEY}"
    status, headers, body = raw(served, head("/v1/generate", auth, f"Content-Length: {BODY_LIMIT + 1}"))
    assert status == 413 and "max_body_bytes" in error_of(status, headers, body)["message"], body
    # No Content-Length: the body streams in (chunked) and is cut where it crosses the limit.
    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(BODY_LIMIT // len(chunk) + 2)) + b"0\r\n\r\n"
    status, headers, body = raw(served, head("/v1/generate", auth, "Transfer-Encoding: chunked"), chunked)
    assert status == 413, body
    error_of(status, headers, body)
    # Just under the limit is read and judged on its content.
    status, headers, body = post(served, "/v1/generate", {"input": "a" * (BODY_LIMIT - 100)})
    assert status == 413 and error_of(status, headers, body)["param"] == "input"  # the prompt's own cap


# ----------------------------------------------------------------------------------------------
# One error shape, strict types, documented formats


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/generate", {"input": "a", "bogus": 1}, 422, "bogus"),
    ("/v1/generate", {"input": "a", "max_new_tokens": "2"}, 422, "max_new_tokens"),  # no string-to-int
    ("/v1/generate", {"input": "a", "stream": "yes"}, 422, "stream"),  # no "yes" booleans
    ("/v1/images", {"prompt": "a", "n": 1.0}, 422, "n"),
    ("/v1/generate", b'{"input": "a",, }', 422, None),  # malformed JSON names the body, not "[14]"
    ("/v1/generate", b"[" * 50000 + b"]" * 50000, 422, "body"),  # nested too deeply for the parser
    ("/v1/generate", {"input": [{"type": "image", "image": image_b64("GIF")}]}, 422, "input[0].image"),
    ("/v1/generate", {"input": [{"type": "image", "image": image_b64("TIFF")}]}, 422, "input[0].image"),
    ("/v1/generate", {"input": [{"type": "image", "image": image_b64("PNG", (8000, 8000), "1")}]}, 413,
     "input[0].image"),  # a decompression bomb: 8000 x 8000 in a few kB (the limit is 4096 x 4096)
    ("/v1/chat/completions", {"model": "ckpt", "messages": [{"role": "user", "content": "a"}], "max_tokens": "3"},
     400, "max_tokens"),
    ("/v1/images/generations", {"prompt": "a", "n": "1"}, 400, "n"),
    ("/v1/nope", {}, 404, None),
])
def test_every_refusal_has_one_shape_and_a_request_id(served, path, body, status, param):
    got, headers, raw_body = post(served, path, body)
    assert got == status, raw_body[:300]
    err = error_of(got, headers, raw_body)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_a_callers_request_id_is_kept_and_wrong_methods_are_shaped(served):
    status, headers, body = post(served, "/v1/generate", {"input": 3}, headers={"X-Request-Id": "trace-42.a"})
    assert status == 422 and headers["x-request-id"] == "trace-42.a" == error_of(status, headers, body)["request_id"]
    ids = {post(served, "/v1/generate", {"input": 3})[1]["x-request-id"] for _ in range(3)}
    assert len(ids) == 3  # a new one per request when the caller sends none
    req = urllib.request.Request(f"{served}/v1/generate", headers={"Authorization": f"Bearer {KEY}"})
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("GET /v1/generate was answered")
    except urllib.error.HTTPError as e:
        err = error_of(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())
        assert e.code == 405 and err["code"] == "method_not_allowed"
    with urllib.request.urlopen(f"{served}/healthz", timeout=30) as r:  # open routes stay open
        assert r.status == 200 and r.headers["X-Request-Id"]


# ----------------------------------------------------------------------------------------------
# Poison requests in a batch


def _answers(served: str, bodies: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """All bodies sent at once (released together), answers in order."""
    out: list[Any] = [None] * len(bodies)
    gate = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        gate.wait()
        status, _, raw_body = post(served, "/v1/generate", bodies[i])
        out[i] = (status, json.loads(raw_body))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def _same_document(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same text, same image count and seeds; pixels within one level (the UNet batch may differ)."""
    assert [p["type"] for p in a["parts"]] == [p["type"] for p in b["parts"]], (a["parts"], b["parts"])
    for p, q in zip(a["parts"], b["parts"]):
        if p["type"] == "text":
            assert p["text"] == q["text"]
        else:
            x, y = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"])))).astype(int) for r in (p, q))
            assert p["seed"] == q["seed"] and np.abs(x - y).max() <= 1


def test_poison_requests_fail_alone_and_leave_their_batch_mates_unchanged(served):
    good = [{**GOOD, "seed": s} for s in (1, 2, 3, 4)]
    alone = _answers(served, good)
    assert all(status == 200 for status, _ in alone), alone
    poisons = [
        ({**GOOD, "seed": 9, "temperature": 1e-40}, 200),  # is greedy, not NaN probabilities
        ({**GOOD, "input": "a \ud800 circle"}, 422),  # a lone surrogate the tokenizer cannot encode
        ({**GOOD, "input": "circle " * 200}, 413),  # under the character cap, over the model's context
        ({**GOOD, "input": [{"type": "image", "image": "%%%"}]}, 422),
    ]
    mixed = _answers(served, [*good, *(p for p, _ in poisons)])
    for (status, doc), (_, ref) in zip(mixed[:len(good)], alone):
        assert status == 200, doc
        _same_document(doc, ref)
    for (status, doc), (_, expected) in zip(mixed[len(good):], poisons):
        assert status == expected, doc
        if status != 200:
            assert set(doc["error"]) == ERROR_KEYS, doc
