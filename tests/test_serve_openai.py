"""The OpenAI-compatible routes: the mapping alone, then the real `openai` client, and fuzzing of every
POST route (OpenAI's and the native ones) over HTTP.

Unit tests call pipelines/serve/openai_api.py directly (no Ray). The end-to-end tests start the
real Serve app on the session's Ray with the tiny nudged checkpoint of _serve_helpers (it draws an
image every few tokens), as tests/test_serve_app.py does, and call it with `openai.OpenAI`. The
fuzz tests draw request bodies from the app's own /openapi.json (valid ones and broken ones) and
send four at a time: every answer must be 200 or a 4xx/503 with OpenAI's error body.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from dreamcore.engine import Drawn
from pipelines.serve.api import RequestError, validation_error
from pipelines.serve.config import DefaultsConfig, LimitsConfig
from pipelines.serve.openai_api import (
    MAX_STOP,
    ChatCompletionBuilder,
    ChatCompletionRequest,
    ImageGenerationRequest,
    StopMatcher,
    chat_to_generate,
    check_chat,
    check_image_generation,
    from_request_error,
    is_openai_path,
)

sys.path.insert(0, str(Path(__file__).parent))
from _serve_helpers import post_raw, start_app  # noqa: E402

KEY = "openai-test-key-0123456789"
MODEL = "ckpt"  # the served model's id: the checkpoint folder's name


def png_b64(size: tuple[int, int] = (8, 8), color: str = "red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG_URL = "data:image/png;base64," + png_b64()


def chat(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, **body})


def plan_of(body: dict[str, Any], limits: LimitsConfig | None = None):
    return check_chat(chat(**body), MODEL, limits or LimitsConfig(), DefaultsConfig(), 20, 3.0, seed=7)


def refusal(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value


# ----------------------------------------------------------------------------------------------
# Mapping (pure)


def test_messages_become_the_document_prompt_in_order():
    plan = plan_of({"messages": [
        {"role": "system", "content": "You draw shapes."},
        {"role": "user", "content": [{"type": "text", "text": "like this:"},
                                     {"type": "image_url", "image_url": {"url": PNG_URL}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "here:"},
                                          {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}}]},
        {"role": "user", "content": "another"},
    ], "max_completion_tokens": 9, "max_tokens": 30, "temperature": 0, "top_p": 0.5, "seed": 3,
        "max_images": 1, "num_inference_steps": 5, "guidance_scale": 2.0, "stop": "."})
    kinds = [type(p).__name__ for p in plan.prompt]
    assert kinds == ["str", "str", "bytes", "str", "Drawn", "str"]
    assert plan.prompt[0] == "You draw shapes." and plan.prompt[-1] == "another"
    assert isinstance(plan.prompt[4], Drawn) and Image.open(io.BytesIO(plan.prompt[4].image)).size == (8, 8)
    p = plan.params  # max_completion_tokens wins over the deprecated max_tokens
    assert (p.max_new_tokens, p.max_images, p.temperature, p.top_p, p.seed) == (9, 1, 0.0, 0.5, 3)
    assert (p.num_inference_steps, p.guidance_scale, plan.stop, plan.include_usage) == (5, 2.0, ["."], False)
    # Left out: the server's defaults, as on /v1/generate.
    d = plan_of({"messages": [{"role": "user", "content": "hi"}], "stream": True,
                 "stream_options": {"include_usage": True}})
    assert (d.params.max_new_tokens, d.params.seed, d.params.num_inference_steps, d.include_usage) == (64, 7, 20, True)


@pytest.mark.parametrize("body, param, status", [
    ({"n": 2}, "n", 400),
    ({"model": "gpt-4o"}, "model", 404),
    ({"max_tokens": 100000}, "max_tokens", 400),
    ({"max_completion_tokens": 100000}, "max_completion_tokens", 400),
    ({"max_images": 50}, "max_images", 400),
    ({"num_inference_steps": 1000}, "num_inference_steps", 400),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({"stop": [""]}, "stop", 400),
    ({"messages": [{"role": "user", "content": "x" * 9000}]}, "messages", 400),
    ({"messages": [{"role": "user", "content": []}]}, "messages", 400),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "image_url", "image_url": {"url": "data:,%%%"}}]}]},
     "messages[0].content[1].image_url.url", 400),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}]},
     "messages[0].content[0].image_url.url", 400),
])
def test_refusals_name_the_openai_parameter(body, param, status):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    err = refusal(plan_of, body)
    got, out = from_request_error(err)
    assert (got, out["error"]["param"]) == (status, param), out
    assert out["error"]["message"].startswith(param) and out["error"]["type"] == "invalid_request_error"
    assert set(out["error"]) == {"message", "type", "param", "code"}


def test_url_images_are_never_fetched():
    err = refusal(plan_of, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
    assert "does not fetch" in err.message


def test_chat_maps_onto_the_native_request():
    native, roles, fields = chat_to_generate(chat(messages=[
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]}], max_tokens=5))
    assert [p.type for p in native.input] == ["text", "image"] and roles == ["system", "user"]
    assert native.max_new_tokens == 5 and fields["max_new_tokens"] == "max_tokens"
    assert fields["input[1].image"] == "messages[2].content[0].image_url.url"


def test_image_generation_checks():
    ok = ImageGenerationRequest(prompt="a red circle", n=2, size="16x16", response_format="b64_json", seed=4)
    assert check_image_generation(ok, MODEL, 16, LimitsConfig(), DefaultsConfig(), 20, 3.0, 1) == (
        "a red circle", 2, {"seed": 4, "num_inference_steps": 20, "guidance_scale": 3.0})
    for req, param, words in [
        (ImageGenerationRequest(prompt="a", size="1024x1024"), "size", "16x16"),
        (ImageGenerationRequest(prompt="a", response_format="url"), "response_format", "b64_json"),
        (ImageGenerationRequest(prompt="a", n=9), "n", "limit"),
        (ImageGenerationRequest(prompt="a", model="dall-e-3"), "model", MODEL),
    ]:
        err = refusal(check_image_generation, req, MODEL, 16, LimitsConfig(), DefaultsConfig(), 20, 3.0, 1)
        assert err.field == param and words in err.message, err


@pytest.mark.parametrize("body, param, code", [
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url", "missing_required_parameter"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
     "messages[0].content[0].x", "unknown_parameter"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs",
     "unknown_parameter"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "a"}], "stop": [1]}, "stop[0]", "invalid_type"),
    ({"model": MODEL, "messages": []}, "messages", "invalid_value"),
])
def test_schema_errors_in_openai_shape(body, param, code):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    errors = [{**x, "loc": ("body", *x["loc"])} for x in e.value.errors()]  # as FastAPI reports them
    err = validation_error(errors, 400)["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    assert err["message"].startswith(param)


def test_error_statuses_and_paths():
    assert from_request_error(RequestError("input", "bad", 422))[0] == 400
    status, body = from_request_error(RequestError("messages[0].content[0].image_url.url", "is 9 MB", 413))
    assert (status, body["error"]["code"]) == (400, "request_too_large")
    status, body = from_request_error(RequestError("Authorization", "missing or wrong Bearer key", 401))
    assert (status, body["error"]["code"], body["error"]["param"]) == (401, "invalid_api_key", None)
    status, body = from_request_error(RequestError("server", "the model is overloaded", 503))
    assert (status, body["error"]["type"], body["error"]["message"]) == (503, "server_error", "the model is overloaded")
    assert is_openai_path("/v1/chat/completions") and is_openai_path("/api/v1/images/generations/")
    assert not is_openai_path("/v1/generate") and not is_openai_path("/v1/images")


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(alphabet="ab.c ", max_size=30), stops=st.lists(st.text(alphabet="ab.", min_size=1, max_size=3),
                                                                   max_size=MAX_STOP),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_sequences_cut_the_same_whatever_the_deltas(text, stops, cuts):
    """Fed per token or in one piece, the emitted text is the text up to the first stop sequence."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(hits)] if hits else text
    m = StopMatcher(stops)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    out = "".join(m.feed(text[a:b]) for a, b in zip(bounds, bounds[1:]))
    out += m.flush() if not m.stopped else ""
    assert out == expected and m.stopped == bool(hits)


