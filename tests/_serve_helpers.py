"""A tiny DreamLLM checkpoint for the serving tests, saved with dreamcore.checkpoint.save_pretrained.

Untrained weights would almost never sample `<dream_start>` (1 token of a few hundred), so the
tests could not see an image. The checkpoint is nudged instead: one embedding dimension is set to
a constant for every token, so the final hidden state carries a steady component, and the LM
head row of `<dream_start>` reads it. The model then draws an image every few tokens while the
rest of its text stays random. Nothing in the server knows about this; it only changes weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreamcore.config import ModelConfig, load_config, preset

SENTENCES = [
    "a red circle sits on a white page",
    "the green square is next to a blue triangle",
    "draw a yellow circle and then a red square",
    "here is a picture of a blue square",
]

TINY_SERVE_MODEL = [
    "max_seq_len=128",
    "llm.hidden_size=64",
    "llm.intermediate_size=128",
    "llm.num_layers=1",
    "llm.num_heads=2",
    "llm.num_kv_heads=2",
    "vision.num_layers=1",
    "vision.hidden_size=32",
    "vision.intermediate_size=64",
    "vision.image_size=16",
    "vision.patch_size=8",
    "dream.num_queries=4",
    "decoder.block_out_channels=[16,16]",
    "decoder.cross_attention_dim=32",
    "decoder.num_inference_steps=4",
    "tokenizer.vocab_size=300",
]


def tiny_serve_config() -> ModelConfig:
    return load_config(preset("tiny"), None, TINY_SERVE_MODEL)


def make_checkpoint(directory: Path, dream_logit: float = 0.3) -> Path:
    """Build, nudge (see module docstring) and save a tiny DreamLLM; returns the folder."""
    from dreamcore.checkpoint import save_pretrained
    from dreamcore.model import DreamLLM
    from dreamcore.tokenizer import DreamTokenizer

    torch.manual_seed(0)
    cfg = tiny_serve_config()
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                               corpus_texts=SENTENCES * 4)
    model = DreamLLM(cfg, tok)
    with torch.no_grad():
        emb = model.llm.get_input_embeddings().weight  # (V, D)
        head = model.llm.get_output_embeddings().weight  # (V, D)
        emb[:, 0] = 0.5  # a steady component in every position's residual stream
        head[:, 0] = 0.0
        head[tok.dream_start_id] = 0.0
        head[tok.dream_start_id, 0] = dream_logit
    save_pretrained(model, tok, directory)
    return directory
