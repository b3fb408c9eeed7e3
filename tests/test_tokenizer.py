"""DreamTokenizer: layout and label masks, interleaving MMC4 documents, truncation, modes, packing,
save/load, content hash. A small BPE is trained once per module (a fraction of a second)."""

from __future__ import annotations

import pytest

from dreamcore.config import TokenizerConfig
from dreamcore.tokenizer import (
    IGNORE_INDEX,
    DreamTokenizer,
    EmptyDocumentError,
    interleave,
)

N, Q = 4, 3  # patch slots, dream query slots: small so layouts are easy to read
CORPUS = [
    "a red square next to a blue circle",
    "the green triangle sits above the yellow square",
    "two shapes: a purple circle and an orange triangle",
] * 20


@pytest.fixture(scope="module")
def tok() -> DreamTokenizer:
    return DreamTokenizer.build(TokenizerConfig(vocab_size=300), N, Q, corpus_texts=CORPUS)


def _text(tok: DreamTokenizer, s: str) -> list[int]:
    return tok.encode_text(s)


def _dream(tok: DreamTokenizer) -> list[int]:
    return [tok.dream_start_id] + [tok.im_patch_id] * Q + [tok.dream_end_id]


def _image(tok: DreamTokenizer) -> list[int]:
    return [tok.im_start_id] + [tok.im_patch_id] * N + [tok.im_end_id]


def test_special_token_ids_are_distinct_and_in_vocab(tok):
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_patch_id, tok.im_end_id,
           tok.dream_start_id, tok.dream_end_id]
    assert len(set(ids)) == len(ids)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size == len(tok.hf)


def test_layout_and_masks_one_image(tok):
    a, b = "a red square", "next to a blue circle"
    enc = tok.encode_document([a, 0, b])
    ta, tb = _text(tok, a), _text(tok, b)
    expected = [tok.bos_id, *ta, *_dream(tok), *_image(tok), *tb, tok.eos_id]
    assert enc.input_ids == expected
    dream_at = 1 + len(ta)
    assert enc.dream_slots == [dream_at + 1]
    assert enc.image_slots == [dream_at + Q + 2 + 1]
    assert enc.image_indices == [0]
    # Targets: text, <dream_start>, EOS. Masked: BOS, slots, <dream_end>, <im_start>, <im_end>.
    expected_labels = (
        [IGNORE_INDEX] + ta + [tok.dream_start_id] + [IGNORE_INDEX] * (Q + 1)
        + [IGNORE_INDEX] * (N + 2) + tb + [tok.eos_id]
    )
    assert enc.labels == expected_labels
    assert enc.num_text_tokens == len(ta) + len(tb)
    assert not enc.truncated and enc.dropped_images == []
    assert enc.input_ids[enc.image_slots[0] - 1] == tok.im_start_id
    assert enc.input_ids[enc.dream_slots[0] - 1] == tok.dream_start_id


def test_several_images_after_one_sentence_keep_order(tok):
    parts, problems = interleave(["a red square", "a blue circle"], [0, 0, 1])
    assert problems == []
    assert parts == ["a red square", 0, 1, "a blue circle", 2]
    enc = tok.encode_document(parts)
    assert enc.image_indices == [0, 1, 2]
    block = Q + 2 + N + 2
    assert enc.dream_slots[1] - enc.dream_slots[0] == block  # back to back after the sentence
    assert enc.image_slots == [d + Q + 2 for d in enc.dream_slots]


def test_interleave_orders_images_by_matched_chunk_not_list_order(tok):
    parts, _ = interleave(["first", "second", "third"], [2, 0])
    assert parts == ["first", 1, "second third", 0]


def test_interleave_accepts_numpy_indices_from_arrow():
    import numpy as np

    parts, problems = interleave(["first", "second"], np.array([1, 0], dtype=np.int32))
    assert parts == ["first", 1, "second", 0] and problems == []


def test_images_with_no_text(tok):
    parts, problems = interleave([], [0, 0])
    assert parts == [0, 1] and problems == []
    enc = tok.encode_document(parts)
    assert enc.input_ids == [tok.bos_id, *_dream(tok), *_image(tok), *_dream(tok), *_image(tok), tok.eos_id]
    assert enc.num_text_tokens == 0
    assert enc.image_indices == [0, 1]


