"""Safety filters (pipelines/curate/safety.py) with the models the tests build: a tiny CLIP with an
MLP trained here to flag one colour, a fastText model trained here on two languages, and OpenCV's
own cascade file. No Ray: the rules run on document rows as the filter stage runs them."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from _curate_helpers import save_tiny_clip  # noqa: E402

from pipelines.curate.config import FilterConfig  # noqa: E402
from pipelines.curate.filters import FilterStage  # noqa: E402
from pipelines.curate.readers import empty_image  # noqa: E402
from pipelines.curate.safety import (  # noqa: E402
    FaceRule,
    FlaggedWordRule,
    LanguageRule,
    NSFWClassifier,
    NSFWRule,
    SafetyConfig,
    StopWordRule,
    document_rules,
    image_rules,
)

PROSE = ["The cat sat on the mat and looked at the window for a while.", "It was a quiet day in the house."]
SPAM = ["cheap watches replica bags discount sale buy now", "best price watches bags shoes online shop"]


def doc(texts: list[str], images: list[dict] | None = None) -> dict:
    return {"texts": texts, "images": images or [], "drop_stage": "", "reason": "", "error": ""}


def test_stop_word_ratio_keeps_prose_and_drops_keyword_lists():
    rule = StopWordRule(0.3)
    assert rule.check_document(doc(PROSE)) is None
    reason = rule.check_document(doc(SPAM))
    assert reason is not None and reason.startswith("stop_word_ratio (0.") and reason.endswith("< 0.3)")


def test_flagged_words_come_from_the_teams_file(tmp_path):
    listing = tmp_path / "flagged.txt"
    listing.write_text("# our list\nreplica\ndiscount\n")
    cfg = SafetyConfig(flagged_words_max_ratio=0.05, flagged_words_file=str(listing))
    (rule,) = document_rules(cfg)
    assert isinstance(rule, FlaggedWordRule)
    assert rule.check_document(doc(PROSE)) is None
    assert rule.check_document(doc(SPAM)).startswith("flagged_word_ratio (0.")
    assert SafetyConfig(flagged_words_max_ratio=0.05).problems() == [
        "safety.flagged_words_max_ratio is set but safety.flagged_words_file is not; give a file of flagged "
        "words (one per line)"]


@pytest.fixture(scope="module")
def lid_model(tmp_path_factory) -> str:
    """A fastText classifier on English vs French lines, saved as a .bin like lid.176.bin."""
    import fasttext

    tmp = tmp_path_factory.mktemp("lid")
    en = ["the cat sits on the mat", "it was a quiet day in the house", "we walked to the river with the dog",
          "this is a picture of a red circle", "the weather is nice today"]
    fr = ["le chat est sur le tapis", "c'était une journée calme à la maison", "nous avons marché vers la rivière",
          "ceci est une image d'un cercle rouge", "il fait beau aujourd'hui"]
    train = tmp / "train.txt"
    train.write_text("".join(f"__label__en {s}\n" for s in en * 20) + "".join(f"__label__fr {s}\n" for s in fr * 20))
    model = fasttext.train_supervised(str(train), epoch=25, minn=2, maxn=4, dim=16, seed=0, thread=1, verbose=0)
    path = tmp / "lid.bin"
    model.save_model(str(path))
    return str(path)


def test_language_identification_drops_other_languages(lid_model):
    rule = LanguageRule(lid_model, ["en"], 0.5)
    assert rule.check_document(doc(["The dog is in the house with the cat."])) is None
    reason = rule.check_document(doc(["Le chien est dans la maison avec le chat."]))
    assert reason is not None and reason.startswith("language (fr, score")
    assert LanguageRule(lid_model, ["en", "fr"], 0.999).check_document(doc(["la maison"])).startswith("language (")
    assert SafetyConfig(language_model="/nope/lid.bin").problems()[0].startswith("safety.language_model=/nope")


def png(color: str, size: int = 32, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), color)  # the colour fills the picture; a white spot varies
    x, y, r = rng.randint(2, size // 2), rng.randint(2, size // 2), rng.randint(size // 8, size // 3)
    ImageDraw.Draw(im).ellipse([x, y, x + r, y + r], fill="white")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_faces_from_the_data_field_or_the_detector(tmp_path):
    import cv2

    data_rule = FaceRule(None)
    assert data_rule.check({"face_count": 2, "data": b""}, {}) == "face_detected (2 faces)"
    assert data_rule.check({"face_count": 0, "data": png("red")}, {}) is None
    assert data_rule.check({"face_count": -1, "data": png("red")}, {}) is None  # no field, no detector: kept
    cascade = str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml")
    (rule,) = image_rules(SafetyConfig(drop_faces=True, face_detector=cascade))
    assert rule.check({"face_count": -1, "data": png("red", 96)}, {}) is None  # a circle is no face
    assert rule.check({"face_count": 1, "data": png("red", 96)}, {}) == "face_detected (1 face)"  # the field wins
    bad = tmp_path / "bad.xml"
    bad.write_text("<nope/>")
    with pytest.raises(ValueError, match="not an OpenCV cascade"):
        FaceRule(str(bad))
    assert SafetyConfig(face_detector=cascade).problems() == [
        "safety.face_detector is set but safety.drop_faces is false; set drop_faces: true"]


@pytest.fixture(scope="module")
def nsfw_folder(tmp_path_factory) -> Path:
    """A tiny CLIP and a linear probe on its embeddings trained to flag red shapes (the stand-in
    for 'unsafe'), saved the way a team saves its own classifier."""
    tmp = tmp_path_factory.mktemp("nsfw")
    clip = save_tiny_clip(tmp / "clip")
    probe = NSFWClassifier.build(16, [])
    NSFWClassifier.save_pretrained(tmp / "nsfw", probe, "../clip", [], threshold=0.5)
    model = NSFWClassifier(str(tmp / "nsfw"))
    images = [png("red", seed=i) for i in range(24)] + [png("blue", seed=i) for i in range(24)]
    labels = torch.tensor([1.0] * 24 + [0.0] * 24)
    emb = model.embed(images).clone()  # out of inference mode, to train on
    torch.manual_seed(0)
    opt = torch.optim.Adam(probe.parameters(), lr=0.1)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(emb).squeeze(-1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert clip.is_dir()
    return NSFWClassifier.save_pretrained(tmp / "nsfw", probe, "../clip", [], threshold=0.5)


def test_nsfw_classifier_flags_what_it_was_trained_to_flag(nsfw_folder):
    rule = NSFWRule(SafetyConfig(nsfw_model=str(nsfw_folder)))
    held_out = [png("red", seed=100 + i) for i in range(6)] + [png("blue", seed=100 + i) for i in range(6)]
    reasons = rule.reasons([{"data": b} for b in held_out])
    flagged = np.array([r is not None for r in reasons])
    assert flagged[:6].all() and not flagged[6:].any(), reasons
    assert reasons[0].startswith("nsfw (p=")
    strict = NSFWRule(SafetyConfig(nsfw_model=str(nsfw_folder), nsfw_threshold=1.0))
    assert strict.reasons([{"data": held_out[0]}]) == [None]


def test_a_missing_or_broken_classifier_is_a_clear_error(tmp_path):
    assert SafetyConfig(nsfw_model=str(tmp_path / "nope")).problems()[0].startswith("safety.nsfw_model=")
    (tmp_path / "broken").mkdir()
    with pytest.raises(ValueError, match="not a loadable classifier folder"):
        NSFWClassifier(str(tmp_path / "broken"))


def _image(data: bytes, faces: int = -1) -> dict:
    img = empty_image("http://example.org/x.png", face_count=faces)
    img |= {"data": data, "orig_width": 200, "orig_height": 200, "width": 32, "height": 32}
    return img


def test_the_filter_stage_runs_every_configured_safety_rule(nsfw_folder, lid_model, tmp_path):
    """The stage the job runs (crawl_filter_udf -> FilterStage): each rule drops what it should, with
    stage "filter" and its reason name (the manifest's key); nothing else is touched."""
    listing = tmp_path / "flagged.txt"
    listing.write_text("replica\n")
    safety = SafetyConfig(nsfw_model=str(nsfw_folder), drop_faces=True, stop_words_min_ratio=0.2,
                          flagged_words_max_ratio=0.05, flagged_words_file=str(listing))
    prose = PROSE + ["We walked to the river with the dog and it was a nice day."]
    docs = [
        doc(prose, [_image(png("blue", seed=1)), _image(png("red", seed=2)), _image(png("blue", seed=3), faces=2)]),
        doc(SPAM + ["cheap shoes bags watches replica discount outlet"], [_image(png("blue", seed=4))]),
        doc(prose + ["A replica of the house, the replica of a replica."], [_image(png("blue", seed=6))]),
    ]
    out = FilterStage(FilterConfig(), safety)(docs)
    first, spam, flagged = out
    assert not first["drop_stage"]
    assert [(i["drop_stage"], i["reason"]) for i in first["images"]] == [
        ("", ""), ("filter", "nsfw"), ("filter", "face_detected")]
    assert (spam["drop_stage"], spam["reason"]) == ("filter", "stop_word_ratio")
    assert (flagged["drop_stage"], flagged["reason"]) == ("filter", "flagged_word_ratio")
    assert all(i["reason"] == "document_dropped" for d in (spam, flagged) for i in d["images"])
    french = doc(["Le chat est sur le tapis et la maison est calme avec le chien dans le jardin.",
                  "Il fait beau aujourd'hui et nous avons marché vers la rivière."], [_image(png("blue", seed=5))])
    english = doc(["The cat sits on the mat and it was a quiet day in the house with the dog."])
    french, english = FilterStage(FilterConfig(), SafetyConfig(language_model=lid_model))([french, english])
    assert (french["drop_stage"], french["reason"], english["drop_stage"]) == ("filter", "language", "")
    plain = FilterStage(FilterConfig())(
        [doc(prose, [_image(png("red", seed=2)), _image(png("blue", seed=3), faces=2)])])
    assert not any(i["drop_stage"] for i in plain[0]["images"])  # no safety config: no safety rule


def test_a_bad_safety_path_stops_the_job_before_ray(tmp_path):
    """curate() names the setting and the fix; no Ray work starts (ray.is_initialized stays as it was)."""
    import ray

    from pipelines.curate.config import CurateConfig
    from pipelines.curate.job import CurateError, curate

    was = ray.is_initialized()
    shard = tmp_path / "s.jsonl"
    shard.write_text("{}\n")
    for setting, value, message in [
        ("nsfw_model", str(tmp_path / "nope"), "safety.nsfw_model="),
        ("language_model", str(shard), "is not a fastText model"),
        ("face_detector", str(shard), "safety.face_detector is set but safety.drop_faces is false"),
    ]:
        cfg = CurateConfig()
        setattr(cfg.safety, setting, value)
        with pytest.raises(CurateError, match=message):
            curate([str(shard)], tmp_path / "out", cfg)
    assert ray.is_initialized() == was
