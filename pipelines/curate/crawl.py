"""Image crawl: fetch, guard, verify, resize. Pure Python (threads), called per Ray Data block.

img2dataset's downloader is the floor (timeouts, retries with back-off, user agent token,
X-Robots-Tag opt-out, its resize modes (resize.py), sha256, sizes, a status for every
image). On top: an SSRF guard re-checked on every redirect (redirects are followed here, bounded),
a byte cap, a pixel cap read from the header before any full decode, content sniffing, truncation
checks, and a per-host concurrency bound. Every outcome is a reason string, never an exception.

Every connection (http and https) goes to the address the SSRF guard checked: the URL is
rewritten to that IP, and https keeps the hostname for SNI and certificate checks. The per-host
bound holds across every crawl process of a Ray job (one small named actor), and per process
outside Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import ipaddress
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import cv2
import imagehash
import requests
from PIL import Image

from .config import CrawlConfig
from .resize import ResizeError, Resizer

STAGE = "crawl"
USER_AGENT = "Mozilla/5.0 (compatible; dreamcore/0.1; +https://github.com/dreamcore/dreamcore)"
RETRY_STATUS = {429, 500, 502, 503, 504}


class Refused(Exception):
    """A URL or response this crawler will not take; `reason` is the manifest's reason name."""

    def __init__(self, reason: str, error: str, http_status: int = 0, retry_after: float | None = None):
        super().__init__(error)
        self.reason, self.error, self.http_status = reason, error, http_status
        self.retry_after = retry_after  # seconds, from the Retry-After header of an HTTP error


@dataclass
class Fetched:
    body: bytes
    http_status: int
    final_url: str


# ----------------------------------------------------------------------------------------------
# SSRF guard


Resolver = Callable[[str, int], list[str]]  # (host, port) -> addresses, as _resolve