def test_empty_document_raises_with_drop_reason(tok):
    parts, problems = interleave([], [])
    assert parts == [] and problems == []
    with pytest.raises(EmptyDocumentError) as err:
        tok.encode_document(parts)
    assert err.value.reason == "empty_document"
    with pytest.raises(EmptyDocumentError):
        tok.encode_document(["", ""])


def test_out_of_range_matched_index_is_reported(tok):
    parts, problems = interleave(["a red square", "a blue circle"], [1, 5, -1, None])
    assert parts == ["a red square a blue circle", 0]
    assert [(p.image, p.reason) for p in problems] == [
        (1, "matched_text_index_out_of_range"),
        (2, "matched_text_index_out_of_range"),
        (3, "matched_text_index_invalid"),
    ]
    assert "5" in problems[0].detail and "2 text chunks" in problems[0].detail


def test_truncation_never_cuts_a_block(tok):
    text = "the green triangle sits above the yellow square"
    parts = [text, 0, text, 1, text]
    full = tok.encode_document(parts)
    block = Q + 2 + N + 2
    t = len(_text(tok, text))
    # Room for BOS, the text, one image block and 2 tokens: image 1 cannot fit and is dropped.
    max_len = 1 + t + block + t + 2
    enc = tok.encode_document(parts, max_len=max_len)
    assert len(full) > max_len
    assert len(enc) == max_len
    assert enc.truncated and enc.dropped_images == [1] and enc.image_indices == [0]
    assert tok.eos_id not in enc.input_ids  # a cut document did not end
    # The kept block is whole; no stray block token after it.
    ids = enc.input_ids
    assert ids.count(tok.im_patch_id) == N + Q
    assert tok.im_start_id in ids and tok.im_end_id in ids
    assert ids[-2:] == _text(tok, text)[:2]  # text after the dropped image fills the room


def test_truncation_drops_block_that_straddles_the_end(tok):
    text = "a red square"
    block = Q + 2 + N + 2
    for max_len in range(2, 1 + len(_text(tok, text)) + block + 1):
        enc = tok.encode_document([text, 0], max_len=max_len)
        assert len(enc) <= max_len
        kept = enc.image_indices == [0]
        assert kept == (tok.im_end_id in enc.input_ids) == (tok.dream_start_id in enc.input_ids)
        assert enc.input_ids.count(tok.im_patch_id) in (0, N + Q)


def test_max_images_drops_extra_images(tok):
    enc = tok.encode_document(["a", 0, 1, 2], max_images=2)
    assert enc.image_indices == [0, 1] and enc.dropped_images == [2]


def test_image_to_text_mode(tok):
    cap = "a red square next to a blue circle"
    enc = tok.encode_document([cap, 0], mode="image-to-text")
    tc = _text(tok, cap)
    assert enc.input_ids == [tok.bos_id, *_image(tok), *tc, tok.eos_id]
    assert enc.labels == [IGNORE_INDEX] * (N + 3) + tc + [tok.eos_id]
    assert enc.image_slots == [2] and enc.dream_slots == [-1]


def test_text_to_image_mode(tok):
    cap = "a red square next to a blue circle"
    enc = tok.encode_document([cap, 0], mode="text-to-image")
    tc = _text(tok, cap)
    assert enc.input_ids == [tok.bos_id, *tc, *_dream(tok), tok.eos_id]
    # The caption is the condition (masked); <dream_start> and EOS are the targets.
    assert enc.labels == [IGNORE_INDEX] * (1 + len(tc)) + [tok.dream_start_id] + [IGNORE_INDEX] * (Q + 1) + [tok.eos_id]
    assert enc.dream_slots == [1 + len(tc) + 1] and enc.image_slots == [-1]


def test_text_to_image_truncation_cuts_caption_not_dream_block(tok):
    cap = " ".join(CORPUS[:3])
    max_len = 1 + 3 + (Q + 2) + 1
    enc = tok.encode_document([cap, 0], mode="text-to-image", max_len=max_len)
    assert len(enc) == max_len and enc.truncated
    assert enc.image_indices == [0] and tok.dream_start_id in enc.labels