def test_builder_streams_what_it_answers():
    b = ChatCompletionBuilder("chatcmpl-1", 5, MODEL, stop=["END"])
    deltas = [b.add_text("a red "), b.add_text("circle E"), *b.add_image("QUJD"), b.add_text("NDING? no"),
              b.add_text("more"), b.add_text(" END there"), b.add_text("never")]
    assert deltas == [{"content": "a red "}, {"content": "circle "}, {"content": "E"},
                      {"images": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]},
                      {"content": "NDING? no"}, {"content": "more"}, {"content": " "}, None]
    assert b.stopped and b.add_image("QUJD") == [] and b.finish() is None
    done = b.completion("length", {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    msg = done["choices"][0]
    assert msg["finish_reason"] == "stop" and done["object"] == "chat.completion"
    assert msg["message"]["content"] == [
        {"type": "text", "text": "a red circle E"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
        {"type": "text", "text": "NDING? nomore "}]
    b = ChatCompletionBuilder("chatcmpl-2", 5, MODEL)
    assert b.add_text("x") == {"content": "x"} and b.finish() is None
    assert b.finish_reason("length") == "length" and b.finish_reason("eos") == "stop"


# ----------------------------------------------------------------------------------------------
# The real app, the real client


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """The Serve app on the session's Ray, sized so every fuzzed request is cheap (small limits)."""
    from pipelines.serve import shutdown

    yield start_app(tmp_path_factory.mktemp("serve-openai"), KEY, [
        "llm.num_cpus=0", "decoder.num_cpus=0", "ingress.num_cpus=0",  # the session's Ray has 2 CPUs
        "llm.autoscaling.max_replicas=1", "decoder.autoscaling.max_replicas=1",
        "ingress.autoscaling.max_replicas=1",
        "limits.max_new_tokens=40", "limits.max_images=2", "limits.max_inference_steps=3",
        "limits.max_images_per_request=2", "limits.max_prompt_chars=2000", "limits.max_input_images=2",
        "defaults.max_new_tokens=8", "defaults.max_images=1", "defaults.num_inference_steps=2",
    ], checkpoint_name=MODEL)
    shutdown()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url: str, path: str, body: Any, key: str | None = KEY, timeout: float = 120) -> tuple[int, dict, bytes]:
    return post_raw(url, path, body, key, timeout=timeout)


def decode_png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    assert im.format == "PNG"
    return im


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "a red circle"}], "max_tokens": 40,
        "temperature": 1.0, "top_p": 1.0, "seed": 2}
