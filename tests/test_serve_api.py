"""Fast tests of the serving contract without Ray: request validation, config, serve.yaml, HTML report."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pydantic import BaseModel, ValidationError

from dreamcore.config import ConfigError
from dreamcore.report import document_html, page_html, table_html, write_document
from pipelines.serve.api import (
    GenerateRequest,
    ImagesRequest,
    RequestError,
    check_generate,
    check_images,
    decode_image,
    validation_error,
)
from pipelines.serve.config import (
    DefaultsConfig,
    LimitsConfig,
    ServeConfig,
    deployment_options,
    load_serve_config,
)

REPO = Path(__file__).resolve().parents[1]


def png_b64(size=(8, 8), color="red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def check(body: dict, limits: LimitsConfig | None = None):
    req = GenerateRequest.model_validate(body)
    return check_generate(req, limits or LimitsConfig(), DefaultsConfig(), 20, 3.0, seed=7)


def refused(body: dict, limits: LimitsConfig | None = None) -> RequestError:
    with pytest.raises(RequestError) as e:
        check(body, limits)
    return e.value


def invalid(body: dict, model: type[BaseModel] = GenerateRequest) -> dict:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return validation_error(e.value.errors())["error"]


# ----------------------------------------------------------------------------------------------
# Requests


def test_valid_interleaved_request_keeps_order_and_fills_defaults():
    parts, s = check({"input": [{"type": "text", "text": "look:"}, {"type": "image", "image": png_b64()},
                                {"type": "text", "text": "and draw"}], "seed": 3})
    assert [type(p) for p in parts] == [str, bytes, str]
    assert Image.open(io.BytesIO(parts[1])).size == (8, 8)
    assert (s.seed, s.num_inference_steps, s.guidance_scale, s.max_new_tokens) == (3, 20, 3.0, 64)
    assert check({"input": "hi"})[1].seed == 7  # no seed given: the server's draw


def test_data_url_prefix_is_accepted():
    parts, _ = check({"input": [{"type": "image", "image": "data:image/png;base64," + png_b64()}]})
    assert isinstance(parts[0], bytes)


@pytest.mark.parametrize("body, field, status", [
    ({"input": "x" * 9000}, "input", 413),
    ({"input": [{"type": "image", "image": png_b64()}] * 5}, "input", 422),
    ({"input": [{"type": "text", "text": "a"}, {"type": "image", "image": "not base64!!"}]}, "input[1].image", 422),
    ({"input": [{"type": "image", "image": base64.b64encode(b"hello world").decode()}]}, "input[0].image", 422),
    ({"input": "a", "max_new_tokens": 100000}, "max_new_tokens", 422),
    ({"input": "a", "max_images": 50}, "max_images", 422),
    ({"input": "a", "num_inference_steps": 1000}, "num_inference_steps", 422),
    ({"input": "a", "guidance_scale": 99.0}, "guidance_scale", 422),
    ({"input": []}, "input", 422),
])
def test_limits_refuse_with_the_field_named(body, field, status):
    err = refused(body)
    assert (err.field, err.status) == (field, status)
    assert err.body()["error"]["message"].startswith(field)


def test_image_over_byte_and_pixel_caps():
    big = png_b64(size=(300, 300))
    err = refused({"input": [{"type": "image", "image": big}]}, LimitsConfig(max_image_bytes=200))
    assert (err.field, err.status) == ("input[0].image", 413)
    err = refused({"input": [{"type": "image", "image": big}]}, LimitsConfig(max_image_pixels=100 * 100))
    assert "300x300" in err.message and err.status == 413
    with pytest.raises(RequestError):  # a truncated file fails at validation, not in a replica
        decode_image(base64.b64encode(base64.b64decode(big)[:60]).decode(), "x", LimitsConfig())


@pytest.mark.parametrize("body, field", [
    ({"input": "a", "bogus": 1}, "bogus"),
    ({"input": [{"type": "image"}]}, "input[0].image"),
    ({"input": [{"type": "text", "text": "a", "colour": "red"}]}, "input[0].colour"),
    ({"input": "a", "top_p": 3}, "top_p"),
    ({"input": "a", "temperature": -1}, "temperature"),
    ({}, "input"),
])
def test_schema_errors_name_the_field(body, field):
    err = invalid(body)
    assert err["param"] == field, err
    assert err["message"].startswith(field) and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, field", [
    ({"input": "a", "max_new_tokens": "2"}, "max_new_tokens"),  # no string-to-int
    ({"input": "a", "stream": "yes"}, "stream"),  # no "yes" booleans
    ({"input": "a", "stream": 1}, "stream"),
    ({"input": "a", "temperature": "0.5"}, "temperature"),
    ({"input": "a", "seed": 3.0}, "seed"),  # a float is not an int, even a whole one
])
def test_types_are_strict(body, field):
    err = invalid(body)
    assert err["param"] == field and err["code"] == "invalid_type", err
    assert GenerateRequest.model_validate({"input": "a", "temperature": 1, "max_new_tokens": 2}).temperature == 1.0


def test_malformed_json_names_the_body_not_a_character():
    err = validation_error([{"type": "json_invalid", "loc": ("body", 14), "msg": "JSON decode error",
                             "ctx": {"error": "Expecting value"}}])["error"]
    assert err["param"] is None and err["code"] == "invalid_json"
    assert err["message"] == "body: is not valid JSON (Expecting value at character 14)"


def test_unencodable_text_is_refused_by_name():
    assert refused({"input": "a \ud800 b"}).field == "input"
    assert refused({"input": [{"type": "text", "text": "ok"}, {"type": "text", "text": "\udfff"}]}).field == "input[1].text"
    assert invalid({"prompt": "x\ud800"}, ImagesRequest)["param"] == "prompt"  # pydantic's own check
    with pytest.raises(RequestError) as e:  # and ours, should a request reach it another way
        check_images(ImagesRequest.model_construct(prompt="x\ud800", n=1), LimitsConfig(), DefaultsConfig(), 20, 3.0,
                     seed=1)
    assert e.value.field == "prompt" and "surrogate" in e.value.message


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP", "WEBP"])
def test_only_png_and_jpeg_images_are_accepted(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format=fmt)
    with pytest.raises(RequestError) as e:
        decode_image(base64.b64encode(buf.getvalue()).decode(), "input[0].image", LimitsConfig())
    assert e.value.status == 422 and "PNG or JPEG" in e.value.message
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(jpeg, format="JPEG")
    assert decode_image(base64.b64encode(jpeg.getvalue()).decode(), "x", LimitsConfig()) == jpeg.getvalue()


def test_a_decompression_bomb_is_413_whoever_notices_it():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 M pixels in a few kB
    data = base64.b64encode(buf.getvalue()).decode()
    for limits in (LimitsConfig(), LimitsConfig(max_image_pixels=10**12)):  # ours, then PIL's own cap
        with pytest.raises(RequestError) as e:
            decode_image(data, "x", limits)
        assert e.value.status == 413, e.value


def test_images_request_checks():
    prompt, n, sp = check_images(ImagesRequest(prompt="a red circle", n=2, seed=5), LimitsConfig(),
                                 DefaultsConfig(), 20, 3.0, seed=1)
    assert (prompt, n, sp) == ("a red circle", 2, {"seed": 5, "num_inference_steps": 20, "guidance_scale": 3.0})
    with pytest.raises(RequestError) as e:
        check_images(ImagesRequest(prompt="a", n=9), LimitsConfig(), DefaultsConfig(), 20, 3.0, seed=1)
    assert e.value.field == "n"
    assert invalid({"prompt": ""}, ImagesRequest)["param"] == "prompt"


def test_request_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(RequestError("input", "too long", 413)))
    assert (err.field, err.message, err.status, str(err)) == ("input", "too long", 413, "input: too long")


# ----------------------------------------------------------------------------------------------
# Config


def test_serve_config_overrides_and_unknown_keys(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("decoder:\n  autoscaling:\n    max_replicas: 3\nlimits:\n  max_images: 2\n")
    cfg = load_serve_config(f, ["llm.num_cpus=0", "port=9001"], host="0.0.0.0")
    assert (cfg.decoder.autoscaling.max_replicas, cfg.limits.max_images, cfg.llm.num_cpus) == (3, 2, 0.0)
    assert (cfg.port, cfg.host) == (9001, "0.0.0.0")
    with pytest.raises(ConfigError, match="max_replica"):
        load_serve_config(None, ["decoder.autoscaling.max_replica=3"])
    with pytest.raises(ConfigError, match="min_replicas <= max_replicas"):
        load_serve_config(None, ["llm.autoscaling.min_replicas=3"])
    with pytest.raises(ConfigError, match="device"):
        load_serve_config(None, ["device=tpu"])
    with pytest.raises(ConfigError, match="dtype='int8'"):
        load_serve_config(None, ["dtype=int8"])
    for bad in ("{CPU: 1}", "{decoder_node: 0}"):
        with pytest.raises(ConfigError, match="decoder.resources=.*decoder.num_cpus"):
            load_serve_config(None, [f"decoder.resources={bad}"])


def test_deployment_options_are_serve_options():
    from ray.serve.schema import DeploymentSchema

    cfg = ServeConfig()
    for name in ("llm", "decoder", "ingress"):
        opts = deployment_options(name, getattr(cfg, name), cfg.retry_after_s)
        DeploymentSchema.model_validate(opts)  # Serve accepts every key we produce
        assert opts["autoscaling_config"]["max_replicas"] == getattr(cfg, name).autoscaling.max_replicas
        assert "resources" not in opts["ray_actor_options"]  # none configured: Serve's own default
    pinned = load_serve_config(None, ["decoder.resources={decoder_node: 1}"])
    opts = deployment_options("decoder", pinned.decoder, pinned.retry_after_s)
    DeploymentSchema.model_validate(opts)
    assert opts["ray_actor_options"]["resources"] == {"decoder_node": 1}
    # The decoder scales out further and sooner than the LLM (an image costs many UNet calls).
    assert cfg.decoder.autoscaling.max_replicas > cfg.llm.autoscaling.max_replicas
    assert cfg.decoder.autoscaling.target_ongoing_requests < cfg.llm.autoscaling.target_ongoing_requests


def _unknown_keys(data, model: type[BaseModel], where: str = "") -> list[str]:
    """Keys of `data` that `model` (a pydantic schema) does not define, recursively."""
    import typing

    fields = model.model_fields
    aliases = {f.alias for f in fields.values() if f.alias}
    out = []
    for k, v in data.items():
        if k not in fields and k not in aliases:
            out.append(f"{where}{k}")
            continue
        ann = fields[k].annotation
        subs = [a for a in (typing.get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        inner = [a for t in typing.get_args(ann) for a in typing.get_args(t)
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(v, dict) and subs:
            out += _unknown_keys(v, subs[0], f"{where}{k}.")
        elif isinstance(v, list) and inner:
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    out += _unknown_keys(item, inner[0], f"{where}{k}[{i}].")
    return out


def test_default_sizes_fit_the_documented_node_with_room_for_a_replacement():
    """The defaults are for a 2-CPU node: all deployments at max scale, plus the largest replica
    again (a replacement for one that died), fit, so the replacement never waits for a downscale."""
    cfg = ServeConfig()
    deps = [cfg.llm, cfg.decoder, cfg.ingress]
    at_max = sum(d.num_cpus * d.autoscaling.max_replicas for d in deps)
    assert at_max + max(d.num_cpus for d in deps) <= 2.0, at_max


def test_cluster_serve_yaml_is_valid_and_matches_the_builder():
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.app import ServeArgs, serve_config
    from pipelines.serve.config import AutoscalingSettings

    data = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(data)
    # Serve ignores misspelled keys; we do not.
    assert _unknown_keys(data, ServeDeploySchema) == []
    for dep in data["applications"][0]["deployments"]:
        assert set(dep["autoscaling_config"]) <= set(AutoscalingSettings.__dataclass_fields__), dep["name"]
    app = data["applications"][0]
    assert app["import_path"] == "pipelines.serve:build_app"
    cfg = serve_config(ServeArgs.model_validate(app["args"]))  # typed args: a typo fails here
    assert cfg.auth.api_key_file, "the cluster endpoint listens on 0.0.0.0: it must require a key"
    expected = {
        d["name"]: {k: v for k, v in d.items()}
        for d in (deployment_options(n, getattr(cfg, a), cfg.retry_after_s)
                  for n, a in (("LLMServer", "llm"), ("ImageDecoder", "decoder"), ("Ingress", "ingress")))
    }
    got = {d["name"]: d for d in app["deployments"]}
    assert yaml.safe_load(yaml.safe_dump(expected)) == got
    with pytest.raises(ValidationError):
        ServeArgs.model_validate({**app["args"], "chekpoint": "x"})


# ----------------------------------------------------------------------------------------------
# HTML report


def test_document_html_escapes_text_and_embeds_images(tmp_path):
    img = Image.new("RGB", (4, 4), "blue")
    parts = ["<script>alert(1)</script> & more", img, {"type": "image", "image": png_b64(), "seed": 1},
             {"type": "text", "text": "end"}]
    html = document_html(parts, title="t", prompt="p<")
    assert "<script>" not in html and "&lt;script&gt;" in html and "p&lt;" in html
    assert html.count("data:image/png;base64,") == 2
    out = write_document(tmp_path / "d.html", parts)
    text = out.read_text()
    assert text.startswith("<!doctype html>")
    b64 = text.split("data:image/png;base64,")[1].split('"')[0]
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (4, 4)
    with pytest.raises(ValueError, match="unknown part type"):
        document_html([{"type": "video"}])


def test_table_and_page():
    t = table_html({"kept": 3, "ratio": 0.123456})
    assert "<td>kept</td><td>3</td>" in t and "0.1235" in t
    rows = table_html([{"a": 1}, {"a": 2, "b": "<x>"}])
    assert "<th>b</th>" in rows and "&lt;x&gt;" in rows
    assert "<title>r&amp;d</title>" in page_html("r&d", [t])


def test_a_full_kv_cache_is_a_retryable_503_other_refusals_are_4xx():
    """The Ingress's reading of an LLM round: cache full -> 503 + Retry-After; too long -> 413."""
    from dreamcore.engine import TextResult
    from pipelines.serve.api import RequestError
    from pipelines.serve.deployments import Ingress

    check = Ingress.func_or_class._checked
    full = TextResult("", "error", 0, 0, error="the KV cache is full (2048 tokens held); retry", retry_after_s=2.6)
    with pytest.raises(RequestError) as e:
        check(full)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "3"}
    long = TextResult("", "error", 0, 0, error="input is 999 tokens", too_long=True)
    with pytest.raises(RequestError) as e:
        check(long)
    assert e.value.status == 413 and not getattr(e.value, "headers", None)


