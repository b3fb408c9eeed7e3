"""The dreamllm-debug preset: the 7B code path at CPU widths, built from config and loaded from
folders in each library's own format (as a user loads Vicuna, CLIP ViT-L/14 and SD 2.1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import INTERLEAVED, make_batch  # noqa: E402
from _pretrained_helpers import debug_preset_from, write_debug_weights  # noqa: E402

from dreamcore.config import dreamllm_7b, dreamllm_debug  # noqa: E402
from dreamcore.model import DreamLLM  # noqa: E402
from dreamcore.tokenizer import DreamTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    return write_debug_weights(tmp_path_factory.mktemp("debug-weights"))


def test_debug_preset_follows_the_7b_code_path():
    big, small = dreamllm_7b(), dreamllm_debug()
    for cfg in (big, small):
        assert (cfg.vision.select_layer, cfg.vision.drop_cls, cfg.vision.patch_size) == (-2, True, 14)
        assert (cfg.vision.freeze, cfg.decoder.freeze, cfg.decoder.use_vae) == (True, True, True)
        assert cfg.dream.num_queries == 64
        assert len(cfg.decoder.vae_block_out_channels) == 4  # 8x, SD's AutoencoderKL
    same = ("prediction_type", "beta_schedule", "guidance_scale", "coord_channels", "only_cross_attention")
    assert {k: getattr(small.decoder, k) for k in same} == {k: getattr(big.decoder, k) for k in same}
    assert len(small.decoder.block_out_channels) == len(big.decoder.block_out_channels)


def test_debug_preset_built_from_config_has_a_latent_decoder():
    cfg = dreamllm_debug()
    from dreamcore.decoder import DiffusionDecoder

    dec = DiffusionDecoder.from_config(cfg.decoder)
    assert dec.vae_scale == 8 and dec.latent_size == cfg.decoder.resolution // 8
    assert dec.unet.config.in_channels == 4 and dec.unet.config.sample_size == dec.latent_size


def test_debug_preset_loads_each_part_from_its_library_folder_and_trains(weights):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModel, LlamaForCausalLM

    cfg = debug_preset_from(weights)
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries)
    assert (tok.hf.bos_token, tok.hf.eos_token) == ("<s>", "</s>")  # Vicuna's, reused
    model = DreamLLM(cfg, tok)
    assert isinstance(model.llm, LlamaForCausalLM) and isinstance(model.vision, CLIPVisionModel)
    assert isinstance(model.decoder.unet, UNet2DConditionModel) and isinstance(model.decoder.vae, AutoencoderKL)
    assert model.decoder.vae_scale == 8
    # The weights are the folders' (the LLM's vocabulary grew by DreamLLM's tokens, as Vicuna's does).
    ref = LlamaForCausalLM.from_pretrained(weights["llm"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.llm.state_dict()[q], ref.state_dict()[q])
    assert model.llm.get_input_embeddings().num_embeddings == len(tok.hf) > ref.config.vocab_size
    unet = UNet2DConditionModel.from_pretrained(weights["decoder"], subfolder="unet")
    assert torch.equal(model.decoder.unet.conv_in.weight, unet.conv_in.weight)
    assert model.decoder.sample_scheduler_config["beta_schedule"] == "scaled_linear"

    batch = make_batch(cfg, tok, INTERLEAVED)
    out = model(batch)
    assert torch.isfinite(out["lm_loss"]) and torch.isfinite(out["vm_loss"]) and out["vm_loss"] > 0
    out["loss"].backward()
    assert model.llm.get_input_embeddings().weight.grad is not None  # stage II: the LLM trains
    assert model.cond_proj.weight.grad.abs().sum() > 0 and model.vision_proj.weight.grad.abs().sum() > 0
    frozen = [*model.vision.parameters(), *model.decoder.unet.parameters(), *model.decoder.vae.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)

    model.eval()
    cond = model.empty_prompt_conditions()
    images = model.decoder.sample(cond.detach(), num_inference_steps=2, guidance_scale=1.0, seed=0)
    assert images.shape == (1, 3, cfg.decoder.resolution, cfg.decoder.resolution)


def test_pretrained_parts_load_straight_into_the_runs_precision(weights):
    """A bf16 run never materialises pretrained parts in fp32: each library loads them in bf16
    (transformers `dtype`, diffusers `torch_dtype` with low_cpu_mem_usage), equal to the fp32
    weights rounded once."""
    from dreamcore.pretrained import load_components

    cfg = debug_preset_from(weights)
    half = load_components(cfg, ["llm", "vision", "decoder"], torch.bfloat16)
    full = load_components(cfg, ["llm", "vision", "decoder"], torch.float32)
    for name in ("llm", "vision", "decoder"):
        params = dict(full[name].named_parameters())
        for key, p in half[name].named_parameters():
            assert p.dtype == torch.bfloat16, f"{name}.{key}"
            assert torch.equal(p, params[key].to(torch.bfloat16)), f"{name}.{key}"
