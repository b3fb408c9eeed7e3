"""The shapes world: determinism, MMC4 format, stories, held-out split, scorer accuracy, the image
server, the Wilson interval and evaluate() end to end."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import random
import urllib.error
import urllib.request

import numpy as np
import pytest
from _model_helpers import one_thread  # noqa: F401 (fixture)
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
def test_scorer_reads_all_four_attributes_exactly_on_clean_renders(size):
    """Every combination x every jittered rendering, at the tiny decoder's 16 px and up."""
    specs = _all_specs()
    reads = [syn.score_image_all(syn.render_spec(s, size)) for s in specs]
    wrong = [(s.name, tuple(r)) for s, r in zip(specs, reads) if r != syn.Attributes.of(s)]
    assert wrong == []
    for s in specs[::37]:  # score_image is the same reading, and arrays read as PIL images do
        img = syn.render_spec(s, size)
        assert syn.score_image(img) == (s.colour, s.shape)
        assert syn.score_image_all(np.asarray(img)) == syn.Attributes.of(s)


@pytest.mark.parametrize("size,blur,noise,min_shape,min_position",
                         [(32, 0.8, 8, 0.99, 1.0), (16, 0.6, 8, 0.97, 1.0), (32, 1.5, 15, 0.97, 1.0),
                          (16, 0.0, 25, 0.97, 0.99)])
def test_scorer_survives_downscale_blur_noise(size, blur, noise, min_shape, min_position):
    specs = _all_specs()
    reads = [syn.score_image_all(syn.degrade(syn.render_spec(s, 64), size, blur, noise, seed=i))
             for i, s in enumerate(specs)]
    acc = {a: np.mean([getattr(r, a) == getattr(s, a) for r, s in zip(reads, specs)]) for a in syn.ATTRIBUTES}
    assert acc["colour"] == 1.0 and acc["size"] == 1.0
    assert acc["shape"] >= min_shape
    assert acc["position"] >= min_position


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


def test_read_caption_reads_all_four_from_every_template():
    A = syn.Attributes
    assert syn.read_caption("Next, a small Blue square at the top.") == A("blue", "square", "small", "top")
    assert syn.read_caption("Picture a cyan triangle, large, in the center.") == A("cyan", "triangle", "large", "center")
    assert syn.read_caption("It is big and sits in the middle") == A(None, None, "large", "center")
    assert syn.read_caption("") == A(None, None, None, None)
    assert syn.read_caption("a reddish smallish topping") == A(None, None, None, None)  # whole words only
    for combo in syn.all_combos():
        spec = syn.ShapeSpec(*combo)
        for template in syn._LEADS:  # every describing sentence names all four
            assert syn.read_caption(syn._fill(template, spec)) == A.of(spec)
        for template in syn._CAPTIONS:  # every caption names colour and shape, and nothing wrong
            read = syn.read_caption(syn._fill(template, spec))
            assert read[:2] == (spec.colour, spec.shape)
            assert all(r in (None, t) for r, t in zip(read, A.of(spec)))


def test_change_sentences_name_only_what_changes():
    a = syn.ShapeSpec("red", "circle", "small", "left")
    b = syn.ShapeSpec("green", "circle", "small", "right")
    assert syn.change_sentence(a, b) == "Then it turns green and moves to the right."
    c = syn.ShapeSpec("green", "square", "large", "right")
    assert syn.read_caption(syn.change_sentence(b, c)) == syn.Attributes(None, "square", "large", None)
    assert syn.implied_attributes(syn.Attributes.of(a), "It is a red circle. Then it turns green and moves "
                                  "to the right.") == syn.Attributes.of(b)
    assert syn.implied_attributes(syn.Attributes.of(b), "Now it shrinks and moves to the top.") == \
        syn.Attributes("green", "circle", "small", "top")
    assert syn.sentences("It is red. Then it grows! trailing") == ["It is red.", "Then it grows!", "trailing"]
    assert syn.first_sentence("  A red circle. More.") == "A red circle." and syn.first_sentence("") == ""
    with pytest.raises(ValueError, match="at least one attribute"):
        syn.change_sentence(a, a)


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


