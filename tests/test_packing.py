"""Document-masked packing: a document packed with others computes exactly what it computes alone.

Rows go through the real data path (encode_document -> pack(packing=True) -> to_sample with PNG
bytes -> decode_batch -> to_torch). Positions restart at each document (decode_batch, from
`doc_lengths`) and DreamLLM.forward passes no 2D mask, so transformers builds the block-diagonal
causal mask; a row of one document builds none (sdpa's is_causal fast path).
"""

from __future__ import annotations

import pytest
import torch
from _model_helpers import COLOURS, debug_config, debug_model, one_thread, png, solid_image  # noqa: F401
from transformers.masking_utils import create_causal_mask

from dreamcore.batch import decode_batch, to_torch
from dreamcore.model import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")

# Two interleaved documents (each image: dream block, then comprehension block; the first has two
# images) and a text-only one: 3 documents (71 + 50 + 27 tokens), 3 images, one packed row of 192.
DOCS = [
    ["a red circle", 0, "the green triangle", 1],
    ["here is a picture", 0, "of a purple star"],
    ["two yellow squares next to a blue circle"],
]
TOL = 1e-5


def _batch(cfg, tok, encoded, positions, packing):
    """SAMPLE_SCHEMA rows of `encoded` (document positions `positions` pick each image's colour)."""
    rows = tok.pack(encoded, cfg.max_seq_len, cfg.images_per_sample, packing=packing)
    res = cfg.image_resolution
    records = [row.to_sample(f"s{r}", [png(solid_image(COLOURS[(positions[pos] + 2 * img) % len(COLOURS)], res))
                                       for pos, img in row.images])
               for r, row in enumerate(rows)]
    columns = {k: [rec[k] for rec in records] for k in records[0]}
    return rows, to_torch(decode_batch(columns, cfg))


def _run(model, batch):
    """forward(batch) -> (lm_loss, logits (B, T-1, V), dream conditions (K, Q, C)), read by hooks."""
    seen = {}
    hooks = [model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o)),
             model.cond_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("cond", o))]
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        for h in hooks:
            h.remove()
    return out["lm_loss"], seen["logits"], seen.get("cond")  # no cond without a dream block


def _doc_loss(logits, labels, start, end):
    """Mean next-token CE of the targets inside [start, end) (what forward computes for a lone doc)."""
    return torch.nn.functional.cross_entropy(logits[start:end - 1].float(), labels[start + 1:end],
                                             ignore_index=IGNORE_INDEX)


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def packed_setup():
    cfg = debug_config(max_seq_len=192)
    model, tok = debug_model(cfg)
    encoded = [tok.encode_document(d, max_len=cfg.max_seq_len, max_images=cfg.images_per_sample) for d in DOCS]
    rows, packed = _batch(cfg, tok, encoded, [0, 1, 2], packing=True)
    assert len(rows) == 1 and rows[0].doc_lengths == [len(e) for e in encoded]
    assert rows[0].num_tokens < cfg.max_seq_len  # padded: every document's logits are in the (T-1) window
    alone = [_batch(cfg, tok, [e], [i], packing=False)[1] for i, e in enumerate(encoded)]
    return model.eval(), rows[0], packed, alone


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_match_each_document_run_alone(packed_setup, attn):
    model, row, packed, alone = packed_setup
    model.llm.set_attn_implementation(attn)
    try:
        packed_loss, logits, cond = _run(model, packed)
        results = [_run(model, b) for b in alone]
    finally:
        model.llm.set_attn_implementation("sdpa")
    labels = packed["labels"][0]
    starts = [sum(row.doc_lengths[:i]) for i in range(len(row.doc_lengths))]
    diffs = {}
    per_doc, n_targets = [], []
    for i, ((loss_alone, logits_alone, _), s, n) in enumerate(zip(results, starts, row.doc_lengths)):
        diffs[f"logits doc {i}"] = _max_diff(logits[0, s:s + n], logits_alone[0, :n])
        loss_packed = _doc_loss(logits[0], labels, s, s + n)
        diffs[f"lm_loss doc {i}"] = abs(float(loss_packed - loss_alone))
        per_doc.append(loss_packed)
        n_targets.append(int((labels[s + 1:s + n] != IGNORE_INDEX).sum()))
    # The dream conditions that feed the diffusion loss: one (Q, C) per dream block, in row order.
    conds_alone = torch.cat([c for _, _, c in results if c is not None])
    assert cond.shape == conds_alone.shape == (3, model.num_queries, model.cond_proj.out_features)
    diffs["dream conditions"] = _max_diff(cond, conds_alone)
    # The row's lm_loss is the target-weighted mean of its documents' losses.
    weighted = sum(loss * k for loss, k in zip(per_doc, n_targets)) / sum(n_targets)
    diffs["row lm_loss"] = abs(float(packed_loss - weighted))
    print(f"{attn}: max abs diffs {diffs}")
    assert max(diffs.values()) < TOL, diffs


def test_training_mode_masks_too(packed_setup):
    """config.use_cache is True: unless forward turns the cache off, transformers gets a cache and
    skips the packed-sequence detection (a plain causal mask); train() must not bring that back."""
    model, row, packed, alone = packed_setup
    model.train()
    try:
        _, logits, _ = _run(model, packed)
        _, logits_alone, _ = _run(model, alone[1])
    finally:
        model.eval()
    s, n = row.doc_lengths[0], row.doc_lengths[1]
    assert _max_diff(logits[0, s:s + n], logits_alone[0, :n]) < TOL


def test_without_restarting_positions_documents_see_each_other(packed_setup):
    """The old behaviour (one causal sequence per row; the old padding mask changes no real token):
    the first document is unchanged, the later ones are not."""
    model, row, packed, _ = packed_setup
    _, masked, cond_masked = _run(model, packed)
    T = packed["input_ids"].shape[1]
    old = dict(packed, position_ids=torch.arange(T).expand(1, T).clone())
    _, crossed, cond_crossed = _run(model, old)
    s1 = row.doc_lengths[0]
    s2 = s1 + row.doc_lengths[1]
    assert _max_diff(masked[0, :s1], crossed[0, :s1]) < TOL
    assert _max_diff(masked[0, s1:s2], crossed[0, s1:s2]) > 1e-3
    assert _max_diff(cond_masked[2], cond_crossed[2]) > 1e-3  # document 2's dream block


def test_transformers_builds_the_block_mask_only_for_packed_rows(packed_setup):
    """One document a row (positions 0..T-1): no mask, so sdpa keeps its is_causal fast path."""
    model, row, packed, alone = packed_setup
    config = model.llm.config
    embeds = torch.zeros(1, packed["input_ids"].shape[1], config.hidden_size)
    assert create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=alone[0]["position_ids"]) is None
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=packed["position_ids"])
    s1, s2 = row.doc_lengths[0], row.doc_lengths[0] + row.doc_lengths[1]
    assert mask is not None and mask.shape[-2:] == embeds.shape[1:2] * 2
    assert not mask[0, 0, s1:s2, :s1].any()  # document 1 never sees document 0
    assert mask[0, 0, s1:s2, s1:s2].equal(torch.ones(s2 - s1, s2 - s1, dtype=torch.bool).tril())


def test_forward_refuses_a_batch_without_position_ids(packed_setup):
    model, _, packed, _ = packed_setup
    batch = {k: v for k, v in packed.items() if k != "position_ids"}
    with pytest.raises(ValueError, match="position_ids.*decode_batch"):
        model(batch)
