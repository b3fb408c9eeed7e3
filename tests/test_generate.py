"""The one engine (dreamcore.engine) and the loops over it (dreamcore.generate).

Sampling rules, the image-room rule, batching that does not change a row, a bad request that fails
alone, KV-cached decoding equal to full forwards, drawn images fed back, the image side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _model_helpers import debug_model, dreaming_model, one_thread, png, solid_image  # noqa: F401 (fixture)
from PIL import Image

from dreamcore.engine import Drawn, DreamConditions, TextEngine, TextRequest, as_rgb, decode_dreams
from dreamcore.generate import (
    Document,
    GenerationParams,
    caption_images,
    dream_requests,
    generate_document,
    text_to_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, tok = debug_model(seed=0)
    model.eval()
    return model, tok, TextEngine(model, tok)


@pytest.fixture(scope="module")
def dreamer():
    """A tiny model whose LM head favours <dream_start>: an untrained model would almost never draw."""
    model, tok = dreaming_model(40.0)
    return model, tok, TextEngine(model, tok)


def _images(parts):
    return [p for p in parts if isinstance(p, Image.Image)]


def _greedy(n: int, **kw) -> TextRequest:
    return TextRequest(["a red circle"], max_new_tokens=n, temperature=0.0, **kw)


def test_generate_document_draws_an_image_and_feeds_it_back(dreamer):
    model, tok, engine = dreamer
    params = GenerationParams(max_new_tokens=6, max_images=1, seed=0, num_inference_steps=3)
    doc = generate_document(model, tok, ["a red circle"], params, engine=engine)
    images = _images(doc)
    assert len(images) == 1 and images[0].size == (16, 16)
    assert isinstance(doc[-1], str)  # after the image (max_images reached) text continues


def test_document_lays_out_a_drawn_image_with_its_dream_block(dreamer):
    model, tok, engine = dreamer
    doc = Document(["a red circle"], GenerationParams(max_new_tokens=6, max_images=1, num_inference_steps=3))
    res = engine.continue_batch([doc.text_request()])[0]
    assert res.stop == "dream" and res.cond.shape == (8, 64) and res.uncond.shape == (8, 64)
    doc.add_text(res)
    assert doc.wants_image and not doc.finished
    with pytest.raises(RuntimeError, match="no image is due"):
        Document(["x"], GenerationParams()).image_request()
    doc.add_image(decode_dreams(model.decoder, [doc.image_request()])[0])
    assert isinstance(doc.parts[-1], Drawn)
    enc = tok.encode_prompt(["a red circle", 0], drawn=[0])
    q, n = model.num_queries, model.num_patches
    block = [tok.dream_start_id, *[tok.im_patch_id] * q, tok.dream_end_id,
             tok.im_start_id, *[tok.im_patch_id] * n, tok.im_end_id]
    assert enc.input_ids[-len(block):] == block
    assert engine.embed(doc.parts).shape[0] == len(enc.input_ids)
    rest = engine.continue_batch([doc.text_request()])[0]
    assert rest.stop != "dream"  # max_images=1: <dream_start> is banned now
    doc.add_text(rest)
    assert doc.finished and doc.images == 1


def test_fed_back_image_conditions_the_continuation(tiny):
    model, tok, engine = tiny
    out = [engine.continue_batch([TextRequest(["a picture", Drawn(solid_image(c, 16))], 6, 0.0)])[0].token_ids
           for c in [(250, 0, 0), (0, 0, 250)]]
    embeds = [engine.embed(["a picture", Drawn(solid_image(c, 16))]) for c in [(250, 0, 0), (0, 0, 250)]]
    assert not torch.allclose(embeds[0], embeds[1])
    assert len(out[0]) == 6


def test_prompt_images_become_comprehension_blocks(tiny):
    model, tok, engine = tiny
    red, blue = solid_image((250, 0, 0), 32), solid_image((0, 0, 250), 32)
    enc = tok.encode_prompt([0, "what is this"])
    n = model.num_patches
    assert enc.input_ids[:n + 3] == [tok.bos_id, tok.im_start_id, *[tok.im_patch_id] * n, tok.im_end_id]
    a, b = engine.embed([red, "what is this"]), engine.embed([blue, "what is this"])
    assert a.shape[0] == len(enc.input_ids) and not torch.allclose(a, b)


def test_every_image_form_reads_the_same(tiny):
    """File bytes (over HTTP), PIL and arrays (in-process) are one image to the engine."""
    model, tok, engine = tiny
    img = solid_image((30, 200, 40), 24)
    arr = as_rgb(img, model.cfg.vision.image_size)
    assert np.array_equal(arr, as_rgb(png(img), model.cfg.vision.image_size))
    assert np.array_equal(arr, as_rgb(np.asarray(img), model.cfg.vision.image_size))
    with pytest.raises(ValueError, match="RGB uint8"):
        as_rgb(np.zeros((4, 4), np.float32), 16)


def test_kv_cached_greedy_decoding_equals_full_forwards(tiny):
    model, tok, engine = tiny
    res = engine.continue_batch([TextRequest(["a red circle"], 6, 0.0, allow_dream=False)])[0]
    ids = list(tok.encode_prompt(["a red circle"]).input_ids)
    with torch.no_grad():
        for expected in res.token_ids:
            logits = model.llm(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logits[engine.banned + [tok.dream_start_id]] = float("-inf")
            assert int(logits.argmax()) == expected
            ids.append(expected)
    assert len(res.token_ids) >= 3


def test_a_row_does_not_depend_on_its_batch(tiny):
    """Left padding and batch-mates change nothing: the same request alone or in a batch."""
    _, _, engine = tiny
    alone = engine.continue_batch([TextRequest(["a red circle"], 8, 1.0, 1.0, seed=3)])[0]
    batch = engine.continue_batch([
        TextRequest(["two yellow squares next to a blue circle and more"], 5, 1.0, seed=9),
        TextRequest(["a red circle"], 8, 1.0, 1.0, seed=3),
        TextRequest(["a"], 2, 0.0),
    ])
    assert batch[1].token_ids == alone.token_ids and batch[1].text == alone.text
    assert batch[2].new_tokens <= 2


def test_a_prompt_too_long_fails_alone(tiny):
    model, tok, engine = tiny
    results = engine.continue_batch([TextRequest(["circle " * 400], 4), _greedy(4)])
    assert results[0].stop == "error" and "shorten the prompt" in results[0].error
    assert results[1].error is None and results[1].token_ids == engine.continue_batch([_greedy(4)])[0].token_ids
    assert results[0].too_long
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate_document(model, tok, ["circle " * 400], engine=engine)
    with pytest.raises(ValueError, match="shorten the prompt"):  # not an opaque failure in the decoder
        text_to_images(model, tok, ["circle " * 400], engine=engine)
    bad = engine.continue_batch([TextRequest([b"not an image", "x"], 2), _greedy(4)])
    assert bad[0].error == "an image is not a decodable image file (send PNG or JPEG)" and not bad[0].too_long
    assert bad[1].error is None and bad[1].token_ids == results[1].token_ids


def test_sampling_is_seeded_and_a_tiny_temperature_is_greedy(tiny):
    _, _, engine = tiny

    def run(seed, temperature=1.0):
        return engine.continue_batch([TextRequest(["a"], 12, temperature, 1.0, seed=seed, allow_dream=False)])[0]

    assert run(0).token_ids == run(0).token_ids
    assert run(0).token_ids != run(1).token_ids
    assert run(0, 1e-40).token_ids == run(5, 0.0).token_ids == run(3, 1e-6).token_ids  # greedy below 1e-5, no NaN


def test_limits_and_bans(dreamer, tiny):
    model, tok, engine = dreamer
    res = engine.continue_batch([TextRequest(["a"], 4, allow_dream=False)])[0]
    assert res.cond is None and res.new_tokens <= 4 and res.stop in ("length", "eos")
    text_model, tok2, text_engine = tiny
    long = text_engine.continue_batch([TextRequest(["a"], 1000, seed=1, allow_dream=False)])[0]
    assert long.stop in ("length", "eos") and long.prompt_tokens + long.new_tokens <= text_model.cfg.max_seq_len
    never = {tok2.pad_id, tok2.bos_id, tok2.im_start_id, tok2.im_patch_id, tok2.im_end_id, tok2.dream_end_id}
    assert not never & set(long.token_ids)
    # No room for the dream and comprehension blocks: <dream_start> cannot be sampled.
    k = next(k for k in range(1, 400)
             if len(tok.encode_prompt(["circle " * k]).input_ids) + engine.image_cost >= engine.max_len)
    crowded, roomy = engine.continue_batch([TextRequest(["circle " * k], 8), TextRequest(["circle " * (k // 2)], 8)])
    assert crowded.stop != "dream" and crowded.new_tokens >= 1 and roomy.stop == "dream"
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0.0)


def test_generation_is_deterministic_for_a_seed(dreamer):
    model, tok, engine = dreamer
    params = GenerationParams(max_new_tokens=6, max_images=1, seed=4, temperature=1.0, num_inference_steps=3)
    a = generate_document(model, tok, ["two yellow squares"], params, engine=engine)
    b = generate_document(model, tok, ["two yellow squares"], params)  # a fresh engine
    assert [p for p in a if isinstance(p, str)] == [p for p in b if isinstance(p, str)]
    assert np.array_equal(np.asarray(_images(a)[0]), np.asarray(_images(b)[0]))


def test_text_to_images_and_captions(tiny):
    model, tok, engine = tiny
    a = text_to_images(model, tok, ["a red circle"], num_inference_steps=3, seed=1)[0]
    b = text_to_images(model, tok, ["a red circle"], num_inference_steps=3, seed=1, engine=engine)[0]
    assert a.size == (16, 16) and np.array_equal(np.asarray(a), np.asarray(b))
    batch = text_to_images(model, tok, ["a red circle", "a blue square"], num_inference_steps=3, seed=1)
    assert np.array_equal(np.asarray(batch[0]), np.asarray(a))  # batching does not change an image
    texts = caption_images(model, tok, [a, batch[1]], max_new_tokens=5, engine=engine)
    assert texts[0] == caption_images(model, tok, [a], max_new_tokens=5, engine=engine)[0]
    assert all(isinstance(t, str) for t in texts)


def test_dream_conditions_and_guidance(tiny):
    model, tok, engine = tiny
    res = engine.continue_batch(dream_requests(["a blue square"], seed=3))[0]
    assert res.stop == "dream" and res.new_tokens == 1 and res.text == ""
    # The unconditional branch is the empty prompt's condition, not the prompt's.
    torch.testing.assert_close(torch.from_numpy(res.uncond), model.empty_prompt_conditions().detach().float())
    assert not np.allclose(res.cond, res.uncond)
    g1 = DreamConditions(res.cond, res.uncond, 0, 3, 1.0)
    g5 = DreamConditions(res.cond, res.uncond, 0, 3, 5.0)
    no_cfg = DreamConditions(res.cond, None, 0, 3, 1.0)
    one, five, plain = decode_dreams(model.decoder, [g1, g5, no_cfg])
    assert one.dtype == np.uint8 and one.shape == (16, 16, 3)
    assert not np.array_equal(one, five) and np.array_equal(one, plain)
    with pytest.raises(ValueError, match="uncond"):
        decode_dreams(model.decoder, [DreamConditions(res.cond, None, 0, 3, 5.0)])
