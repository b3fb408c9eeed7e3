"""The shapes world: determinism, MMC4 format, held-out split, scorer accuracy, the image server."""

from __future__ import annotations

import io
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from dreamcore import synthetic as syn

MMC4_DOC_KEYS = {"url", "text_list", "image_info", "similarity_matrix", "could_have_url_duplicate"}
MMC4_IMAGE_KEYS = {"image_name", "raw_url", "matched_text_index", "matched_sim", "face_detections"}


def test_world_has_required_variety():
    assert len(syn.COLOURS) >= 6 and len(syn.SHAPES) >= 3
    assert set(syn.SIZES) == {"small", "large"}
    assert set(syn.POSITIONS) == {"left", "right", "top", "bottom", "center"}


def test_corpus_is_deterministic_by_seed():
    a = syn.make_corpus(20, seed=3, image_base_url="http://h:1")
    b = syn.make_corpus(20, seed=3, image_base_url="http://h:1")
    c = syn.make_corpus(20, seed=4, image_base_url="http://h:1")
    assert a == b
    assert a != c
    name = a[0]["image_info"][0]["image_name"][:-4]
    assert syn.render_png(name, 32) == syn.render_png.__wrapped__(name, 32)  # render is pure


def test_corpus_has_mmc4_fields_and_matching():
    docs = syn.make_corpus(30, seed=0, image_base_url="http://127.0.0.1:9/img/")
    for doc in docs:
        assert set(doc) == MMC4_DOC_KEYS
        assert isinstance(doc["text_list"], list) and all(isinstance(t, str) for t in doc["text_list"])
        assert 1 <= len(doc["image_info"]) <= 4
        assert doc["could_have_url_duplicate"] in (0, 1)
        sims = doc["similarity_matrix"]
        assert len(sims) == len(doc["image_info"])
        assert all(len(row) == len(doc["text_list"]) for row in sims)
        for i, info in enumerate(doc["image_info"]):
            assert set(info) == MMC4_IMAGE_KEYS
            assert info["raw_url"] == f"http://127.0.0.1:9/img/{info['image_name']}"
            spec = syn.ShapeSpec.parse(info["image_name"])
            sentence = doc["text_list"][info["matched_text_index"]]
            # the matched sentence describes this very image, and scores highest for it
            assert syn.score_caption(sentence) == (spec.colour, spec.shape)
            assert spec.size in sentence
            assert info["matched_sim"] == max(sims[i])
            # the sentence after it captions the image (image -> text direction)
            assert syn.score_caption(doc["text_list"][info["matched_text_index"] + 1]) == (spec.colour, spec.shape)
    counts = [len(d["image_info"]) for d in docs]
    assert 1 in counts and max(counts) >= 3  # pairs and interleaved documents both present
    assert all(len(d["image_info"]) >= 2 for d in syn.make_corpus(10, 0, "http://h", single_image_fraction=0.0))
    with pytest.raises(ValueError, match="single_image_fraction"):
        syn.make_corpus(1, 0, "http://h", single_image_fraction=1.5)
    fillers = [t for d in docs for t in d["text_list"] if syn.score_caption(t) == (None, None)]
    assert fillers, "documents should hold filler sentences too"


def test_heldout_combinations_never_in_training_docs():
    docs = syn.make_corpus(300, seed=1, image_base_url="http://h")
    seen = {syn.ShapeSpec.parse(i["image_name"]).combo for d in docs for i in d["image_info"]}
    assert seen.isdisjoint(syn.HELDOUT)
    assert len(syn.HELDOUT) == len(syn.all_combos()) // 5
    # every colour x shape pair still appears in training (evaluation asks for new combinations)
    assert {(c, s) for c, s, _, _ in syn.TRAIN_COMBOS} == {(c, s) for c in syn.COLOURS for s in syn.SHAPES}
    prompts = syn.heldout_prompts(50, seed=2)
    assert len(prompts) == 50 and all(spec.combo in syn.HELDOUT for _, spec in prompts)
    assert {spec.combo for _, spec in prompts} == set(syn.HELDOUT)  # n >= |HELDOUT| covers them all
    assert syn.heldout_prompts(10, seed=2) == prompts[:10]
    images = syn.heldout_images(8, seed=2, size=32)
    assert all(img.size == (32, 32) and spec.combo in syn.HELDOUT for img, spec in images)


def test_image_names_round_trip_and_bad_names_are_explained():
    spec = syn.ShapeSpec("blue", "triangle", "small", "top", 2)
    assert syn.ShapeSpec.parse(spec.name + ".png") == spec
    with pytest.raises(ValueError, match="colour 'pink'"):
        syn.render_image("pink-circle-large-left-v0")
    with pytest.raises(ValueError, match="example"):
        syn.render_image("red-circle")
    with pytest.raises(ValueError, match="variant"):
        syn.render_image("red-circle-large-left-v99")


