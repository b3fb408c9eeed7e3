"""Checkpoints: round trip, partial loads, incomplete folders, real components loaded by path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _model_helpers import INTERLEAVED, debug_config, debug_model, make_batch, one_thread  # noqa: F401 (fixture)
from diffusers import DDPMScheduler
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

from dreamcore.checkpoint import CheckpointError, from_pretrained, save_pretrained
from dreamcore.config import ConfigError
from dreamcore.engine import TextEngine, TextRequest
from dreamcore.generate import text_to_images
from dreamcore.model import DreamLLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = debug_model(seed=3)
    folder = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model.eval(), tok, folder)
    return model, tok, folder


def _losses(model, batch):
    torch.manual_seed(0)
    with torch.no_grad():
        return {k: v.item() for k, v in model(batch).items()}


def test_round_trip_gives_identical_outputs(saved):
    model, tok, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "llm", "projectors.safetensors", "scheduler", "tokenizer", "unet", "vision"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format_version"] == 2 and meta["model"]["dream"]["num_queries"] == 8
    loaded, tok2 = from_pretrained(folder)
    assert tok2.content_hash() == tok.content_hash()
    batch = make_batch(model.cfg, tok, INTERLEAVED)
    assert _losses(model, batch) == _losses(loaded, batch)
    a = text_to_images(model, tok, ["a red circle"], num_inference_steps=3)[0]
    b = text_to_images(loaded, tok2, ["a red circle"], num_inference_steps=3)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    request = TextRequest(["a"], max_new_tokens=8, temperature=1.0, seed=5)
    assert (TextEngine(model, tok).continue_batch([request])[0].token_ids
            == TextEngine(loaded, tok2).continue_batch([request])[0].token_ids)


def test_each_part_loads_with_its_own_library(saved):
    """llm/ is a transformers causal LM with its tokenizer, vision/ a CLIP vision tower, unet/ and
    scheduler/ diffusers folders: what a user (or an LLM server) loads without dreamcore."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, folder = saved
    llm = AutoModelForCausalLM.from_pretrained(folder / "llm")
    hf_tok = AutoTokenizer.from_pretrained(folder / "llm")
    assert isinstance(llm, LlamaForCausalLM) and len(hf_tok) == llm.config.vocab_size == len(tok.hf)
    assert hf_tok.convert_tokens_to_ids("<dream_start>") == tok.dream_start_id
    ids = torch.tensor([hf_tok("a red circle")["input_ids"]])
    torch.testing.assert_close(llm(ids).logits, model.llm(ids).logits)
    vision = CLIPVisionModel.from_pretrained(folder / "vision")
    for (name, p), q in zip(model.vision.state_dict().items(), vision.state_dict().values()):
        assert torch.equal(p, q), name
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    for (name, p), q in zip(model.decoder.unet.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(p, q), name
    assert DDPMScheduler.from_pretrained(folder / "scheduler").config.num_train_timesteps == \
        model.decoder.train_scheduler.config.num_train_timesteps


def test_format_1_folders_are_still_read(saved, tmp_path):
    """The earlier layout (one safetensors file per component, architectures in config.json)."""
    from safetensors.torch import save_file

    model, tok, _ = saved
    old = tmp_path / "v1"
    old.mkdir()
    arch = {"llm": model.llm.config.to_dict(), "vision": model.vision.config.to_dict(),
            "unet": dict(model.decoder.unet.config), "vae": None, "scheduler": dict(model.decoder.train_scheduler.config)}
    for name, module in (("llm", model.llm), ("vision", model.vision), ("decoder", model.decoder)):
        save_file({k: v.contiguous().clone() for k, v in module.state_dict().items()}, str(old / f"{name}.safetensors"))
    (old / "projectors.safetensors").write_bytes((saved[2] / "projectors.safetensors").read_bytes())
    meta = json.loads((saved[2] / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**meta, "format_version": 1, "architectures": arch}, default=str))
    tok.save_pretrained(old / "tokenizer")
    loaded, _ = from_pretrained(old)
    batch = make_batch(model.cfg, tok, INTERLEAVED)
    assert _losses(model, batch) == _losses(loaded, batch)
    (old / "config.json").write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(CheckpointError, match="format_version 7; this dreamcore reads 1, 2"):
        from_pretrained(old)