def test_unknown_mode_and_bad_parts_are_clear_errors(tok):
    with pytest.raises(ValueError, match="mode='captions'"):
        tok.encode_document(["x"], mode="captions")
    with pytest.raises(TypeError, match=r"parts\[1\]"):
        tok.encode_document(["x", 1.5])
    with pytest.raises(TypeError, match="not one string"):
        tok.encode_document("x")


def test_encode_prompt_has_no_eos_and_no_targets(tok):
    enc = tok.encode_prompt(["a red square", 0, "and"])
    assert enc.input_ids[0] == tok.bos_id and tok.eos_id not in enc.input_ids
    assert set(enc.labels) == {IGNORE_INDEX}
    assert tok.dream_start_id not in enc.input_ids  # a given image is read, not drawn
    assert enc.input_ids[enc.image_slots[0] - 1] == tok.im_start_id


def test_decode_skips_slots(tok):
    enc = tok.encode_document(["a red square", 0, "next to a blue circle"])
    assert tok.decode(enc.input_ids) == " a red square next to a blue circle"  # the BPE's prefix space
    assert "<im_start>" in tok.decode(enc.input_ids, skip_special_tokens=False)


def test_packing_offsets(tok):
    docs = [tok.encode_document(["a red square", 0]), tok.encode_document(["a blue circle", 0, 1]),
            tok.encode_document(["the green triangle"])]
    seq_len = len(docs[0]) + len(docs[1]) + 2
    rows = tok.pack(docs, seq_len=seq_len, max_images=3, doc_ids=["a", "b", "c"])
    assert [r.doc_ids for r in rows] == [["a", "b"], ["c"]]
    assert [r.doc_lengths for r in rows] == [[len(docs[0]), len(docs[1])], [len(docs[2])]]
    r = rows[0]
    off = len(docs[0])
    assert r.images == [(0, 0), (1, 0), (1, 1)]
    assert r.image_slots == docs[0].image_slots + [s + off for s in docs[1].image_slots]
    assert r.dream_slots == docs[0].dream_slots + [s + off for s in docs[1].dream_slots]
    assert r.num_tokens == off + len(docs[1])
    assert len(r.input_ids) == len(r.labels) == seq_len
    assert r.input_ids[r.num_tokens:] == [tok.pad_id] * 2 and r.labels[r.num_tokens:] == [IGNORE_INDEX] * 2
    for s in r.image_slots:
        assert r.input_ids[s - 1] == tok.im_start_id
    for s in r.dream_slots:
        assert r.input_ids[s - 1] == tok.dream_start_id


def test_packing_respects_max_images_and_first_fit(tok):
    one = tok.encode_document(["a", 0])
    short = tok.encode_document(["b"])
    rows = tok.pack([one, one, short], seq_len=10 * len(one), max_images=1)
    assert [r.doc_ids for r in rows] == [["0", "2"], ["1"]]  # the short one fills the first row's gap
    assert all(len(r.images) <= 1 for r in rows)


def test_no_packing_mode_one_document_per_row(tok):
    docs = [tok.encode_document(["a"]), tok.encode_document(["b"])]
    rows = tok.pack(docs, seq_len=32, max_images=1, packing=False)
    assert [r.doc_ids for r in rows] == [["0"], ["1"]]
    assert [r.doc_lengths for r in rows] == [[len(docs[0])], [len(docs[1])]]
    assert all(len(r.input_ids) == 32 for r in rows)


def test_pack_rejects_oversized_document(tok):
    doc = tok.encode_document(["a red square next to a blue circle", 0])
    with pytest.raises(ValueError, match=r"document big: .*encode_document\(max_len=8"):
        tok.pack([doc], seq_len=8, max_images=1, doc_ids=["big"])


def test_packed_row_to_sample_matches_schema(tok):
    import pyarrow as pa

    from dreamcore.schema import SAMPLE_SCHEMA

    rows = tok.pack([tok.encode_document(["a", 0])], seq_len=32, max_images=2)
    record = rows[0].to_sample("s0", [b"png"])
    assert set(record) == set(SAMPLE_SCHEMA.names)
    assert record["doc_lengths"] == [record["num_tokens"]]
    table = pa.Table.from_pylist([record], schema=SAMPLE_SCHEMA)
    assert table.num_rows == 1
    with pytest.raises(ValueError, match="sample s0: 0 image payloads for 1"):
        rows[0].to_sample("s0", [])