def _story_docs(docs):
    return [d for d in docs if "/story/" in d["url"]]


def test_stories_respect_heldout_and_each_image_is_what_the_text_implies():
    from pipelines.curate.similarity import assign

    docs = syn.make_corpus(400, seed=1, image_base_url="http://h", single_image_fraction=0.3, story_fraction=0.5)
    stories = _story_docs(docs)
    assert 150 <= len(stories) <= 250
    assert {len(d["image_info"]) for d in stories} == {2, 3, 4}
    seen = {syn.ShapeSpec.parse(i["image_name"]).combo for d in docs for i in d["image_info"]}
    assert seen.isdisjoint(syn.HELDOUT)  # no held-out combination in any training image, stories included
    for doc in stories:
        assert set(doc) == MMC4_DOC_KEYS and all(set(i) == MMC4_IMAGE_KEYS for i in doc["image_info"])
        texts = doc["text_list"]
        assert len(set(texts)) == len(texts)  # no repeated sentence (curation drops repetitive documents)
        story = syn.story_of(doc)
        truth = [syn.Attributes.of(s) for s in story.specs]
        assert story.implied() == truth  # image k's spec is exactly what the text implies
        assert syn.read_caption(story.sentences[0]) == truth[0]  # the first sentence names all four
        for k, info in enumerate(doc["image_info"]):
            m = info["matched_text_index"]
            # the sentence after each image captions it: its colour and shape
            assert syn.read_caption(texts[m + 1])[:2] == truth[k][:2]
            if k == 0:
                continue
            prev, spec = story.specs[k - 1], story.specs[k]
            changed = syn.changed_attributes(prev, spec)
            assert 1 <= len(changed) <= 2 and spec.combo not in {s.combo for s in story.specs[:k]}
            named = {a for a, v in zip(syn.ATTRIBUTES, syn.read_caption(texts[m])) if v is not None}
            assert syn.is_change(texts[m]) and named == set(changed)  # it names only what changes
            assert m == doc["image_info"][k - 1]["matched_text_index"] + 2  # caption, then change sentence
        # MMC4's assignment over the document's matrix (what curation recomputes) keeps every match
        sims = np.asarray(doc["similarity_matrix"])
        got = assign(sims, threshold=0.15)
        assert [(c, r) for c, _, r in got] == [(i["matched_text_index"], "") for i in doc["image_info"]]
        assert all(i["matched_sim"] == max(row) for i, row in zip(doc["image_info"], sims.tolist()))


def test_story_fraction_default_keeps_corpora_and_is_checked():
    a = syn.make_corpus(60, seed=2, image_base_url="http://h")
    assert a == syn.make_corpus(60, seed=2, image_base_url="http://h", story_fraction=0.0)
    assert not _story_docs(a)
    only = syn.make_corpus(20, seed=2, image_base_url="http://h", single_image_fraction=0.0, story_fraction=1.0)
    assert len(_story_docs(only)) == 20
    assert syn.make_corpus(20, 2, "http://h", 0.5, 0.3) == syn.make_corpus(20, 2, "http://h", 0.5, 0.3)
    with pytest.raises(ValueError, match="story_fraction"):
        syn.make_corpus(1, 0, "http://h", single_image_fraction=0.8, story_fraction=0.3)
    with pytest.raises(ValueError, match="story images"):
        syn.make_story_document(random.Random(0), 0, "http://h", max_images=5)


def test_heldout_stories_are_heldout_and_deterministic():
    stories = syn.heldout_stories(40, num_images=4, seed=3)
    assert stories == syn.heldout_stories(40, num_images=4, seed=3) != syn.heldout_stories(40, 4, seed=4)
    for story in stories:
        assert len(story.specs) == len(story.sentences) == 4
        assert all(s.combo in syn.HELDOUT for s in story.specs)
        assert story.sentences[0] == syn.describe(story.specs[0])  # the evaluation prompt's phrasing
        assert story.implied() == [syn.Attributes.of(s) for s in story.specs]
        assert len({s.combo for s in story.specs}) == 4