def test_partial_loads_for_the_text_and_image_servers(saved):
    model, tok, folder = saved
    text_side, _ = from_pretrained(folder, components=("llm", "vision", "projectors"))
    assert text_side.decoder is None and text_side.llm is not None
    image_side, _ = from_pretrained(folder, components=("decoder",))
    assert image_side.llm is None and image_side.vision is None
    for (name, p), q in zip(model.decoder.state_dict().items(), image_side.decoder.state_dict().values()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(text_side.empty_prompt_conditions(), model.empty_prompt_conditions())


def test_incomplete_checkpoint_names_folder_and_file(saved, tmp_path):
    _, _, folder = saved
    partial = tmp_path / "partial"
    partial.mkdir()
    import shutil

    for name in ("llm", "vision"):
        shutil.copytree(folder / name, partial / name)
    for name in ("config.json", "projectors.safetensors"):
        (partial / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"partial is incomplete: missing unet/, scheduler/, tokenizer/"):
        from_pretrained(partial)
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown component 'unet'"):
        from_pretrained(folder, components=("unet",))


def test_weights_that_do_not_fit_are_refused(saved, tmp_path):
    model, tok, _ = saved
    save_pretrained(model, tok, tmp_path)
    conf = json.loads((tmp_path / "llm" / "config.json").read_text())
    conf["num_hidden_layers"] += 1  # transformers alone would warn and fill the layer with noise
    (tmp_path / "llm" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"llm: weights do not fit its config.json .*missing_keys"):
        from_pretrained(tmp_path, components=("llm",))


def test_real_components_load_from_folders_by_path(saved, tmp_path):
    """Tiny HF / diffusers components saved by their own libraries come back through name_or_path."""
    model, tok, _ = saved
    model.llm.save_pretrained(tmp_path / "llm")
    # A CLIP vision tower with a different width: the projector is sized from the loaded module.
    clip_conf = dataclasses.replace(model.cfg.vision)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=clip_conf.image_size,
                                     patch_size=clip_conf.patch_size)).save_pretrained(tmp_path / "clip")
    sd = tmp_path / "sd"
    model.decoder.unet.save_pretrained(sd / "unet")
    DDPMScheduler.from_config(model.decoder.sample_scheduler_config).save_pretrained(sd / "scheduler")

    cfg = debug_config()
    cfg.llm.name_or_path = str(tmp_path / "llm")
    cfg.vision.name_or_path = str(tmp_path / "clip")
    cfg.decoder.name_or_path = str(sd)
    built = DreamLLM(cfg, tok)
    assert isinstance(built.llm, LlamaForCausalLM)
    for (name, p), q in zip(model.llm.state_dict().items(), built.llm.state_dict().values()):
        assert torch.equal(p, q), name
    assert built.vision.config.hidden_size == 48 and built.vision_proj.in_features == 48
    for p, q in zip(model.decoder.unet.parameters(), built.decoder.unet.parameters()):
        assert torch.equal(p, q)
    out = built(make_batch(cfg, tok, INTERLEAVED))
    assert torch.isfinite(out["loss"])


def test_bad_component_paths_are_clear_errors(tmp_path):
    cfg = debug_config()
    cfg.llm.name_or_path = str(tmp_path / "no-llm-here")
    _, tok = debug_model()
    with pytest.raises(ConfigError, match=r"llm.name_or_path=.*no-llm-here.*local folder"):
        DreamLLM(cfg, tok)
    cfg = debug_config()
    cfg.vision.image_size = 64  # 64 tokens per image configured, the saved CLIP gives 16
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(tmp_path / "c")
    cfg.vision.name_or_path = str(tmp_path / "c")
    with pytest.raises(ConfigError, match="set vision.image_size=32 vision.patch_size=8"):
        DreamLLM(cfg, tok, components=("vision",))
