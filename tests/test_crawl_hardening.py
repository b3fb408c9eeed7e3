"""Crawl hardening: https pinned to the checked address (SNI and certificate on the host name),
a per-host limit that holds across the crawl processes of a Ray job, img2dataset's
keep_ratio_largest resize mode.

Real servers on 127.0.0.x (TLS with certificates made here by `cryptography`); names such as
`pinned.test` resolve only through the resolver injected into the Fetcher, so a connection that
skipped the pinned address would fail to resolve instead of passing.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from _curate_helpers import image_bytes
from PIL import Image

from pipelines.curate.config import CrawlConfig, CurateConfig
from pipelines.curate.crawl import Fetcher, HostSlots, ImageProcessor, LocalHostSlots, Refused

BODY = image_bytes("PNG", (32, 32), 7)


# ---------------------------------------------------------------------------------------------- servers


class Server:
    """A threaded HTTP(S) server on `ip`; records (server ip, Host header, SNI) per request and the
    most requests in flight at once per Host name. Paths: /sync waits for `parties` callers
    (lines Ray tasks up), anything else answers BODY after `delay_s`."""

    def __init__(self, ip: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None,
                 delay_s: float = 0.0, parties: int = 1):
        self.requests: list[tuple[str, str, str | None]] = []
        self.sni: list[str | None] = []
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(parties, timeout=120)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path == "/sync":
                    server.barrier.wait()
                    return self._send(b"go")
                name = self.headers.get("Host", "").rsplit(":", 1)[0]
                with server.lock:
                    server.requests.append((ip, self.headers.get("Host", ""), server.sni[-1] if server.sni else None))
                    server.active[name] = server.active.get(name, 0) + 1
                    server.max_active[name] = max(server.max_active.get(name, 0), server.active[name])
                time.sleep(delay_s)
                with server.lock:
                    server.active[name] -= 1
                self._send(BODY)

            def _send(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((ip, port), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------- TLS pinning


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A test CA and certificates (signed by it) for pinned.test and other.test; no IP names."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name: str, key, issuer_name, issuer_key, ca: bool, san: list[str]):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(issuer_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in san]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dreamcore test CA")])
    ca = cert("dreamcore test CA", ca_key, ca_name, ca_key, True, [])
    paths = {"ca": out / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    for host in ("pinned.test", "other.test"):
        key = ec.generate_private_key(ec.SECP256R1())
        (out / f"{host}.pem").write_bytes(cert(host, key, ca_name, ca_key, False, [host]).public_bytes(pem))
        (out / f"{host}.key").write_bytes(key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        paths[host] = out / host
    return paths


def _tls(pki: dict[str, Path], host: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{pki[host]}.pem", f"{pki[host]}.key")
    return ctx


class Resolver:
    """DNS for the test: answers[0] on the first call, answers[1] on every later one (rebinding)."""

    def __init__(self, *answers: str):
        self.answers, self.calls = answers, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return [self.answers[min(len(self.calls), len(self.answers)) - 1]]


def test_https_connects_to_the_checked_address_with_sni_and_certificate_of_the_host_name(pki):
    cfg = CrawlConfig(allow_private_networks=True, timeout_s=5.0, retries=0)
    with Server("127.0.0.1", tls=_tls(pki, "pinned.test")) as a, \
            Server("127.0.0.2", a.port, tls=_tls(pki, "pinned.test")) as b:
        url = f"https://pinned.test:{a.port}/img.png"
        dns = Resolver("127.0.0.1", "127.0.0.2")  # the answer changes after the check
        fetcher = Fetcher(cfg, resolve=dns, verify=str(pki["ca"]), slots=LocalHostSlots())
        assert fetcher.fetch(url).body == BODY
        # One resolution (the check); the socket went to its answer; TLS named the host, and the
        # certificate (no IP in it) verified against that name.
        assert dns.calls == ["pinned.test"] and b.requests == []
        assert a.requests == [("127.0.0.1", f"pinned.test:{a.port}", "pinned.test")]
        # The next fetch is checked again and goes where that check says, never elsewhere.
        assert fetcher.fetch(url).body == BODY
        assert dns.calls == ["pinned.test"] * 2 and len(a.requests) == 1
        assert b.requests == [("127.0.0.2", f"pinned.test:{a.port}", "pinned.test")]

        # A certificate for another name fails, though the address is the right one.
        other = Fetcher(cfg, resolve=Resolver("127.0.0.1"), verify=str(pki["ca"]), slots=LocalHostSlots())
        with pytest.raises(Refused) as e:
            other.fetch(f"https://other.test:{a.port}/img.png")
        assert e.value.reason == "connection_error" and "other.test" in e.value.error
        assert a.sni[-1] == "other.test" and len(a.requests) == 1  # SNI carried the name; no request served

        # The SSRF guard decides before any connection: loopback refused on public-web settings.
        public = Fetcher(CrawlConfig(retries=0), resolve=Resolver("127.0.0.1"), verify=str(pki["ca"]))
        with pytest.raises(Refused) as e:
            public.fetch(url)
        assert e.value.reason == "ssrf_refused" and len(a.requests) == 1


def test_https_with_a_server_certificate_for_another_name_is_refused(pki):
    cfg = CrawlConfig(allow_private_networks=True, timeout_s=5.0, retries=0)
    with Server("127.0.0.1", tls=_tls(pki, "other.test")) as srv:
        fetcher = Fetcher(cfg, resolve=Resolver("127.0.0.1"), verify=str(pki["ca"]), slots=LocalHostSlots())
        with pytest.raises(Refused) as e:
            fetcher.fetch(f"https://pinned.test:{srv.port}/img.png")
    assert e.value.reason == "connection_error" and "certificate" in e.value.error.lower()
    assert srv.sni == ["pinned.test"] and srv.requests == []


# ---------------------------------------------------------------------------------------------- per-host limit


def test_host_slots_bound_release_and_lease_expiry_without_ray():
    async def run() -> None:
        slots = HostSlots()
        first = await slots.acquire("a.test", 1, lease_s=30.0)
        await slots.acquire("b.test", 1, lease_s=30.0)  # another host has its own slots
        waiter = asyncio.create_task(slots.acquire("a.test", 1, lease_s=0.3))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # a.test is at its limit
        await slots.release("a.test", first)
        await asyncio.wait_for(waiter, 1.0)  # a release wakes the waiter
        # The holder of `waiter` never releases (a crashed worker): its lease frees the slot.
        t0 = time.monotonic()
        await asyncio.wait_for(slots.acquire("a.test", 1, lease_s=30.0), 5.0)
        assert 0.1 < time.monotonic() - t0 < 2.0 and slots.stats()["expired"] == 1

    asyncio.run(run())


def _crawl_in_ray_tasks(base_port: int, limit: int, shared: bool, ray) -> list[int]:
    """2 Ray tasks, each 12 fetches (2 hosts) on 6 threads, started together through /sync."""

    def task(port: int, limit: int, shared: bool) -> int:
        import urllib.request
        from concurrent.futures import ThreadPoolExecutor

        from pipelines.curate.config import CrawlConfig
        from pipelines.curate.crawl import Fetcher, LocalHostSlots, RayHostSlots

        cfg = CrawlConfig(allow_private_networks=True, per_host_concurrency=limit, timeout_s=10.0, retries=0)
        slots = None if shared else LocalHostSlots()
        fetcher = Fetcher(cfg, resolve=lambda host, p: ["127.0.0.1"], slots=slots)
        assert isinstance(fetcher.slots, RayHostSlots if shared else LocalHostSlots)
        urls = [f"http://{h}:{port}/{i}" for i in range(6) for h in ("a.test", "b.test")]
        urllib.request.urlopen(f"http://127.0.0.1:{port}/sync", timeout=120).read()
        with ThreadPoolExecutor(6) as pool:
            return sum(f.body == BODY for f in pool.map(fetcher.fetch, urls))

    remote = ray.remote(num_cpus=0.5)(task)
    return ray.get([remote.remote(base_port, limit, shared) for _ in range(2)])


def test_per_host_limit_holds_across_ray_tasks(ray_session):
    limit = 2
    with Server(delay_s=0.3, parties=2) as srv:
        assert _crawl_in_ray_tasks(srv.port, limit, True, ray_session) == [12, 12]
    assert set(srv.max_active) == {"a.test", "b.test"}
    assert srv.max_active == {"a.test": limit, "b.test": limit}  # never above, and reached

    # The control: per-process limits let two processes reach up to twice the limit per host.
    with Server(delay_s=0.3, parties=2) as srv:
        assert _crawl_in_ray_tasks(srv.port, limit, False, ray_session) == [12, 12]
    assert max(srv.max_active.values()) > limit, srv.max_active


def test_host_slots_actor_ends_itself_when_idle(ray_session):
    from pipelines.curate.crawl import NAMESPACE, RayHostSlots

    ray = ray_session
    slots = RayHostSlots(lease_s=5.0, idle_s=1.0, name="dreamcore-test-idle-host-slots")
    with slots.hold("a.test", 1):
        assert ray.get(slots.actor.stats.remote())["held"] == 1
    actor = ray.get_actor("dreamcore-test-idle-host-slots", namespace=NAMESPACE)
    released = time.monotonic() + 10  # release is fire-and-forget: it lands shortly after
    while ray.get(actor.stats.remote())["held"] and time.monotonic() < released:
        time.sleep(0.05)
    assert ray.get(actor.stats.remote())["held"] == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor("dreamcore-test-idle-host-slots", namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the idle HostSlots actor is still alive after 30 s")
    with slots.hold("a.test", 1):  # a later fetch makes a new one
        pass


# ---------------------------------------------------------------------------------------------- resize


def test_keep_ratio_largest_bounds_the_longest_side():
    jpeg = image_bytes("JPEG", (640, 480), 3)
    sizes = {}
    for mode in ("keep_ratio_largest", "keep_ratio"):
        out = ImageProcessor(CrawlConfig(resize_mode=mode), 256)(jpeg)
        assert Image.open(io.BytesIO(out["data"])).size == (out["width"], out["height"])
        assert (out["orig_width"], out["orig_height"]) == (640, 480)
        sizes[mode] = (out["width"], out["height"])
    assert sizes == {"keep_ratio_largest": (256, 192), "keep_ratio": (341, 256)}
    cfg = CurateConfig()
    cfg.crawl.resize_mode = "keep_ratio_largest"
    CurateConfig(crawl=cfg.crawl)  # accepted by the config check


def _smooth_image(width: int, height: int, alpha: bool = False) -> Image.Image:
    """Gradients and a disc: content whose downscales agree across resamplers (noise would not)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.25) ** 2) * 120.0
    rgb = np.stack([x / width * 255, y / height * 255, 255 - disc - x / width * 100], axis=-1)
    arr = rgb.clip(0, 255).astype(np.uint8)
    if alpha:
        a = (x / width * 255).astype(np.uint8)[..., None]
        return Image.fromarray(np.concatenate([arr, a], axis=-1), "RGBA")
    return Image.fromarray(arr)


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG-alpha"])
def test_resize_matches_img2dataset_resizer(mode, fmt):
    """Same sizes as img2dataset's own Resizer for every mode, and the same picture (mean absolute
    difference under 3 of 255): the reduced-scale JPEG decode and the alpha matting change nothing
    a reader would see."""
    from img2dataset.resizer import Resizer as I2DResizer

    from pipelines.curate.crawl import sniff
    from pipelines.curate.resize import Resizer

    im = _smooth_image(640, 480, alpha=fmt == "PNG-alpha")
    buf = io.BytesIO()
    im.save(buf, format="PNG" if fmt == "PNG-alpha" else "JPEG", quality=95)
    body = buf.getvalue()
    ref_data, ref_w, ref_h, ref_ow, ref_oh, err = I2DResizer(
        image_size=96, resize_mode=mode, resize_only_if_bigger=False, encode_format="png",
        encode_quality=1)(io.BytesIO(body))
    assert err is None
    out = Resizer(96, mode, encode_format="png", encode_quality=1)(body, sniff(body), 640, 480)
    assert (out.width, out.height) == (ref_w, ref_h) and (ref_ow, ref_oh) == (640, 480)
    ours = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"), dtype=np.float32)
    ref = np.asarray(Image.open(io.BytesIO(ref_data)).convert("RGB"), dtype=np.float32)
    assert np.abs(ours - ref).mean() < 3.0
