"""Pretrained-format folders for the dreamllm-debug preset, written by each library's own classes.

What a user points the 7B preset at (Vicuna, CLIP ViT-L/14, Stable Diffusion 2.1), at debug widths
and random weights: a LLaMA folder and a LLaMA-layout tokenizer (`<s>`, `</s>`, `<unk>`, no pad,
as Vicuna's), a CLIPVisionModel folder, and a Stable Diffusion folder with `unet/ vae/ scheduler/`
(SD 2.1's block layout, linear projections, 8x AutoencoderKL, scaled-linear epsilon schedule).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreamcore.config import ModelConfig, dreamllm_debug, merge

TOKENIZER_CORPUS = [
    "a red circle on a white background", "then it turns green and moves to the left",
    "two yellow squares next to a blue circle", "here is a picture of a purple star",
] * 20


def write_debug_weights(root: Path, cfg: ModelConfig | None = None, seed: int = 0) -> dict[str, str]:
    """Writes the four folders under `root`; returns the `name_or_path` of each component."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaTokenizerFast,
    )

    cfg = cfg or dreamllm_debug()
    torch.manual_seed(seed)
    paths = {k: str(root / k) for k in ("tokenizer", "llm", "vision", "sd")}

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TOKENIZER_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = LlamaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(paths["tokenizer"])

    c = cfg.llm
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).save_pretrained(paths["llm"])

    v = cfg.vision
    CLIPVisionModel(CLIPVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        projection_dim=v.hidden_size)).save_pretrained(paths["vision"])

    d = cfg.decoder
    n_vae = len(d.vae_block_out_channels)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=d.resolution,
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=tuple(d.vae_block_out_channels), layers_per_block=1,
        norm_num_groups=min(d.vae_block_out_channels), scaling_factor=0.18215,
    ).save_pretrained(f"{paths['sd']}/vae")
    n = len(d.block_out_channels)
    UNet2DConditionModel(
        sample_size=d.resolution // 2 ** (n_vae - 1), in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=tuple(d.block_out_channels), layers_per_block=d.layers_per_block,
        cross_attention_dim=d.cross_attention_dim, attention_head_dim=tuple([d.attention_head_dim] * n),
        use_linear_projection=True, norm_num_groups=min(d.block_out_channels),
    ).save_pretrained(f"{paths['sd']}/unet")
    PNDMScheduler(  # SD 2.1-base's scheduler/scheduler_config.json, class and values
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    ).save_pretrained(f"{paths['sd']}/scheduler")
    return {"tokenizer": paths["tokenizer"], "llm": paths["llm"], "vision": paths["vision"],
            "decoder": paths["sd"]}


def debug_preset_from(paths: dict[str, str], cfg: ModelConfig | None = None) -> ModelConfig:
    """The dreamllm-debug preset with every component's `name_or_path` set to `paths`."""
    return merge(cfg or dreamllm_debug(), {k: {"name_or_path": p} for k, p in paths.items()})