def test_replicas_serve_in_the_configured_dtype(tmp_path):
    """`dtype` is serve configuration: bfloat16 weights on CPU give a dream condition and an image
    through the image replica's denoiser; "auto" is float32 where no GPU is."""
    import sys

    import numpy as np
    import torch

    from dreamcore.engine import DreamConditions
    from dreamcore.generate import dream_requests
    from pipelines.serve.replicas import ImageReplica, TextReplica, pick_dtype

    sys.path.insert(0, str(Path(__file__).parent))
    from _serve_helpers import make_checkpoint

    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    text, image = TextReplica(ckpt, "cpu", dtype="bfloat16"), ImageReplica(ckpt, "cpu", dtype="bfloat16")
    assert next(text.engine.model.llm.parameters()).dtype == torch.bfloat16
    assert image.decoder.unet.dtype == torch.bfloat16
    assert text.info()["dtype"] == image.info()["dtype"] == "bfloat16"
    res = text.engine.continue_batch(dream_requests(["a red circle"]))[0]
    assert res.error is None and np.isfinite(res.cond).all()
    future = image.denoiser.submit(DreamConditions(res.cond, res.uncond, 1, 3, 2.0))
    while image.denoiser.step():
        pass
    pixels = future.result()
    assert pixels.dtype == np.uint8 and pixels.shape == (image.decoder.resolution, image.decoder.resolution, 3)