def test_every_story_fits_the_tiny_layout():
    """A story is one interleaved row of the tiny preset (curation's "truncate" packing): no image
    block dropped, nothing truncated, with the byte-level BPE trained on the corpus itself."""
    from dreamcore.config import tiny
    from dreamcore.tokenizer import DreamTokenizer, interleave

    cfg = tiny()
    docs = syn.make_corpus(600, seed=0, image_base_url="http://h", single_image_fraction=0.5, story_fraction=0.5)
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                               corpus_texts=[t for d in docs for t in d["text_list"]])
    assert cfg.images_per_sample >= syn.STORY_MAX_IMAGES
    longest = 0
    for doc in _story_docs(docs):
        parts, problems = interleave(doc["text_list"], [i["matched_text_index"] for i in doc["image_info"]])
        enc = tok.encode_document(parts, max_len=cfg.max_seq_len, max_images=cfg.images_per_sample)
        assert not problems and not enc.dropped_images and not enc.truncated
        assert len(enc.image_indices) == len(doc["image_info"])
        longest = max(longest, len(enc.input_ids))
    assert longest <= cfg.max_seq_len
    # an evaluation story with every image drawn and every caption as long as evaluate allows fits too
    for story in syn.heldout_stories(50, num_images=syn.STORY_MAX_IMAGES):
        need = len(tok.encode_prompt(list(story.sentences)).input_ids) + syn.STORY_MAX_IMAGES * (
            cfg.image_block_len + syn.STORY_CAPTION_TOKENS) + 1
        assert need <= cfg.max_seq_len


def test_wilson_interval_on_known_values():
    assert syn.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = syn.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert syn.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert syn.wilson_interval(1, 10) == pytest.approx((0.0179, 0.4042), abs=1e-4)
    lo, hi = syn.wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert syn.wilson_interval(177, 216) == pytest.approx((0.7627, 0.8650), abs=1e-4)  # by hand
    from scipy.stats import binomtest

    for n in (1, 7, 36, 216, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert syn.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    with pytest.raises(ValueError):
        syn.wilson_interval(3, 2)
    f = syn.Figure(3, 4, chance=0.25)
    assert (f.value, f.chance) == (0.75, 0.25) and (f.low, f.high) == syn.wilson_interval(3, 4)
    assert "75.0%" in f.text() and "chance 25.0%" in f.text()


def test_score_story_reads_a_written_story_against_its_own_text():
    """Free stories: images 2+ against what the model's own change sentences imply; the sentence
    after each image against what the scorer reads from that image."""
    a = syn.ShapeSpec("red", "circle", "small", "left")
    b = syn.ShapeSpec("green", "circle", "small", "right")
    c = syn.ShapeSpec("green", "square", "large", "right")
    img = {s: np.asarray(syn.render_spec(s, 16)) for s in (a, b, c)}
    output = [img[a], "It shows a red circle. Then it turns green and moves to the right.", img[b],
              "This one is a blue square. Then it becomes a square and grows.", img[c]]
    got = syn.score_story(syn.Attributes.of(a), output, finish_reason="eos")
    assert got["image_hits"] == [True, True, True]
    assert got["caption_hits"] == [True, False, False]  # wrong colour; nothing after the last image
    assert got["parts"][2]["implied"] == syn.Attributes.of(b)._asdict() and got["parts"][1] == {}
    wrong = [img[a], "Then it turns green.", img[c]]  # text implies a green small circle on the left
    got = syn.score_story(syn.Attributes.of(a), wrong, finish_reason="length")
    assert got["image_hits"] == [True, False] and got["caption_hits"] == [False]
    assert syn.score_story(syn.Attributes.of(a), [img[a], img[b]])["caption_hits"] == [False]


def _eval_model(max_seq_len: int = 256):
    """The debug model (random init) with a BPE trained on the shapes corpus."""
    import torch
    from _model_helpers import debug_config

    from dreamcore.model import DreamLLM
    from dreamcore.tokenizer import DreamTokenizer

    cfg = debug_config(max_seq_len=max_seq_len)
    docs = syn.make_corpus(60, seed=0, image_base_url="http://h", story_fraction=0.5)
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                               corpus_texts=[t for d in docs for t in d["text_list"]])
    torch.manual_seed(0)
    return DreamLLM(cfg, tok), tok


