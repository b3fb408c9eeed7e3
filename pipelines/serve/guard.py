"""The first thing every HTTP request meets: a request id, the Bearer key and the body limit.

An ASGI middleware, because FastAPI reads and validates a body before any route code runs: a key
checked inside a route is checked after a 100 MB body from anyone was read and parsed. Here a
request to /v1/* without the key gets 401 before one byte of its body is read; a declared
Content-Length over the limit gets 413 at once, and a body that grows past the limit while it
streams in gets 413 when it crosses it. Every answer carries `X-Request-Id`: Serve's HTTP proxy
takes the caller's or makes one, puts it in the request headers and answers it, so Serve's access
log and ours share it (outside Serve the guard makes and answers it). A failure no route handled is
logged with its traceback under that id and answered with a message and the id only: no pid,
actor id, path or traceback ever reaches the caller.

The settings come from the Ingress replica (`app.state.guard`), which reads the key at start.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from pipelines.serve.api import error_body

log = logging.getLogger("ray.serve")

# Routes anyone may call: liveness for load balancers, and the API's own documentation.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


@dataclass(frozen=True)
class GuardSettings:
    """What the guard enforces; `api_key` None means loopback clients only (no key configured)."""

    api_key: str | None
    api_key_env: str
    max_body_bytes: int


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body crosses the limit.

    An HTTPException so FastAPI passes it through its body parsing (it turns any other exception
    there into a 400) to the app's handler, which answers 413 in the one error shape.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body: the request body is larger than {limit} bytes (the server's limits.max_body_bytes)")


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def request_id(headers: dict[bytes, bytes]) -> tuple[str, bool]:
    """(the request's id, whether it is new here): Serve's proxy id (the caller's own, or one it made),
    else a new one, which the guard then answers itself."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
    return (given, False) if given else (f"req-{uuid.uuid4().hex[:20]}", True)


def key_matches(header: bytes, key: str) -> bool:
    """`Authorization: Bearer <key>`, compared as bytes in constant time (any header bytes are safe)."""
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), key.encode())


class RequestGuard:
    """ASGI middleware: request id, auth and body limit before the app; internals never answered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid, new = request_id(headers)
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if new:  # else Serve's proxy answers the id itself
                    message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        settings: GuardSettings | None = getattr(scope["app"].state, "guard", None) if "app" in scope else None
        refusal = self.refusal(scope, headers, settings)
        if refusal is not None:
            status, message, extra = refusal
            await answer(send_with_id, status, message, rid, extra)
            return
        assert settings is not None  # refusal() refuses without settings
        limit, received = settings.max_body_bytes, 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except BodyTooLarge as e:  # raised outside FastAPI's handlers (a route reading the body itself)
            if not started:
                await answer(send_with_id, 413, str(e.detail), rid)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if not started:
                await answer(send_with_id, 500, f"the server failed on this request; it is logged under request id "
                             f"{rid}; retry, and report the id if it keeps failing", rid)

    @staticmethod
    def refusal(scope: dict[str, Any], headers: dict[bytes, bytes], settings: GuardSettings | None
                ) -> tuple[int, str, dict[str, str]] | None:
        """(status, message, headers) when the request must not reach the app, else None."""
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # the app's route prefix, when Serve mounts it under one
            path = path[len(root):] or "/"
        if path in OPEN_PATHS:
            return None
        if settings is None:
            return 503, "the server is starting; retry", {"Retry-After": "1"}
        if settings.api_key is None:
            client = (scope.get("client") or (None,))[0]
            if not is_loopback(client):
                return (403, f"this server has no API key configured and answers loopback clients only (you are "
                        f"{client}); configure auth.api_key_file or ${settings.api_key_env} to serve others", {})
        elif not key_matches(headers.get(b"authorization", b""), settings.api_key):
            return 401, "missing or wrong Bearer key (send 'Authorization: Bearer <key>')", {"WWW-Authenticate": "Bearer"}
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return 400, "Content-Length: is not a number", {}
            if size > settings.max_body_bytes:
                return (413, f"body: the request body is {size} bytes, more than the server's limit of "
                        f"{settings.max_body_bytes} (limits.max_body_bytes)", {})
        return None


async def answer(send: Any, status: int, message: str, rid: str, headers: dict[str, str] | None = None) -> None:
    """Send a whole JSON error answer in the one error shape (without reading the request body)."""
    body = json.dumps(error_body(message, status, request_id=rid)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