def test_save_load_round_trip_trained_bpe(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    again = DreamTokenizer.from_pretrained(tmp_path / "tok")
    assert (again.num_image_tokens, again.num_dream_queries) == (N, Q)
    assert again.content_hash() == tok.content_hash()
    parts = ["a red square", 0, "next to a blue circle"]
    assert again.encode_document(parts) == tok.encode_document(parts)
    with pytest.raises(ValueError, match="num_image_tokens=4 but 9"):
        DreamTokenizer.from_pretrained(tmp_path / "tok", num_image_tokens=9)


def _hf_wordlevel_tokenizer(directory):
    """A tokenizer in plain Hugging Face format (no dreamcore files), with its own BOS/EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2, "red": 3, "square": 4, "blue": 5}
    base = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]")
    hf.save_pretrained(str(directory))


def test_hf_tokenizer_from_path_reuses_its_bos_eos(tmp_path):
    _hf_wordlevel_tokenizer(tmp_path / "hf")
    tok = DreamTokenizer.build(TokenizerConfig(name_or_path=str(tmp_path / "hf")), N, Q)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.vocab_size == 6 + 6  # <pad> + 5 image tokens added
    enc = tok.encode_document(["red square", 0])
    assert enc.input_ids[:3] == [1, 3, 4] and enc.input_ids[-1] == 2
    tok.save_pretrained(tmp_path / "saved")
    again = DreamTokenizer.from_pretrained(tmp_path / "saved")
    assert again.content_hash() == tok.content_hash()
    assert again.encode_document(["red square", 0]) == enc


def test_plain_hf_folder_needs_slot_counts(tmp_path):
    _hf_wordlevel_tokenizer(tmp_path / "hf")
    with pytest.raises(ValueError, match="dreamcore_tokenizer.json is missing"):
        DreamTokenizer.from_pretrained(tmp_path / "hf")
    tok = DreamTokenizer.from_pretrained(tmp_path / "hf", num_image_tokens=N, num_dream_queries=Q)
    assert tok.im_patch_id >= 6


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load a tokenizer from .*tokenizer.name_or_path"):
        DreamTokenizer.build(TokenizerConfig(name_or_path=str(tmp_path / "nope")), N, Q)


def test_build_without_corpus_or_path_is_a_clear_error():
    with pytest.raises(ValueError, match="corpus_texts"):
        DreamTokenizer.build(TokenizerConfig(), N, Q)
    with pytest.raises(ValueError, match="vocab_size=100 .* >= 264"):
        DreamTokenizer.build(TokenizerConfig(vocab_size=100), N, Q, corpus_texts=CORPUS)


def test_content_hash_stable_and_sensitive(tok):
    same = DreamTokenizer.build(TokenizerConfig(vocab_size=300), N, Q, corpus_texts=CORPUS)
    assert same.content_hash() == tok.content_hash()
    other_corpus = DreamTokenizer.build(TokenizerConfig(vocab_size=300), N, Q,
                                        corpus_texts=CORPUS + ["zebra quokka xylophone"] * 30)
    assert other_corpus.content_hash() != tok.content_hash()
    other_slots = DreamTokenizer.build(TokenizerConfig(vocab_size=300), N + 1, Q, corpus_texts=CORPUS)
    assert other_slots.content_hash() != tok.content_hash()


def test_special_token_text_in_a_document_cannot_forge_a_slot(tok):
    enc = tok.encode_document(["see <im_patch><dream_start> and </s> here"])
    forged = {tok.im_patch_id, tok.dream_start_id, tok.im_start_id}
    assert not forged & set(enc.input_ids)
    assert enc.input_ids.count(tok.eos_id) == 1  # only the real EOS at the end
    assert "<im_patch>" in tok.decode(enc.input_ids)


def test_numpy_integer_image_parts_are_accepted(tok):
    import numpy as np

    assert tok.encode_document(["a", np.int32(0)]) == tok.encode_document(["a", 0])


def test_tokenizer_pickles_for_ray_workers(tok):
    import pickle

    again = pickle.loads(pickle.dumps(tok))
    assert again.encode_document(["a red square", 0]) == tok.encode_document(["a red square", 0])
    assert again.content_hash() == tok.content_hash()


def test_chunk_opening_word_gets_its_mid_sentence_token(tok):
    # The trained BPE adds a prefix space (as SentencePiece does), so "red" after an image is " red".
    assert tok.encode_text("red") == tok.encode_text("a red")[-len(tok.encode_text("red")):]


def test_packing_equals_plain_first_fit(tok):
    """Closing full rows early is an optimisation only: rows match a plain first-fit scan."""
    import random

    from dreamcore.tokenizer import EncodedDocument

    rng = random.Random(0)
    docs = []
    for _ in range(300):
        n, k = rng.randint(2, 60), rng.choice([0, 0, 1, 2])
        docs.append(EncodedDocument([5] * n, [5] * n, list(range(1, k + 1)), list(range(1, k + 1)), list(range(k))))
    seq_len, max_images = 64, 2
    expected: list[list[int]] = []
    fill: list[tuple[int, int]] = []
    for pos, d in enumerate(docs):
        n, k = len(d), len(d.image_indices)
        r = next((i for i, (t, m) in enumerate(fill) if t + n <= seq_len and m + k <= max_images), None)
        if r is None:
            expected.append([])
            fill.append((0, 0))
            r = len(fill) - 1
        expected[r].append(pos)
        fill[r] = (fill[r][0] + n, fill[r][1] + k)
    rows = tok.pack(docs, seq_len, max_images)
    assert [[int(i) for i in r.doc_ids] for r in rows] == expected
    assert all(r.doc_lengths == [len(docs[int(i)]) for i in r.doc_ids] for r in rows)
    assert all(sum(r.doc_lengths) == r.num_tokens for r in rows)


def test_gpt2_style_tokenizer_with_shared_bos_eos_and_own_pad(tmp_path):
    """GPT-2 style: BOS == EOS; a base that already has a pad token keeps it (no extra row)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[PAD]": 1, "red": 2, "square": 3}
    base = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="[PAD]").save_pretrained(str(tmp_path / "gpt2ish"))
    tok = DreamTokenizer.build(TokenizerConfig(name_or_path=str(tmp_path / "gpt2ish")), N, Q)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 1)
    assert tok.vocab_size == 4 + 5
    enc = tok.encode_document(["red square"])
    assert enc.input_ids == [0, 2, 3, 0]
    assert enc.labels == [IGNORE_INDEX, 2, 3, 0]  # the leading BOS is context even though it is EOS's id


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load a tokenizer from"):
        DreamTokenizer.build(TokenizerConfig(name_or_path=str(tmp_path)), N, Q)