@pytest.mark.usefixtures("one_thread")
def test_evaluate_scores_a_model_end_to_end():
    """evaluate() runs the real generation helpers on held-out cases and reports fractions with
    intervals, confusion tables and examples; the report is plain JSON."""
    model, tok = _eval_model()
    model.train()
    report = syn.evaluate(model, tok, num_prompts=3, num_images=2, num_inference_steps=2, num_stories=2,
                          story_images=3, num_free_stories=2, num_examples=1)
    assert model.training  # restored
    assert (report.num_prompts, report.num_images, report.num_stories, report.num_free_stories) == (3, 2, 2, 2)
    f = report.figures
    expected_n = {"image_all": 3, "image_size": 3, "caption_all": 2, "caption_colour_shape": 2,
                  "story_all": 2 * 2, "story_position": 4, "story_kept": 4, "story_caption": 2 * 3,
                  "free_story_drew": 2}
    for name, n in expected_n.items():
        assert f[name].n == n, name
    for task in ("image", "caption", "story"):  # shape split by the true size: the two parts make the whole
        parts = [f[k] for k in (f"{task}_shape_small", f"{task}_shape_large") if k in f]
        assert sum(p.n for p in parts) == f[f"{task}_shape"].n and sum(p.hits for p in parts) == f[f"{task}_shape"].hits
        assert all(p.chance == pytest.approx(1 / 3) for p in parts)
    assert set(f) <= set(syn.FIGURE_LABELS)
    for name, fig in f.items():
        assert 0.0 <= fig.low <= fig.value <= fig.high <= 1.0, name
        assert fig.n == 0 or fig.value == fig.hits / fig.n
        assert fig.chance is None or 0.0 < fig.chance < 1.0
    assert f["image_colour"].chance == pytest.approx(1 / 6) and f["image_all"].chance == pytest.approx(1 / 180)
    assert f["story_caption"].chance == pytest.approx(1 / 18) and f["free_story_drew"].chance is None
    assert 1 / 180 <= f["story_kept"].chance <= 1 / 2
    # the old names still answer
    assert f["image_colour"].chance == pytest.approx(1 / 6) and f["caption_colour_shape"].chance == pytest.approx(1 / 18)
    prompts = [s["prompt"] for s in report.samples if "prompt" in s]
    assert prompts == [p for p, _ in syn.heldout_prompts(3, 0)]
    assert all(len(line) > 0 for line in report.lines()) and len(report.lines()) == len(f)
    # confusion tables: one count per case and attribute
    for task, n in (("image", 3), ("caption", 2), ("story", 4)):
        for attr, table in report.confusion[task].items():
            assert set(table) == set(syn.ATTRIBUTE_VALUES[attr])
            assert sum(sum(row.values()) for row in table.values()) == n
    # examples: a few per task, images as PNG
    tasks = [e["task"] for e in report.examples]
    assert tasks == ["text_to_image", "caption", "story", "free_story"]
    story = report.examples[2]
    assert len(story["pngs"]) == len(story["read"]) == len(story["captions"]) == 3
    img = Image.open(io.BytesIO(base64.b64decode(story["pngs"][1])))
    assert img.size == (model.cfg.decoder.resolution,) * 2
    assert syn.score_image_all(img) == syn.Attributes(**story["read"][1])
    # summary.json and bench/quality.py's dataclasses.asdict are plain JSON
    d = json.loads(json.dumps(report.to_dict()))
    assert d["figures"]["image_all"]["n"] == 3 and d["figures"]["image_colour"]["value"] == f["image_colour"].value
    json.dumps(dataclasses.asdict(report))
    assert math.isclose(d["figures"]["story_all"]["high"], f["story_all"].high)
    # unset story counts follow the prompt count (num_prompts // 3 and // 6)
    small = syn.evaluate(model, tok, num_prompts=6, num_images=0, num_inference_steps=1, story_images=2)
    assert (small.num_stories, small.num_free_stories) == (2, 1) and small.figures["story_all"].n == 2


