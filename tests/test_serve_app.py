"""The real Serve app on the session's local Ray, with a tiny checkpoint made here.

One Serve instance for the module (free port, zero-CPU replicas, short autoscaling delays),
shut down at the end so other modules can use Ray. Requests go over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from dreamcore import client

sys.path.insert(0, str(Path(__file__).parent))
from _serve_helpers import free_port, make_checkpoint  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

KEY = "test-key-0123456789"
CHECKPOINT: dict[str, Path] = {}  # the served checkpoint's folder, for in-process comparisons


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from pipelines.serve import load_serve_config, shutdown, start_local

    tmp = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(tmp / "ckpt")
    CHECKPOINT["path"] = ckpt
    key_file = tmp / "api-key"
    key_file.write_text(KEY + "\n")
    cfg = load_serve_config(None, [
        # Zero-CPU replicas: the session's Ray has 2 CPUs shared with other modules.
        "llm.num_cpus=0", "decoder.num_cpus=0", "ingress.num_cpus=0",
        # The decoder scales on image load within seconds; the LLM has room for all (never scales).
        "decoder.autoscaling.min_replicas=1", "decoder.autoscaling.max_replicas=2",
        "decoder.autoscaling.target_ongoing_requests=1", "decoder.autoscaling.upscale_delay_s=0.5",
        "decoder.autoscaling.look_back_period_s=1", "decoder.autoscaling.metrics_interval_s=0.5",
        "decoder.autoscaling.downscale_delay_s=600", "decoder.max_ongoing_requests=4",
        "decoder.max_queued_requests=200",
        "llm.autoscaling.max_replicas=2", "llm.autoscaling.target_ongoing_requests=1000",
        "llm.autoscaling.upscale_delay_s=0.5", "llm.autoscaling.look_back_period_s=1",
        "llm.autoscaling.metrics_interval_s=0.5", "llm.max_ongoing_requests=64",
        # A small ingress queue so a burst overflows it (the 503 test).
        "ingress.autoscaling.max_replicas=1", "ingress.max_ongoing_requests=8",
        "ingress.max_queued_requests=4", "retry_after_s=3",
    ], checkpoint=str(ckpt), port=free_port(), auth={"api_key_file": str(key_file)})
    url = start_local(config=cfg, timeout_s=240)
    yield url
    shutdown()


def post(url: str, path: str, body: dict, key: str | None = KEY, timeout: float = 120):
    """(status, headers, json body) of a POST; 4xx/5xx are returned, not raised."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"raw": raw.decode("utf-8", "replace")}
        return e.code, dict(e.headers), data


def get(url: str, path: str, key: str | None = KEY):
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def png_image(part: dict) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(part["image"])))
    im.load()
    return im


GEN = {"input": "a red circle", "max_new_tokens": 40, "max_images": 2, "num_inference_steps": 3,
       "temperature": 1.0, "top_p": 1.0}


def test_generate_returns_interleaved_document_with_image(served):
    status, _, doc = post(served, "/v1/generate", {**GEN, "seed": 2})
    assert status == 200, doc
    kinds = [p["type"] for p in doc["parts"]]
    assert "image" in kinds and "text" in kinds, kinds
    for p in doc["parts"]:
        if p["type"] == "image":
            assert png_image(p).size == (16, 16) == (p["width"], p["height"])
    assert doc["usage"]["images"] == kinds.count("image") <= 2
    assert doc["finish_reason"] in ("eos", "length")
    # Same seed, same document (text sampling and image noise are seeded per request).
    assert post(served, "/v1/generate", {**GEN, "seed": 2})[2]["parts"] == doc["parts"]