def test_encode_prompt_keeps_the_dream_block_of_drawn_images(tok):
    """A generated image is fed back as in training (dream block, then comprehension block)."""
    enc = tok.encode_prompt(["a red circle", 0, "then", 1], drawn=[0])
    assert enc.image_indices == [0, 1]
    assert enc.dream_slots[0] >= 0 and enc.dream_slots[1] == -1
    assert enc.input_ids[enc.dream_slots[0] - 1] == tok.dream_start_id
    assert enc.image_slots[0] == enc.dream_slots[0] + tok.num_dream_queries + 2
    assert all(label == -100 for label in enc.labels)


def test_sampled_text_is_laid_out_with_the_ids_it_was_sampled_as(tok):
    """Generated text goes back into the next round as the ids sampled, not re-tokenized: byte-level
    BPE does not round-trip a chunk cut at a token boundary (a chunk's first word gains a prefix space)."""
    import pickle

    from dreamcore.tokenizer import SampledText

    sampled = [tok.hf.convert_tokens_to_ids("d")]  # "d" right after "a red" (no space): "a redd"
    text = tok.decode(sampled)
    assert text == "d" and tok.encode_text(text) != sampled  # re-tokenizing adds a prefix space
    plain = tok.encode_prompt(["a red", text]).input_ids
    kept = tok.encode_prompt(["a red", SampledText(text, sampled)]).input_ids
    assert kept[-len(sampled):] == sampled and plain != kept
    again = pickle.loads(pickle.dumps(SampledText(text, sampled)))  # crosses Ray between replicas
    assert isinstance(again, SampledText) and again == text and list(again.token_ids) == sampled
    with pytest.raises(ValueError, match="reserved"):
        tok.encode_prompt([SampledText("x", [tok.im_patch_id])])
    with pytest.raises(ValueError, match="out of range"):
        tok.encode_prompt([SampledText("x", [tok.vocab_size + 5])])