@pytest.mark.usefixtures("one_thread")
def test_evaluate_gives_a_perfect_drawer_full_marks(monkeypatch):
    """Plumbing check: with the decoder replaced by one that draws exactly what each held-out case
    asks for (in the order evaluate asks), every image figure is 100%."""
    import dreamcore.engine
    import dreamcore.generate

    seed, res = 3, 16
    wanted = [s for _, s in syn.heldout_prompts(4, seed)]
    wanted += [story.specs[k] for k in range(3) for story in syn.heldout_stories(3, 3, seed)]
    queue = iter(wanted)

    def oracle(decoder, dreams):
        return [np.asarray(syn.render_spec(next(queue), res)) for _ in dreams]

    monkeypatch.setattr(dreamcore.engine, "decode_dreams", oracle)
    monkeypatch.setattr(dreamcore.generate, "decode_dreams", oracle)
    model, tok = _eval_model()
    report = syn.evaluate(model, tok, num_prompts=4, num_images=0, seed=seed, num_stories=3, story_images=3,
                          num_free_stories=0)
    assert next(queue, None) is None  # every case drawn, in order
    for name in ("image_all", "story_all", "story_kept", "story_changed"):
        assert report.figures[name].value == 1.0, name
    assert report.figures["story_all"].n == 6
    table = report.confusion["story"]["colour"]
    assert all(n == 0 for t, row in table.items() for r, n in row.items() if r != t)


@pytest.mark.usefixtures("one_thread")
def test_free_stories_are_the_served_document_loop_and_stories_must_fit():
    """write_stories drives dreamcore.generate.Document as generate_document does: one story is the
    same document token for token; a story longer than the context is refused up front."""
    from dreamcore.generate import GenerationParams, generate_document

    model, tok = _eval_model()
    params = GenerationParams(max_new_tokens=40, max_images=3, temperature=0.7, top_p=0.9, seed=5,
                              num_inference_steps=2)
    prompt = syn.describe(syn.ShapeSpec(*syn.HELDOUT[0]))
    (doc,) = syn.write_stories(model, tok, [[prompt]], [params])
    ref = generate_document(model, tok, [prompt], params)
    assert [p for p in doc.output if isinstance(p, str)] == [p for p in ref if isinstance(p, str)]
    assert len(doc.output) == len(ref) and doc.finished
    short, tok2 = _eval_model(max_seq_len=128)
    with pytest.raises(ValueError, match="lower story_images"):
        syn.evaluate(short, tok2, num_prompts=0, num_images=0, num_stories=1, story_images=4, num_free_stories=0)


def test_tiny_preset_decoder_predicts_v():
    """epsilon prediction + cosine schedule ignored the prompt at the first sampler steps."""
    from dreamcore.config import tiny

    assert tiny().decoder.prediction_type == "v_prediction"


def test_shape_is_also_scored_by_the_true_size():
    """A small square read as a circle counts against the small shapes only (the report's split)."""
    col = syn._Collector(num_examples=0)
    col.attributes("image", syn.Attributes("red", "square", "small", "left"), syn.Attributes("red", "circle", "small", "left"))
    col.attributes("image", syn.Attributes("red", "square", "large", "left"), syn.Attributes("red", "square", "large", "left"))
    f = col.figures()
    assert (f["image_shape_small"].hits, f["image_shape_small"].n) == (0, 1)
    assert (f["image_shape_large"].hits, f["image_shape_large"].n) == (1, 1)
    assert (f["image_shape"].hits, f["image_shape"].n) == (1, 2)