def test_served_document_equals_the_in_process_one(served, tmp_path_factory):
    """One engine: the same prompt and seed give the same document over HTTP as from
    dreamcore.generate in this process, token for token and pixel for pixel (images fed back too)."""
    import numpy as np
    import torch

    from dreamcore.checkpoint import from_pretrained
    from dreamcore.engine import TextEngine, decode_dreams
    from dreamcore.generate import Document, GenerationParams, generate_document, text_to_images

    body = {**GEN, "seed": 2, "guidance_scale": 2.0}
    status, _, served_doc = post(served, "/v1/generate", body)
    assert status == 200, served_doc
    model, tok = from_pretrained(str(CHECKPOINT["path"]))
    params = GenerationParams(max_new_tokens=GEN["max_new_tokens"], max_images=GEN["max_images"],
                              temperature=GEN["temperature"], top_p=GEN["top_p"], seed=2,
                              num_inference_steps=GEN["num_inference_steps"], guidance_scale=2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a zero-CPU replica runs
    try:
        local = generate_document(model.eval(), tok, [GEN["input"]], params)
        engine, doc, token_ids = TextEngine(model, tok), Document([GEN["input"]], params), []
        while not doc.finished:  # the same loop, by hand: its token ids, finish reason and usage
            res = engine.continue_batch([doc.text_request()])[0]
            token_ids.append(res.token_ids)
            doc.add_text(res)
            if doc.wants_image:
                doc.add_image(decode_dreams(model.decoder, [doc.image_request()])[0])
        local_images = text_to_images(model, tok, ["a blue square"], num_inference_steps=3, guidance_scale=2.0,
                                      seed=11)
    finally:
        torch.set_num_threads(threads)
    kinds = [p["type"] for p in served_doc["parts"]]
    assert kinds == ["image" if isinstance(p, Image.Image) else "text" for p in local]
    assert kinds.count("image") >= 1, kinds  # the checkpoint is nudged to draw
    assert served_doc["finish_reason"] == doc.finish_reason
    assert served_doc["usage"] == {"prompt_tokens": doc.prompt_tokens, "completion_tokens": doc.completion_tokens,
                                   "images": doc.images}
    # Token for token: the served text is the decode of the same sampled ids, and as many were sampled.
    assert [p["text"] for p in served_doc["parts"] if p["type"] == "text"] == [tok.decode(i) for i in token_ids if i]
    for remote, mine in zip(served_doc["parts"], local):
        if remote["type"] == "text":
            assert remote["text"] == mine
        else:
            assert np.array_equal(np.asarray(png_image(remote).convert("RGB")), np.asarray(mine))
    images = post(served, "/v1/images", {"prompt": "a blue square", "n": 1, "seed": 11, "num_inference_steps": 3,
                                         "guidance_scale": 2.0})[2]["images"]
    assert np.array_equal(np.asarray(png_image(images[0]).convert("RGB")), np.asarray(local_images[0]))


def test_stream_yields_tokens_then_parts_in_order(served):
    events = list(client.stream(served, GEN["input"], KEY, **{k: v for k, v in GEN.items() if k != "input"},
                                seed=2))
    names = [e for e, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"part", "delta"}
    pending = ""  # per token: the deltas before a text part join up to it; none precede an image
    for event, data in events[:-1]:
        if event == "delta":
            pending += data["text"]
        else:
            assert pending == (data["text"] if data["type"] == "text" else "")
            pending = ""
    _, _, whole = post(served, "/v1/generate", {**GEN, "seed": 2})
    assert [d for e, d in events if e == "part"] == whole["parts"]
    assert events[-1][1]["usage"] == whole["usage"]


def test_client_cli_writes_html(served, tmp_path):
    from argparse import ArgumentParser

    p = ArgumentParser()
    client.add_arguments(p)
    out = tmp_path / "doc.html"
    args = p.parse_args(["a red circle", "--endpoint", served, "--output", str(out), "--api-key", KEY,
                         "--seed", "2", "--max-new-tokens", "40", "--steps", "3", "--temperature", "1",
                         "--top-p", "1"])
    assert client.main(args) == 0
    html = out.read_text()
    assert "data:image/png;base64," in html and "a red circle" in html
    args = p.parse_args(["x", "--endpoint", served, "--output", str(out), "--api-key", "wrong"])
    assert client.main(args) == 1


def test_images_endpoint_is_seeded(served):
    status, _, r = post(served, "/v1/images", {"prompt": "a blue square", "n": 2, "seed": 11,
                                               "num_inference_steps": 3})
    assert status == 200, r
    assert [i["seed"] for i in r["images"]] == [11, 12]
    assert r["images"][0]["image"] != r["images"][1]["image"]
    again = post(served, "/v1/images", {"prompt": "a blue square", "n": 1, "seed": 12, "num_inference_steps": 3})[2]
    assert again["images"][0]["image"] == r["images"][1]["image"]  # batch-independent seeding


@pytest.mark.parametrize("body, status, field", [
    ({"input": [{"type": "image", "image": "%%%"}]}, 422, "input[0].image"),
    ({"input": "a", "sampler": "ddim"}, 422, "sampler"),
    ({"input": "a", "max_images": 99}, 422, "max_images"),
    ({"input": "x" * 9000}, 413, "input"),
    ({"input": "circle " * 200}, 413, "input"),  # under the char cap, over the model's context
])
def test_bad_requests_get_4xx_naming_the_field(served, body, status, field):
    got, _, data = post(served, "/v1/generate", body)
    assert got == status, data
    assert data["error"]["param"] == field and "Traceback" not in json.dumps(data)


def test_auth_and_open_endpoints(served):
    assert post(served, "/v1/generate", GEN, key=None)[0] == 401
    status, headers, data = post(served, "/v1/generate", GEN, key="nope")
    assert status == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    assert get(served, "/v1/models", key=None)[0] == 401
    assert get(served, "/healthz", key=None) == (200, b'{"status":"ok"}')
    status, body = get(served, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "ckpt"
    status, body = get(served, "/openapi.json", key=None)
    assert status == 200 and {"/v1/generate", "/v1/images", "/v1/models", "/healthz"} <= set(json.loads(body)["paths"])
    assert get(served, "/docs", key=None)[0] == 200


def test_deployments_report_their_own_autoscaling(served):
    from pipelines.serve.app import deployment_status

    st = deployment_status("dreamcore")
    assert set(st) == {"LLMServer", "ImageDecoder", "Ingress"}
    assert st["ImageDecoder"]["autoscaling_config"]["target_ongoing_requests"] == 1
    assert st["ImageDecoder"]["autoscaling_config"]["max_replicas"] == 2
    assert st["LLMServer"]["autoscaling_config"]["target_ongoing_requests"] == 1000
    assert st["Ingress"]["autoscaling_config"]["max_replicas"] == 1


def test_decoder_scales_up_under_image_load_llm_does_not(served):
    from pipelines.serve.app import deployment_status

    stop = threading.Event()
    errors: list = []

    def load() -> None:
        while not stop.is_set():
            status, _, data = post(served, "/v1/images", {"prompt": "a red circle", "n": 2, "seed": 1,
                                                          "num_inference_steps": 40})
            if status != 200:
                errors.append((status, data))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 90
        st = deployment_status("dreamcore")
        while time.time() < deadline and len(st["ImageDecoder"]["running_replicas"]) < 2:
            time.sleep(1)
            st = deployment_status("dreamcore")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert len(st["ImageDecoder"]["running_replicas"]) == 2, st
    assert len(st["LLMServer"]["running_replicas"]) == 1, st
    assert not errors, errors[:3]


def test_killed_replica_is_replaced_and_endpoint_keeps_answering(served):
    import ray

    from pipelines.serve.app import deployment_status

    victim = deployment_status("dreamcore")["LLMServer"]["running_replicas"][0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    ok = False
    deadline = time.time() + 120
    while time.time() < deadline and not ok:  # 503 + Retry-After while Serve replaces it, then 200
        status, headers, data = post(served, "/v1/images", {"prompt": "a", "seed": 1, "num_inference_steps": 2})
        ok = status == 200
        if not ok:
            assert status == 503 and "retry-after" in {k.lower() for k in headers}, (status, data)
            time.sleep(1)
    assert ok
    running = deployment_status("dreamcore")["LLMServer"]["running_replicas"]
    assert running and victim not in running


def test_overload_answers_503_with_retry_after_quickly(served):
    body = {"prompt": "a red circle", "n": 2, "seed": 1, "num_inference_steps": 20}

    def one(_):
        t = time.time()
        status, headers, _ = post(served, "/v1/images", body, timeout=200)
        return status, headers, time.time() - t

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    rejected = [r for r in results if r[0] == 503]
    assert rejected, [r[0] for r in results]
    assert {r[0] for r in results} <= {200, 503}
    retry = [{k.lower(): v for k, v in r[1].items()}.get("retry-after") for r in rejected]
    assert all(v == "3" for v in retry), retry
    assert max(r[2] for r in rejected) < 5.0  # refused at once, not after queueing


def _llm_stats(url: str) -> dict:
    status, body = get(url, "/v1/stats")
    assert status == 200, body
    return json.loads(body)["llm"]["scheduler"]


def test_a_document_keeps_its_kv_cache_across_its_images(served):
    """Continuous batching with sessions: an image document's later rounds prefill only what is new,
    so it costs its own length in prefilled + decoded tokens, far fewer than re-prefilling the
    document every round (what the same rounds cost stateless, counted here in-process)."""
    import torch

    from dreamcore.checkpoint import from_pretrained
    from dreamcore.engine import TextEngine, decode_dreams
    from dreamcore.generate import Document, GenerationParams

    body = {**GEN, "seed": 2, "guidance_scale": 2.0}
    before = _llm_stats(served)
    status, _, doc = post(served, "/v1/generate", body)
    assert status == 200 and doc["usage"]["images"] >= 1, doc
    after = _llm_stats(served)
    spent = (after["prefill_tokens"] - before["prefill_tokens"]) + (after["decode_tokens"] - before["decode_tokens"])
    model, tok = from_pretrained(str(CHECKPOINT["path"]))
    engine = TextEngine(model.eval(), tok)
    params = GenerationParams(max_new_tokens=GEN["max_new_tokens"], max_images=GEN["max_images"],
                              temperature=GEN["temperature"], top_p=GEN["top_p"], seed=2,
                              num_inference_steps=GEN["num_inference_steps"], guidance_scale=2.0)
    local, stateless = Document([GEN["input"]], params), 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        while not local.finished:
            res = engine.continue_batch([local.text_request()])[0]
            stateless += res.prompt_tokens + res.new_tokens  # the whole document prefilled again, then decoded
            local.add_text(res)
            if local.wants_image:
                local.add_image(decode_dreams(model.decoder, [local.image_request()])[0])
    finally:
        torch.set_num_threads(threads)
    assert local.images == doc["usage"]["images"]
    assert spent < 0.8 * stateless, (spent, stateless)
    # No token is run twice: the rounds carry the ids they sampled (SampledText), so every round's
    # cache stays valid and each token of the document goes through the model once (all but the
    # last sampled one, which nothing reads).
    assert spent == res.prompt_tokens + res.new_tokens - 1, (spent, res.prompt_tokens, res.new_tokens)
    assert after["sessions"] == 0 and after["running"] == 0  # the finished document freed its cache


def test_a_client_that_disconnects_frees_its_slot(served):
    """Closing a stream mid-document cancels its work in the LLM replica; the next request is not delayed."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(served)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {**GEN, "max_new_tokens": 200, "max_images": 0, "stream": True, "seed": 5}
    conn.request("POST", "/v1/generate", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(6) == b"event:"  # the first event has started
    conn.sock.close()  # the client goes away after its first event
    conn.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        s = _llm_stats(served)
        if s["running"] == 0 and s["waiting"] == 0 and s["sessions"] == 0:
            break
        time.sleep(0.2)
    assert (s["running"], s["waiting"], s["sessions"]) == (0, 0, 0), s
    t = time.time()
    status, _, doc = post(served, "/v1/generate", {**GEN, "max_images": 0, "max_new_tokens": 8, "seed": 1})
    assert status == 200 and time.time() - t < 10, doc