def test_render_draws_the_shape_where_asked():
    img = np.asarray(syn.render_image("red-square-large-left-v0", 64)).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 80)
    ys, xs = np.nonzero(red)
    assert xs.mean() < 28 and abs(ys.mean() - 32) < 3  # left, vertically centred
    assert (img[0, 0] == 255).all()  # plain white background


def _all_specs():
    return [syn.ShapeSpec(*c, variant=v) for c in syn.all_combos() for v in range(syn.NUM_VARIANTS)]


@pytest.mark.parametrize("size", [16, 32, 64])
def test_scorer_is_exact_on_clean_renders(size):
    wrong = [s.name for s in _all_specs() if syn.score_image(syn.render_spec(s, size)) != (s.colour, s.shape)]
    assert wrong == []


@pytest.mark.parametrize("size,blur,noise,min_shape", [(32, 0.8, 8, 0.99), (16, 0.6, 8, 0.97), (32, 1.5, 15, 0.97)])
def test_scorer_survives_downscale_blur_noise(size, blur, noise, min_shape):
    specs = _all_specs()
    reads = [syn.score_image(syn.degrade(syn.render_spec(s, 64), size, blur, noise, seed=i))
             for i, s in enumerate(specs)]
    colour = np.mean([r[0] == s.colour for r, s in zip(reads, specs)])
    shape = np.mean([r[1] == s.shape for r, s in zip(reads, specs)])
    assert colour == 1.0
    assert shape >= min_shape


def test_scorer_is_not_fooled_by_a_blank_or_by_background_noise():
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    colour, shape = syn.score_image(blank)  # defined answer, no crash on an empty mask
    assert colour in syn.COLOURS and shape in syn.SHAPES
    spec = syn.ShapeSpec("green", "triangle", "large", "center")
    noisy = syn.degrade(syn.render_spec(spec, 64), 32, 0.0, 25.0)
    assert syn.score_image(noisy) == ("green", "triangle")
    wide = syn.render_spec(spec, 48).resize((64, 48))  # non-square input is squared first
    assert syn.score_image(wide)[0] == "green"


def test_score_caption_reads_words():
    assert syn.score_caption("Next, a small Blue square at the top.") == ("blue", "square")
    assert syn.score_caption("two circles") == (None, "circle")
    assert syn.score_caption("nothing here") == (None, None)
    assert syn.score_caption("a reddish thing") == (None, None)  # whole words only


def test_image_server_serves_pngs_and_404s():
    with syn.ImageServer(size=32) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        url = f"{server.base_url}/yellow-circle-small-right-v1.png"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/png"
            img = Image.open(io.BytesIO(resp.read()))
        assert img.size == (32, 32)
        assert syn.score_image(img) == ("yellow", "circle")
        for bad in ("/pink-circle-small-right-v1.png", "/yellow-circle-small-right-v1.jpg", "/"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(server.base_url + bad, timeout=5)
            assert err.value.code == 404
        assert server.requests == 4
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.base_url


def test_corpus_urls_resolve_on_the_server():
    with syn.ImageServer() as server:
        doc = syn.make_corpus(1, seed=5, image_base_url=server.base_url)[0]
        for info in doc["image_info"]:
            with urllib.request.urlopen(info["raw_url"], timeout=5) as resp:
                body = resp.read()
            spec = syn.ShapeSpec.parse(info["image_name"])
            assert syn.score_image(Image.open(io.BytesIO(body))) == (spec.colour, spec.shape)


def test_evaluate_scores_a_model_end_to_end():
    """evaluate() runs the real generation helpers on held-out cases and reports fractions."""
    import torch

    from dreamcore.config import tiny
    from dreamcore.model import DreamLLM
    from dreamcore.tokenizer import DreamTokenizer

    cfg = tiny()
    docs = syn.make_corpus(20, seed=0, image_base_url="http://h")
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                               corpus_texts=[t for d in docs for t in d["text_list"]])
    torch.manual_seed(0)
    model = DreamLLM(cfg, tok)
    model.train()
    report = syn.evaluate(model, tok, num_prompts=3, num_images=2, num_inference_steps=2)
    assert model.training  # restored
    assert (report.num_prompts, report.num_images) == (3, 2)
    for acc, n in ((report.image_colour_acc, 3), (report.image_shape_acc, 3), (report.caption_acc, 2)):
        assert 0.0 <= acc <= 1.0 and round(acc * n, 6) == int(round(acc * n))
    assert report.chance_colour == pytest.approx(1 / 6) and report.chance_caption == pytest.approx(1 / 18)
    prompts = [s["prompt"] for s in report.samples if "prompt" in s]
    assert prompts == [p for p, _ in syn.heldout_prompts(3, 0)]
    assert all(len(line) > 0 for line in report.lines())


def test_tiny_preset_decoder_predicts_v():
    """epsilon prediction + cosine schedule ignored the prompt at the first sampler steps."""
    from dreamcore.config import tiny

    assert tiny().decoder.prediction_type == "v_prediction"
