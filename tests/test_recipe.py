"""The embedded default's one recipe (pipelines.recipe): what the demo and bench/quality.py train."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dreamcore import synthetic
from dreamcore.config import ConfigError
from pipelines.demo import demo_recipe
from pipelines.recipe import GLOBAL_BATCH, shapes_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("workers", [1, 2])
def test_the_global_batch_is_the_recipes_whatever_the_workers(workers):
    r = shapes_tiny(workers)
    assert r.train.scaling.workers == workers
    assert r.train.global_batch_size(workers) == GLOBAL_BATCH
    assert r.train.max_steps == 1200 and r.train.max_minutes == 0  # steps, never a wall clock
    for d in r.datasets:
        assert d.curate.model == "tiny" and r.train.model.max_seq_len == d.curate.model_config().max_seq_len
    # DreamLLM stage II: interleaved documents packed with document masking, plus pairs.
    stories, pairs = r.dataset("stories"), r.dataset("pairs")
    assert (stories.curate.tokenize.pair_layout, stories.curate.tokenize.packing) == ("interleaved", "pack")
    assert (pairs.curate.tokenize.pair_layout, pairs.curate.tokenize.packing) == ("pairs", "pack")
    assert stories.corpus.story_fraction == 1.0 and pairs.corpus.single_image_fraction == 1.0
    assert 0 < stories.weight < pairs.weight
    with pytest.raises(ConfigError, match="no dataset 'mmc4'"):
        r.dataset("mmc4")
    with pytest.raises(ConfigError, match="divide the global batch"):
        shapes_tiny(3)


def test_recipes_are_independent_copies():
    a, b = shapes_tiny(), shapes_tiny()
    a.dataset("pairs").curate.tokenize.packing = "truncate"
    a.train.optim.lr = 1.0
    assert b.dataset("pairs").curate.tokenize.packing == "pack" and b.train.optim.lr == 2e-3


def test_demo_flags_apply_onto_the_recipe_one_way():
    base = shapes_tiny()
    r = demo_recipe(workers=1, docs=100, overrides=["optim.lr=3e-3"])
    assert (r.train.optim.lr, r.train.micro_batch_size) == (3e-3, GLOBAL_BATCH)
    docs = [d.corpus.num_docs for d in r.datasets]  # --docs scales the mixture's corpora in proportion
    assert sum(docs) == 100 and docs[0] / docs[1] == pytest.approx(
        base.datasets[0].corpus.num_docs / base.datasets[1].corpus.num_docs, rel=0.05)
    quick = demo_recipe(quick=True)
    assert quick.train.max_steps == 20 and sum(d.corpus.num_docs for d in quick.datasets) == 60
    assert quick.eval.num_prompts == 12
    assert demo_recipe(train_minutes=5).train.max_minutes == 5  # an explicit cap only
    with pytest.raises(ConfigError, match="optim.lrr"):
        demo_recipe(overrides=["optim.lrr=1"])


def test_bench_lays_out_data_with_curations_code():
    """bench/quality.py rows are curation's: a one-image document is a creation row (sentence as
    context, dream block) and a comprehension row (image, then the matched sentence as target)."""
    from quality import build_rows

    from dreamcore.tokenizer import DreamTokenizer

    r = shapes_tiny()
    cfg, pairs = r.train.model, r.dataset("pairs")
    docs = synthetic.make_corpus(6, seed=0, image_base_url="http://h", single_image_fraction=1.0)
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                               corpus_texts=[t for d in docs for t in d["text_list"]])
    # One sequence a row (curation's truncate layout) shows each sequence; the recipe packs them.
    rows = build_rows(cfg, docs, tok, "truncate", pairs.curate.tokenize.pair_layout)
    packed = build_rows(cfg, docs, tok, pairs.curate.tokenize.packing, pairs.curate.tokenize.pair_layout)
    assert packed["input_ids"].shape[0] < rows["input_ids"].shape[0] == 2 * len(docs)
    for key in ("dream_slots", "image_slots"):  # the same blocks, fewer rows
        assert (packed[key] >= 0).sum() == (rows[key] >= 0).sum() == len(docs)
    creation, comprehension = slice(0, None, 2), slice(1, None, 2)
    assert (rows["dream_slots"][creation][:, 0] >= 0).all() and (rows["image_slots"][creation][:, 0] < 0).all()
    assert (rows["image_slots"][comprehension][:, 0] >= 0).all() and (rows["dream_slots"][comprehension][:, 0] < 0).all()
    sentence = docs[1]["text_list"][docs[1]["image_info"][0]["matched_text_index"]]
    target = [t for t in rows["labels"][3] if t >= 0]  # document 1's comprehension row
    assert tok.decode(target).strip() == sentence.strip()