EXTRA = {"max_images": 2, "num_inference_steps": 2}


@pytest.mark.e2e
def test_models_list_is_openai_shaped(client):
    models = client.models.list()
    (card,) = models.data
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "dreamcore") and card.created > 1e9
    assert card.model_extra["config"]["decoder"]["resolution"] == 16  # dreamcore's extra field, kept


@pytest.mark.e2e
def test_images_generate_returns_seeded_pngs(client):
    out = client.images.generate(model=MODEL, prompt="a blue square", n=2, size="16x16",
                                 response_format="b64_json", extra_body={"seed": 11, "num_inference_steps": 2})
    assert len(out.data) == 2 and out.created > 1e9 and out.size == "16x16"
    images = [decode_png(d.b64_json) for d in out.data]
    assert all(im.size == (16, 16) for im in images)
    assert out.data[0].b64_json != out.data[1].b64_json
    again = client.images.generate(prompt="a blue square", extra_body={"seed": 12, "num_inference_steps": 2})
    assert again.data[0].b64_json == out.data[1].b64_json  # image i is drawn with seed + i, as on /v1/images


@pytest.mark.e2e
def test_chat_completion_is_the_native_document(client, served):
    """Same prompt, settings and seed: the chat answer is /v1/generate's document, part for part."""
    r = client.chat.completions.create(**CHAT, extra_body=EXTRA)
    choice = r.choices[0]
    content = choice.message.content
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and choice.message.role == "assistant"
    kinds = [p["type"] for p in content]
    assert "image_url" in kinds and "text" in kinds, kinds  # the checkpoint is nudged to draw
    status, _, raw = post(served, "/v1/generate", {"input": "a red circle", "max_new_tokens": 40, "temperature": 1.0,
                                                   "top_p": 1.0, "seed": 2, **EXTRA})
    native = json.loads(raw)
    assert status == 200, native
    expected = [{"type": "text", "text": p["text"]} if p["type"] == "text" else
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + p["image"]}}
                for p in native["parts"]]
    assert content == expected
    for p in content:
        if p["type"] == "image_url":
            assert decode_png(p["image_url"]["url"].split(",", 1)[1]).size == (16, 16)
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[native["finish_reason"]]
    u = native["usage"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (u["prompt_tokens"], u["completion_tokens"])
    assert r.usage.total_tokens == u["prompt_tokens"] + u["completion_tokens"]


@pytest.mark.e2e
def test_chat_stream_reassembles_to_the_completion(client, served):
    whole = client.chat.completions.create(**CHAT, extra_body=EXTRA)
    chunks = list(client.chat.completions.create(**CHAT, extra_body=EXTRA, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content: list[dict] = []
    for c in chunks[:-1]:
        delta = c.choices[0].delta
        for img in (delta.model_extra or {}).get("images") or []:
            content.append(img)
        if delta.content:
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += delta.content
            else:
                content.append({"type": "text", "text": delta.content})
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # On the wire: `data:` lines only, ending with [DONE] as OpenAI's streams do.
    status, headers, raw = post(served, "/v1/chat/completions", {**CHAT, **EXTRA, "stream": True})
    lines = [ln for ln in raw.decode().split("\n") if ln]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


@pytest.mark.e2e
def test_chat_stop_sequence_ends_the_answer(client):
    text = client.chat.completions.create(**{**CHAT, "max_tokens": 12}, extra_body={"max_images": 0}
                                          ).choices[0].message.content[0]["text"]
    assert len(text) >= 4, text  # seeded: the same text every run
    stop = text[len(text) // 2:len(text) // 2 + 2]
    r = client.chat.completions.create(**{**CHAT, "max_tokens": 12}, stop=[stop], extra_body={"max_images": 0})
    got = "".join(p["text"] for p in r.choices[0].message.content)
    assert got == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.e2e
def test_wrong_key_and_bad_requests_raise_the_clients_errors(client, served):
    bad = openai.OpenAI(base_url=f"{served}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(**CHAT)
    assert e.value.body["code"] == "invalid_api_key" and "Bearer" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a red circle", size="1024x1024")
    assert e.value.body["param"] == "size" and "16x16" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a red circle", response_format="url")
    assert e.value.body["param"] == "response_format" and "b64_json" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**CHAT, n=3)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**CHAT, frequency_penalty=0.5)
    assert (e.value.body["param"], e.value.body["code"]) == ("frequency_penalty", "unknown_parameter")
    with pytest.raises(openai.BadRequestError) as e:  # the engine's own refusal (prompt over the context)
        client.chat.completions.create(**{**CHAT, "messages": [{"role": "user", "content": "circle " * 200}]})
    assert (e.value.body["param"], e.value.body["code"]) == ("messages", "context_length_exceeded")
    assert "at most 128" in e.value.body["message"]
    long = {**CHAT, "messages": [{"role": "user", "content": "circle " * 200}], "stream": True}
    with pytest.raises(openai.APIError) as e:  # found after the 200 went out: reported in-band
        list(client.chat.completions.create(**long))
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(**{**CHAT, "model": "gpt-4o"})
    assert e.value.body["code"] == "model_not_found"
    try:  # FastAPI's own refusals (here a wrong method) take OpenAI's shape on these routes too
        urllib.request.urlopen(urllib.request.Request(f"{served}/v1/chat/completions",
                                                      headers={"Authorization": f"Bearer {KEY}"}), timeout=30)
        raise AssertionError("GET /v1/chat/completions was answered")
    except urllib.error.HTTPError as err:
        assert err.code == 405 and json.loads(err.read())["error"]["code"] == "method_not_allowed"
    # The native routes answer in the same shape, with their own statuses (422, not 400).
    status, _, raw = post(served, "/v1/generate", {"input": "a", "bogus": 1})
    assert status == 422 and json.loads(raw)["error"]["param"] == "bogus"


# ----------------------------------------------------------------------------------------------
# Property-based fuzzing of both POST routes, bodies drawn from the app's OpenAPI schema


def schema_strategy(schema: dict[str, Any], defs: dict[str, Any], name: str = "") -> st.SearchStrategy:
    """Values valid for a (pydantic-made) JSON schema; fields in HINTS get values the limits allow."""
    if "$ref" in schema:
        return schema_strategy(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, name)
    if name in HINTS:  # in range for the server's limits; `broken` makes the invalid ones
        nullable = any(s.get("type") == "null" for s in schema.get("anyOf", []))
        return st.one_of(st.none(), HINTS[name]) if nullable else HINTS[name]
    return _base_strategy(schema, defs, name)


def _base_strategy(schema: dict[str, Any], defs: dict[str, Any], name: str) -> st.SearchStrategy:
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([schema_strategy(s, defs, name) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props, required = schema.get("properties", {}), set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: schema_strategy(v, defs, k) for k, v in props.items() if k in required},
            optional={k: schema_strategy(v, defs, k) for k, v in props.items() if k not in required})
    if kind == "array":
        lo = schema.get("minItems", 0)
        return st.lists(schema_strategy(schema["items"], defs, name), min_size=lo,
                        max_size=min(schema.get("maxItems", lo + 3), lo + 3))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=24)
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -(2**40)))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 2**40))
        if kind == "integer":
            lo, hi = int(lo) + ("exclusiveMinimum" in schema), int(hi) - ("exclusiveMaximum" in schema)
            return st.one_of(st.integers(lo, min(hi, lo + 4)), st.integers(lo, hi))
        return st.floats(lo, hi, exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema,
                         allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.none()


HINTS: dict[str, st.SearchStrategy] = {
    "model": st.just(MODEL),
    "url": st.sampled_from([PNG_URL, "data:image/png;base64,AAAA", "http://127.0.0.1:1/x.png"]),
    "size": st.sampled_from(["16x16", "auto", "512x512"]),
    "text": st.sampled_from(["a red circle", "draw a blue square", ""]) | st.text(max_size=12),
    "prompt": st.sampled_from(["a red circle", "a green triangle"]) | st.text(min_size=1, max_size=12),
    "max_tokens": st.integers(1, 12),
    "max_completion_tokens": st.integers(1, 12),
    "max_images": st.integers(0, 2),
    "n": st.sampled_from([1, 1, 1, 2]),  # chat takes 1 only, images up to the limit 2
    "num_inference_steps": st.integers(1, 2),
    "guidance_scale": st.floats(1.0, 3.0),
    # the native routes' own fields
    "image": st.sampled_from([PNG_URL.split(",", 1)[1], "AAAA", "%%%"]),
    "max_new_tokens": st.integers(1, 12),
}

JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def broken(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Invalid bodies made from valid ones: a field dropped, retyped or unknown; not an object; not JSON."""
    def drop(body: dict, key: str) -> dict:
        return {k: v for k, v in body.items() if k != key}

    some_key = st.sampled_from(["model", "messages", "prompt", "n", "size", "stop", "temperature", "seed", "input",
                                "max_new_tokens", "stream"])
    return st.one_of(
        st.builds(drop, valid, some_key),
        st.builds(lambda b, k, v: {**b, k: v}, valid, some_key, JUNK),
        st.builds(lambda b, k, v: {**b, k: v}, valid, st.text(min_size=1, max_size=10), JUNK),
        st.lists(JUNK, max_size=2), st.text(max_size=10),
        st.binary(max_size=20).map(lambda raw: b"{" + raw),
    )


def check_answer(status: int, headers: dict[str, str], raw: bytes) -> None:
    """200 with a well-formed body, or a 4xx/503 with the one error body; never a 5xx crash."""
    assert status == 200 or 400 <= status < 500 or status == 503, (status, raw[:300])
    if status != 200:
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code", "request_id"} and isinstance(err["message"], str), err
        assert err["request_id"] == headers["x-request-id"], (err, headers)
        assert "Traceback" not in err["message"] and "/tmp" not in err["message"]
        assert status != 503 or "retry-after" in headers
        return
    if headers["content-type"].startswith("text/event-stream") and raw.startswith(b"event: "):
        events = [e.split("\n", 1) for e in raw.decode().split("\n\n") if e]  # native: events, then done or error
        assert all(kind.startswith("event: ") and data.startswith("data: ") for kind, data in events), events[-3:]
        kind, data = events[-1]
        assert kind in ("event: done", "event: error"), events[-3:]
        if kind == "event: error":
            err = json.loads(data.removeprefix("data: "))
            assert err["status"] in (413, 422, 503) and "Traceback" not in err["message"], err
        return
    if headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in raw.decode().split("\n") if ln]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        for ln in lines[:-1]:
            data = json.loads(ln.removeprefix("data: "))
            assert "error" in data or data["object"] == "chat.completion.chunk", data
        return
    data = json.loads(raw)
    if "parts" in data:  # native /v1/generate
        assert data["finish_reason"] in ("eos", "length") and data["usage"]["images"] <= 2, data
    elif "images" in data:  # native /v1/images
        assert len(data["images"]) >= 1 and all(p["type"] == "image" for p in data["images"]), data
    else:
        assert data.get("object") == "chat.completion" or len(data["data"]) >= 1, data


def fuzz(served: str, path: str, data: st.DataObject, valid: st.SearchStrategy) -> None:
    bodies = data.draw(st.lists(st.one_of(valid, broken(valid)), min_size=4, max_size=4), label="bodies")
    with ThreadPoolExecutor(4) as pool:  # four at once: they share the deployments' batches
        answers = list(pool.map(lambda b: post(served, path, b, timeout=90), bodies))
    for body, (status, headers, raw) in zip(bodies, answers):
        # pytest --hypothesis-show-statistics: how many were served, and what was refused
        event(f"{path} {status}" + (f" {json.loads(raw)['error']['param']}" if 400 <= status < 500 else ""))
        try:
            check_answer(status, headers, raw)
        except Exception as e:
            raise AssertionError(f"{path} {body!r:.300} -> {status} {raw[:300]!r}") from e


@functools.cache
def request_schema(served: str, path: str) -> st.SearchStrategy:
    with urllib.request.urlopen(f"{served}/openapi.json", timeout=30) as r:
        spec = json.loads(r.read())
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return schema_strategy(body, spec["components"]["schemas"])


FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations", "/v1/generate", "/v1/images"])
@FUZZ
@given(data=st.data())
def test_fuzz_route(served, path, data):
    fuzz(served, path, data, request_schema(served, path))