def check_address(host: str, port: int, allow_private: bool, resolve: Resolver | None = None) -> str:
    """Resolve `host`; refuse private/loopback/link-local/multicast/reserved unless allowed.

    Link-local (169.254/16, fe80::/10: cloud metadata services) stays refused even when private
    networks are allowed: no demo or test needs it and it is the classic SSRF target.

    Returns one resolved address; requests connect to it, so a DNS answer that changes between
    check and connect (rebinding) cannot reach a refused address. `resolve` replaces the system
    resolver (tests; a custom DNS).
    """
    addresses = (resolve or _resolve)(host, port)
    for addr in addresses:
        ip = ipaddress.ip_address(addr.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip.is_link_local:
            raise Refused("ssrf_refused", f"{host} resolves to link-local address {ip}")
        bad = ip.is_private or ip.is_loopback or ip.is_multicast or ip.is_reserved or ip.is_unspecified
        if bad and not allow_private:
            raise Refused("ssrf_refused", f"{host} resolves to non-public address {ip}")
    return addresses[0]


_DNS_TTL_S = 60.0
_DNS_LOCK = threading.Lock()
_DNS: dict[tuple[str, int], tuple[float, list[str] | str]] = {}
_DNS_HOST_LOCKS: dict[tuple[str, int], threading.Lock] = {}


def _resolve(host: str, port: int) -> list[str]:
    """getaddrinfo with a short per-process cache (failures too): a host with many images is
    resolved once, and a resolver that times out (5 s offline) is waited for once, not per image."""
    key = (host, port)
    with _DNS_LOCK:
        host_lock = _DNS_HOST_LOCKS.setdefault(key, threading.Lock())
    with host_lock:
        hit = _DNS.get(key)
        if hit is None or hit[0] < time.monotonic():
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                hit = (time.monotonic() + _DNS_TTL_S, [info[4][0] for info in infos])
            except (socket.gaierror, UnicodeError, OSError) as e:
                hit = (time.monotonic() + _DNS_TTL_S, f"cannot resolve {host}: {e}")
            _DNS[key] = hit
    if isinstance(hit[1], str):
        raise Refused("dns_failure", hit[1])
    return hit[1]


def _pinned(url: str, allow_private: bool, resolve: Resolver | None = None) -> tuple[str, dict[str, str]]:
    """Check scheme and address; rewrite the URL to the checked IP, the host name in a Host header
    (for https, PinnedAdapter also takes SNI and the certificate check from that header)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused("bad_scheme", f"only http/https URLs are fetched, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise Refused("bad_url", f"URL {url!r} has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addr = check_address(parts.hostname, port, allow_private, resolve)
    host_header = parts.netloc.rsplit("@", 1)[-1]
    ip_host = f"[{addr}]" if ":" in addr else addr
    netloc = f"{ip_host}:{parts.port}" if parts.port else ip_host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), {"Host": host_header}


class PinnedAdapter(requests.adapters.HTTPAdapter):
    """Connects https to the checked IP in the URL while TLS uses the Host header's name: SNI and
    certificate verification against the host name, the socket to the address the guard passed."""

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str, cert: object = None
    ) -> tuple[dict, dict]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        name = urlsplit("//" + request.headers.get("Host", "")).hostname
        if host_params["scheme"] == "https" and name:
            # Part of urllib3's pool key: a pool (and its kept-alive sockets) serves one name only.
            pool_kwargs.update(server_hostname=name, assert_hostname=name)
        return host_params, pool_kwargs


# ----------------------------------------------------------------------------------------------
# Per-host concurrency: across the whole Ray job (HostSlots actor), or per process outside Ray

_HOST_LOCK = threading.Lock()
_HOST_SEMAPHORES: dict[tuple[str, int], threading.BoundedSemaphore] = {}


def _host_slot(host: str, limit: int) -> threading.BoundedSemaphore:
    with _HOST_LOCK:
        key = (host, limit)
        if key not in _HOST_SEMAPHORES:
            _HOST_SEMAPHORES[key] = threading.BoundedSemaphore(limit)
        return _HOST_SEMAPHORES[key]


class LocalHostSlots:
    """Per-process bound: shared by every thread and block of one worker process."""

    @contextlib.contextmanager
    def hold(self, host: str, limit: int) -> Iterator[None]:
        with _host_slot(host, limit):
            yield

    def keep_for(self, host: str | None) -> None:
        """A local slot costs nothing to take again: never kept (see RayHostSlots.keep_for)."""


class HostSlots:
    """A counting semaphore per host, with leases: a slot whose holder died (a crashed worker)
    frees itself after `lease_s`. Plain asyncio, so it runs (and is tested) without Ray; a job
    hosts one as a detached Ray actor (RayHostSlots), which ends itself after `idle_s` with no
    calls and no leases: no driver owns it (job.py never sees it), so nothing else would."""

    def __init__(self, idle_s: float | None = None):
        self.leases: dict[str, dict[str, float]] = {}  # host -> {lease id: expiry (monotonic)}
        self.users: dict[str, int] = {}  # host -> acquire calls in progress (waiting included)
        self.conds: dict[str, asyncio.Condition] = {}
        self.expired = 0
        self.idle_s = idle_s
        self.last_call = time.monotonic()
        self._watch: asyncio.Task | None = None

    async def acquire(self, host: str, limit: int, lease_s: float) -> str:
        self._touch()
        cond = self.conds.setdefault(host, asyncio.Condition())
        self.users[host] = self.users.get(host, 0) + 1  # no await since setdefault: release sees it
        try:
            async with cond:
                held = self.leases.setdefault(host, {})
                while True:
                    now = time.monotonic()
                    for lease in [k for k, t in held.items() if t <= now]:
                        del held[lease]
                        self.expired += 1
                    if len(held) < max(limit, 1):
                        lease = uuid.uuid4().hex
                        held[lease] = now + lease_s
                        return lease
                    try:  # woken by a release, or when the first lease expires
                        await asyncio.wait_for(cond.wait(), timeout=min(held.values()) - now)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self.users[host] -= 1

    async def release(self, host: str, lease: str) -> None:
        self._touch()
        cond = self.conds.get(host)
        if cond is None:
            return
        async with cond:
            held = self.leases.get(host, {})
            held.pop(lease, None)
            if self.users.get(host):
                cond.notify()
            elif not held:  # millions of hosts pass through a crawl: keep state for busy ones only
                for table in (self.leases, self.users, self.conds):
                    table.pop(host, None)

    def stats(self) -> dict[str, int]:
        return {"hosts": len(self.conds), "held": sum(map(len, self.leases.values())), "expired": self.expired}

    def _touch(self) -> None:
        self.last_call = time.monotonic()
        if self.idle_s is not None and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._exit_when_idle())

    async def _exit_when_idle(self) -> None:
        import ray

        def busy() -> bool:  # recent calls, or a lease not yet expired (a crashed holder's expires)
            now = time.monotonic()
            return now - self.last_call < self.idle_s or any(
                t > now for held in self.leases.values() for t in held.values())

        while busy():
            await asyncio.sleep(min(self.idle_s, 30.0))
        ray.get_runtime_context().current_actor.__ray_terminate__.remote()


NAMESPACE = "dreamcore-crawl"  # detached actors need a named namespace to be found again


class RayHostSlots:
    """Client of the job's HostSlots actor: one round trip to acquire, a fire-and-forget release.
    Falls back to the per-process bound if the actor cannot be reached: the limiter never loses
    a fetch."""

    def __init__(self, lease_s: float, idle_s: float = 600.0, name: str | None = None,
                 reuse_s: float | None = None):
        self.lease_s, self.idle_s, self.name = lease_s, idle_s, name
        # A kept lease is used again only while young enough that a whole hop still ends inside it:
        # host_slots' lease_s is a hop's longest time plus 5 s, so reuse stays well inside that slack.
        self.reuse_s = min(2.0, lease_s / 5) if reuse_s is None else reuse_s
        self.actor = None
        self.local = LocalHostSlots()
        self._thread = threading.local()  # per thread: the host its next fetch goes to; a kept lease

    def keep_for(self, host: str | None) -> None:
        """Declare the host of this thread's next fetch (None: no next fetch). A hop to the same
        host keeps its lease for that fetch (one actor round trip saved per image); any other lease
        is released now. Only a thread that is about to fetch from a host holds its slot, so a kept
        slot never waits on anything and the job-wide bound stays exact."""
        self._thread.next_host = host
        kept = getattr(self._thread, "kept", None)
        if kept is not None and kept[0] != host:
            self._thread.kept = None
            kept[2].release.remote(kept[0], kept[3])

    def _actor(self) -> Any:  # a Ray ActorHandle of HostSlots
        import ray

        if self.actor is None:
            # One per job: every crawl task of the job finds it by name; the first creates it.
            name = self.name or f"dreamcore-crawl-host-slots-{ray.get_runtime_context().get_job_id()}"
            self.actor = ray.remote(HostSlots).options(
                name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
                max_concurrency=1000,
            ).remote(self.idle_s)
        return self.actor

    def _acquire(self, host: str, limit: int) -> tuple[Any, str] | None:
        import ray

        for _ in range(2):  # a second try covers an actor that exited (idle) or died
            actor = self._actor()
            try:
                return actor, ray.get(actor.acquire.remote(host, limit, self.lease_s))
            except ray.exceptions.RayActorError:
                self.actor = None
        return None

    @contextlib.contextmanager
    def hold(self, host: str, limit: int) -> Iterator[None]:
        kept, self._thread.kept = getattr(self._thread, "kept", None), None
        if kept is not None and kept[:2] == (host, limit) and time.monotonic() - kept[4] < self.reuse_s:
            actor, lease, since = kept[2], kept[3], kept[4]
        else:
            if kept is not None:
                kept[2].release.remote(kept[0], kept[3])
            got = self._acquire(host, limit)
            if got is None:
                with self.local.hold(host, limit):
                    yield
                return
            (actor, lease), since = got, time.monotonic()
        keep = False
        try:
            yield
            keep = getattr(self._thread, "next_host", None) == host
        finally:
            if keep:
                self._thread.kept = (host, limit, actor, lease, since)
            else:
                actor.release.remote(host, lease)


def host_slots(cfg: CrawlConfig) -> LocalHostSlots | RayHostSlots:
    """The job-wide bound inside a Ray job; the per-process one elsewhere (no Ray import)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        # A hop holds its slot at most: connect + headers (timeout each) + body deadline
        # (2 x timeout, checked per chunk read of up to one timeout); then the lease frees it.
        return RayHostSlots(lease_s=5 * cfg.timeout_s + 5)
    return LocalHostSlots()


# ----------------------------------------------------------------------------------------------
# Fetch


def robots_opt_out(values: list[str], directives: list[str], token: str | None) -> str | None:
    """X-Robots-Tag as img2dataset reads it: `noai`, or `<agent>: noai` for our token."""
    wanted = {d.lower() for d in directives}
    for value in values:
        for item in value.split(","):
            item = item.strip().lower()
            if ":" in item:
                agent, item = (s.strip() for s in item.split(":", 1))
                if agent not in ("*", (token or "").lower(), "dreamcore"):
                    continue
            for word in item.split():
                if word in wanted:
                    return word
    return None


class Fetcher:
    """One requests.Session per thread; fetch() follows redirects itself, re-checking each hop.

    `resolve` replaces the system resolver, `verify` is requests' (True, or a CA bundle path),
    `slots` the per-host bound (default: host_slots(cfg)); tests inject all three.
    """

    def __init__(self, cfg: CrawlConfig, resolve: Resolver | None = None, verify: bool | str = True,
                 slots: LocalHostSlots | RayHostSlots | None = None):
        self.cfg = cfg
        self.user_agent = USER_AGENT + (f" {cfg.user_agent_token}" if cfg.user_agent_token else "")
        self.resolve, self.verify = resolve, verify
        self.slots = slots or host_slots(cfg)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # no proxies from the environment: the guard checks the real peer
            s.verify = self.verify
            adapter = PinnedAdapter(pool_connections=8, pool_maxsize=8, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
        return s

    def fetch(self, url: str) -> Fetched:
        cfg = self.cfg
        attempt = 0
        while True:
            try:
                return self._fetch_once(url)
            except Refused as e:
                retryable = e.reason in ("timeout", "connection_error") or e.http_status in RETRY_STATUS
                if not retryable or attempt >= cfg.retries:
                    raise
                delay = min(cfg.backoff_s * (2**attempt), cfg.max_backoff_s)
                if e.retry_after is not None:
                    delay = min(max(e.retry_after, 0.0), cfg.max_backoff_s)
                time.sleep(delay)
                attempt += 1

    def _fetch_once(self, url: str) -> Fetched:
        cfg = self.cfg
        current = url
        for _hop in range(cfg.max_redirects + 1):
            target, extra = _pinned(current, cfg.allow_private_networks, self.resolve)
            host = urlsplit(current).hostname or ""
            headers = {"User-Agent": self.user_agent, **extra}
            with self.slots.hold(host, cfg.per_host_concurrency):
                try:
                    resp = self._session().get(
                        target, headers=headers, timeout=cfg.timeout_s, stream=True,
                        allow_redirects=False,
                    )
                except requests.exceptions.Timeout as e:
                    raise Refused("timeout", f"{current}: {e}") from None
                except requests.exceptions.RequestException as e:
                    raise Refused("connection_error", f"{current}: {e}") from None
                with resp:
                    if resp.is_redirect:
                        location = resp.headers.get("Location", "")
                        if not location:
                            raise Refused("bad_redirect", f"{current}: redirect without Location")
                        current = urljoin(current, location)
                        continue
                    if resp.status_code != 200:
                        ra = resp.headers.get("Retry-After", "")
                        retry_after = float(ra) if ra.replace(".", "", 1).isdigit() else None
                        raise Refused(f"http_{resp.status_code}", f"{current}: HTTP {resp.status_code}",
                                      resp.status_code, retry_after)
                    word = robots_opt_out(
                        resp.raw.headers.getlist("X-Robots-Tag"),  # every header line, not one joined
                        cfg.disallowed_header_directives, cfg.user_agent_token,
                    )
                    if word:
                        raise Refused("robots_opt_out", f"{current}: X-Robots-Tag {word}", 200)
                    declared = resp.headers.get("Content-Length", "")
                    if declared.isdigit() and int(declared) > cfg.max_bytes:
                        raise Refused("too_many_bytes", f"{current}: Content-Length {declared} > {cfg.max_bytes}", 200)
                    body = self._read_capped(resp, current)
                    return Fetched(body, 200, current)
        raise Refused("too_many_redirects", f"{url}: more than {cfg.max_redirects} redirects")

    def _read_capped(self, resp: requests.Response, url: str) -> bytes:
        buf = bytearray()
        # requests' timeout bounds each socket read; a server trickling bytes needs a deadline too.
        deadline = time.monotonic() + 2 * self.cfg.timeout_s
        try:
            for chunk in resp.iter_content(1 << 16):
                buf += chunk
                if time.monotonic() > deadline:
                    raise Refused("timeout", f"{url}: body not complete within {2 * self.cfg.timeout_s} s")
                if len(buf) > self.cfg.max_bytes:
                    raise Refused("too_many_bytes", f"{url}: body over {self.cfg.max_bytes} bytes", 200)
        except requests.exceptions.RequestException as e:
            # A read timeout or a connection cut mid-body.
            reason = "timeout" if "timed out" in str(e).lower() else "connection_error"
            raise Refused(reason, f"{url}: {e}") from None
        return bytes(buf)


# ----------------------------------------------------------------------------------------------
# Verify and resize

MAGIC = {
    "jpeg": lambda b: b[:3] == b"\xff\xd8\xff",
    "png": lambda b: b[:8] == b"\x89PNG\r\n\x1a\n",
    "webp": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP",
    "gif": lambda b: b[:6] in (b"GIF87a", b"GIF89a"),
}


def sniff(body: bytes) -> str | None:
    for fmt, test in MAGIC.items():
        if test(body):
            return fmt
    return None


def truncated(fmt: str, body: bytes) -> bool:
    """Decoders often return a half-grey image for a cut file; check the end markers instead."""
    if fmt == "jpeg":
        return b"\xff\xd9" not in body[-4096:]
    if fmt == "png":
        return b"IEND" not in body[-64:]
    if fmt == "webp":
        return int.from_bytes(body[4:8], "little") + 8 > len(body)
    return False


class ImageProcessor:
    """Sniff, check truncation, read dimensions from the header, then resize (img2dataset's modes)."""

    def __init__(self, cfg: CrawlConfig, image_size: int):
        self.cfg = cfg
        self.resizer = Resizer(image_size, cfg.resize_mode, cfg.resize_only_if_bigger, cfg.encode_format,
                               cfg.encode_quality)

    def __call__(self, body: bytes) -> dict:
        cfg = self.cfg
        fmt = sniff(body)
        if fmt is None or fmt not in cfg.allowed_formats:
            head = body[:16]
            raise Refused("not_an_image", f"body is not an allowed image ({', '.join(cfg.allowed_formats)}); "
                          f"starts with {head!r}", 200)
        if truncated(fmt, body):
            raise Refused("truncated_image", f"{fmt} body of {len(body)} bytes is cut short", 200)
        try:
            with Image.open(io.BytesIO(body)) as im:  # lazy: parses the header only
                width, height = im.size
        except Image.DecompressionBombError as e:
            raise Refused("too_many_pixels", str(e), 200) from None
        except Exception as e:  # noqa: BLE001 - any header parse failure is a decode error
            raise Refused("decode_error", f"cannot read the {fmt} header: {e}", 200) from None
        if width * height > cfg.max_pixels:
            raise Refused("too_many_pixels", f"{width}x{height} declared > {cfg.max_pixels} pixels", 200)
        try:
            out = self.resizer(body, fmt, width, height)
        except ResizeError as e:
            raise Refused("decode_error", f"resize failed: {e}", 200) from None
        phash = str(imagehash.phash(Image.fromarray(cv2.cvtColor(out.pixels, cv2.COLOR_BGR2RGB))))
        return {
            "data": out.data, "width": out.width, "height": out.height, "orig_width": width, "orig_height": height,
            "phash": phash, "sha256": hashlib.sha256(body).hexdigest(), "num_bytes": len(body),
        }


def read_dataset_image(path: str, max_bytes: int) -> bytes:
    """An image file of the dataset (local path or object-store URI), at most `max_bytes`."""
    from dreamcore import storage

    fs, p = storage.filesystem(path)
    try:
        with fs.open_input_file(p) as f:
            if f.size() > max_bytes:
                raise Refused("too_many_bytes", f"{path}: {f.size()} bytes > crawl.max_bytes={max_bytes}")
            return f.read()
    except (FileNotFoundError, OSError) as e:
        raise Refused("image_not_found", f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------
# A block of documents


def _host_of(url: Any) -> str | None:
    try:
        return urlsplit(url).hostname
    except (ValueError, TypeError, AttributeError):
        return None


class Crawler:
    """Crawls every kept image of a list of document rows, in place, with one thread pool."""

    def __init__(self, cfg: CrawlConfig, image_size: int):
        self.cfg = cfg
        self.fetcher = Fetcher(cfg)
        self.processor = ImageProcessor(cfg, image_size)
        # One pool for the life of the crawler (a Ray worker's process): its threads keep their
        # requests sessions, so keep-alive connections outlive a block instead of one per thread
        # per block.
        self._pool: ThreadPoolExecutor | None = None

    def crawl_image(self, image: dict) -> None:
        try:
            source = image.get("source") or "web"
            if source == "embedded":  # the shard carried the bytes (img2dataset): nothing to fetch
                body = image["data"]
            elif source == "dataset":  # instruction data's own image files, never a web document's
                body = read_dataset_image(image["url"], self.cfg.max_bytes)
            else:
                fetched = self.fetcher.fetch(image["url"])
                image["http_status"] = fetched.http_status
                body = fetched.body
            image.update(self.processor(body))
        except Refused as e:
            image.update(drop_stage=STAGE, reason=e.reason, error=e.error[:500], http_status=e.http_status)
        except Exception as e:  # noqa: BLE001 - one bad image must never lose the block
            image.update(drop_stage=STAGE, reason="crawl_error", error=f"{type(e).__name__}: {e}"[:500])

    def _worker(self, todo: Iterator[dict], lock: threading.Lock) -> None:
        """Takes the next image before crawling this one, so the host slot of a fetch is kept
        only when this same thread fetches from that host next (see RayHostSlots.keep_for)."""
        slots = self.fetcher.slots
        with lock:
            image = next(todo, None)
        try:
            while image is not None:
                with lock:
                    following = next(todo, None)
                slots.keep_for(_host_of(following["url"]) if following is not None else None)
                self.crawl_image(image)
                image = following
        finally:
            slots.keep_for(None)

    def crawl_docs(self, docs: list[dict]) -> list[dict]:
        todo = [img for d in docs if not d["drop_stage"] for img in d["images"] if not img["drop_stage"]]
        if todo:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.cfg.threads, thread_name_prefix="crawl")
            items, lock = iter(todo), threading.Lock()
            futures = [self._pool.submit(self._worker, items, lock)
                       for _ in range(min(self.cfg.threads, len(todo)))]
            for f in futures:
                f.result()
        return docs
