"""Interleaved generation: dreams, image feedback, KV cache, limits, determinism, the image side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _model_helpers import one_thread, solid_image, tiny_model  # noqa: F401 (fixture)
from PIL import Image
from torch import nn

from dreamcore.generate import (
    DreamConditions,
    GenerationParams,
    TextGenerator,
    caption_image,
    decode_dreams,
    generate_document,
    text_to_image,
    text_to_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def dreamer():
    """A tiny model whose LM head favours <dream_start>: an untrained model would almost never draw.

    The head gets a bias (LLaMA's has none); only these generation tests use it.
    """
    model, tok = tiny_model(seed=1)
    head = model.llm.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tok.dream_start_id] = 40.0
    model.llm.lm_head = biased
    return model.eval(), tok


def _images(parts):
    return [p for p in parts if isinstance(p, Image.Image)]


def test_generate_document_draws_an_image_and_feeds_it_back(dreamer):
    model, tok = dreamer
    params = GenerationParams(max_new_tokens=6, max_images=1, seed=0, num_inference_steps=3)
    doc = generate_document(model, tok, ["a red circle"], params)
    images = _images(doc)
    assert len(images) == 1 and images[0].size == (16, 16)
    assert isinstance(doc[-1], str)  # after the image (max_images reached) text continues

    gen = TextGenerator(model, tok, ["a red circle"], params)
    seg = gen.generate_text()
    assert seg.stop_reason == "dream" and seg.dream.cond.shape == (8, 64) and seg.dream.uncond.shape == (8, 64)
    q, n = model.num_queries, model.num_patches
    assert gen.context_ids[-(q + 2):] == [tok.dream_start_id, *[tok.im_patch_id] * q, tok.dream_end_id]
    with pytest.raises(RuntimeError, match="append_image"):
        gen.generate_text()
    gen.append_image(decode_dreams(model.decoder, [seg.dream])[0])
    block = [tok.im_start_id, *[tok.im_patch_id] * n, tok.im_end_id]
    assert gen.context_ids[-len(block):] == block
    assert gen.context_ids[-(len(block) + q + 2)] == tok.dream_start_id
    rest = gen.generate_text()
    assert rest.finished and rest.dream is None  # max_images=1: no second dream


def test_fed_back_image_conditions_the_continuation(tiny):
    model, tok = tiny
    logits = []
    for colour in [(250, 0, 0), (0, 0, 250)]:
        gen = TextGenerator(model, tok, ["a picture"], GenerationParams(seed=0), force_dream=True)
        gen.generate_text()
        gen.append_image(solid_image(colour, 16))
        logits.append(gen._next_logits)
    assert not torch.allclose(logits[0], logits[1])


def test_prompt_images_become_comprehension_blocks(tiny):
    model, tok = tiny
    red, blue = solid_image((250, 0, 0), 32), solid_image((0, 0, 250), 32)
    g_red = TextGenerator(model, tok, [red, "what is this"])
    g_blue = TextGenerator(model, tok, [blue, "what is this"])
    n = model.num_patches
    assert g_red.context_ids[:n + 3] == [tok.bos_id, tok.im_start_id, *[tok.im_patch_id] * n, tok.im_end_id]
    assert not torch.allclose(g_red._next_logits, g_blue._next_logits)


def test_kv_cache_matches_a_full_forward(tiny):
    model, tok = tiny
    gen = TextGenerator(model, tok, ["a red circle"], GenerationParams(max_new_tokens=5, temperature=1.0, seed=2))
    gen.generate_text()
    ids = gen.context_ids[:-1] if gen.context_ids[-1] == tok.eos_id else gen.context_ids
    with torch.no_grad():
        full = model.llm(input_ids=torch.tensor([ids])).logits[0, -1]
    # A sampled EOS is not fed, so the last logits always belong to `ids`.
    torch.testing.assert_close(gen._next_logits, full.float(), atol=1e-4, rtol=1e-4)
    assert len(ids) > 3


def test_generation_is_deterministic_for_a_seed(dreamer, tiny):
    model, tok = dreamer
    params = GenerationParams(max_new_tokens=6, max_images=1, seed=4, temperature=1.0, num_inference_steps=3)
    a = generate_document(model, tok, ["two yellow squares"], params)
    b = generate_document(model, tok, ["two yellow squares"], params)
    assert [p for p in a if isinstance(p, str)] == [p for p in b if isinstance(p, str)]
    assert np.array_equal(np.asarray(_images(a)[0]), np.asarray(_images(b)[0]))
    text_model, tok2 = tiny
    texts = {
        seed: TextGenerator(text_model, tok2, ["a"], GenerationParams(max_new_tokens=12, temperature=1.0,
                                                                      top_p=1.0, max_images=0, seed=seed))
        .generate_text().token_ids
        for seed in (0, 1)
    }
    assert texts[0] != texts[1]


def test_limits_are_respected(dreamer, tiny):
    model, tok = dreamer
    seg = TextGenerator(model, tok, ["a"], GenerationParams(max_new_tokens=4, max_images=0)).generate_text()
    assert seg.dream is None and len(seg.token_ids) <= 4  # max_images=0 bans <dream_start>
    assert seg.stop_reason in ("max_new_tokens", "eos")
    text_model, tok2 = tiny
    gen = TextGenerator(text_model, tok2, ["a"], GenerationParams(max_new_tokens=1000, max_images=0, seed=1))
    out = gen.generate_text()
    assert out.stop_reason in ("max_seq_len", "eos") and len(gen.context_ids) <= text_model.cfg.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        TextGenerator(text_model, tok2, ["circle " * 400])
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0.0)


def test_text_to_image_and_caption_image(tiny):
    model, tok = tiny
    a = text_to_image(model, tok, "a red circle", num_inference_steps=3, seed=1)
    b = text_to_image(model, tok, "a red circle", num_inference_steps=3, seed=1)
    assert a.size == (16, 16) and np.array_equal(np.asarray(a), np.asarray(b))
    batch = text_to_images(model, tok, ["a red circle", "a blue square"], num_inference_steps=3, seed=1)
    assert np.array_equal(np.asarray(batch[0]), np.asarray(a))  # batching does not change an image
    text = caption_image(model, tok, a, max_new_tokens=5)
    assert isinstance(text, str) and text == caption_image(model, tok, a, max_new_tokens=5)


def test_dream_conditions_travel_as_plain_data_and_guidance_matters(tiny):
    model, tok = tiny
    seg = TextGenerator(model, tok, ["a blue square"], GenerationParams(num_inference_steps=3, seed=3),
                        force_dream=True).generate_text()
    dream = seg.dream
    back = DreamConditions.from_dict(dream.to_dict())
    torch.testing.assert_close(back.cond, dream.cond)
    # The unconditional branch is the empty prompt's condition, not the prompt's.
    torch.testing.assert_close(dream.uncond, model.empty_prompt_conditions().detach().float())
    assert not torch.allclose(dream.cond, dream.uncond)
    g1 = DreamConditions(dream.cond, dream.uncond, 0, 3, 1.0)
    g5 = DreamConditions(dream.cond, dream.uncond, 0, 3, 5.0)
    one, five, again = decode_dreams(model.decoder, [g1, g5, back])
    assert not np.array_equal(np.asarray(one), np.asarray(five))
    assert np.array_equal(np.asarray(again), np.asarray(decode_dreams(model.decoder, [dream])[0]))
