"""Tokenize: kept documents -> DreamLLM layout (encode) -> fixed-length rows (pack).

Two steps so the manifest can count per document what encoding drops (an image cut by
truncation, an empty document) before rows mix documents. The tokenizer is loaded once per worker
process from the folder the job saved (DIR/tokenizer/ or the configured path).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from dreamcore.config import ModelConfig
from dreamcore.tokenizer import DreamTokenizer, EmptyDocumentError, EncodedDocument, interleave

from .filters import drop_document, drop_image

STAGE = "tokenize"


@lru_cache(maxsize=4)
def load_tokenizer(path: str, num_image_tokens: int, num_dream_queries: int) -> DreamTokenizer:
    return DreamTokenizer.from_pretrained(path, num_image_tokens, num_dream_queries)


def tokenizer_for(path: str, mcfg: ModelConfig) -> DreamTokenizer:
    return load_tokenizer(path, mcfg.vision.num_tokens, mcfg.dream.num_queries)


def encode_doc(tok: DreamTokenizer, doc: dict, mcfg: ModelConfig) -> dict:
    """Adds enc_* fields to a kept document row; drops images/documents the layout cannot hold."""
    empty = {"enc_input_ids": [], "enc_labels": [], "enc_image_slots": [], "enc_dream_slots": [],
             "enc_images": []}
    doc.update(empty)
    if doc["drop_stage"]:
        return doc
    kept = [i for i, img in enumerate(doc["images"]) if not img["drop_stage"]]
    try:
        if doc.get("roles"):
            n = len(doc["texts"])
            for i in [i for i in kept if not 0 <= doc["images"][i]["matched_text_index"] < n]:
                drop_image(doc["images"][i], STAGE, "matched_text_index_out_of_range",
                           f"matched_text_index {doc['images'][i]['matched_text_index']} outside the {n} turns' texts")
            kept = [i for i in kept if not doc["images"][i]["drop_stage"]]
            enc: EncodedDocument = tok.encode_conversation(
                conversation_turns(doc, kept), mcfg.chat_template, max_len=mcfg.max_seq_len,
                max_images=mcfg.images_per_sample)
        else:
            parts, problems = interleave(doc["texts"], [doc["images"][i]["matched_text_index"] for i in kept])
            for p in problems:
                drop_image(doc["images"][kept[p.image]], STAGE, p.reason, p.detail)
            enc = tok.encode_document(parts, max_len=mcfg.max_seq_len, max_images=mcfg.images_per_sample)
    except EmptyDocumentError as e:
        drop_document(doc, STAGE, e.reason, str(e))
        return doc
    for j in enc.dropped_images:
        drop_image(doc["images"][kept[j]], STAGE, "truncated",
                   f"image block does not fit {mcfg.max_seq_len} tokens / {mcfg.images_per_sample} images")
    doc.update(
        enc_input_ids=enc.input_ids, enc_labels=enc.labels, enc_image_slots=enc.image_slots,
        enc_dream_slots=enc.dream_slots, enc_images=[kept[j] for j in enc.image_indices],
    )
    return doc


def conversation_turns(doc: dict, kept: list[int]) -> list[tuple[str, str | int]]:
    """A conversation row -> (role, part) turns: each text with its role, then the kept images
    placed after it (`matched_text_index`), in the role of that text. Image parts index `kept`."""
    after: dict[int, list[int]] = {}
    for j, i in enumerate(kept):
        after.setdefault(doc["images"][i]["matched_text_index"], []).append(j)
    turns: list[tuple[str, str | int]] = []
    for t, (role, text) in enumerate(zip(doc["roles"], doc["texts"])):
        turns.append((role, text))
        turns += [(role, j) for j in after.get(t, [])]
    return turns


def pair_sequences(tok: DreamTokenizer, doc: dict, mcfg: ModelConfig) -> list[EncodedDocument] | None:
    """DreamLLM's pair data from a one-image document: creation (sentence -> dream block) and
    comprehension (image -> sentence as target), as two sequences. None when the document has not
    exactly one kept image, or its matched sentence is empty (it stays interleaved)."""
    if len(doc["enc_images"]) != 1 or doc.get("roles"):  # conversations keep their chat layout
        return None
    image = doc["images"][doc["enc_images"][0]]
    m = image["matched_text_index"]
    if not 0 <= m < len(doc["texts"]) or not doc["texts"][m].strip():
        return None
    sentence = doc["texts"][m]
    out = []
    for parts, mode in (([sentence, 0], "text-to-image"), ([0, sentence], "image-to-text")):
        enc = tok.encode_document(parts, max_len=mcfg.max_seq_len, max_images=1, mode=mode)
        if enc.dropped_images:
            return None
        out.append(EncodedDocument(enc.input_ids, enc.labels, enc.image_slots, enc.dream_slots, [0]))
    return out


def pack_docs(tok: DreamTokenizer, docs: list[dict], mcfg: ModelConfig, packing: bool,
              pair_layout: str = "interleaved") -> list[dict]:
    """Encoded kept documents -> SAMPLE_SCHEMA records (images as the stored PNG bytes)."""
    docs = [d for d in docs if not d["drop_stage"] and d["enc_input_ids"]]
    encoded, owners = [], []
    for pos, d in enumerate(docs):
        pairs = pair_sequences(tok, d, mcfg) if pair_layout == "pairs" else None
        for enc in pairs or [EncodedDocument(d["enc_input_ids"], d["enc_labels"], d["enc_image_slots"],
                                             d["enc_dream_slots"], list(range(len(d["enc_images"]))))]:
            encoded.append(enc)
            owners.append(pos)
    rows = tok.pack(encoded, mcfg.max_seq_len, mcfg.images_per_sample,
                    doc_ids=[docs[pos]["doc_id"] for pos in owners], packing=packing)
    samples: list[dict] = []
    seen: dict[str, int] = {}
    for row in rows:
        payloads = [docs[owners[pos]]["images"][docs[owners[pos]]["enc_images"][j]]["data"]
                    for pos, j in row.images]
        sample_id = hashlib.sha1("\n".join(row.doc_ids).encode()).hexdigest()[:16]
        seen[sample_id] = seen.get(sample_id, 0) + 1
        if seen[sample_id] > 1:  # one document's pair rows: creation, then comprehension
            sample_id = f"{sample_id}-{seen[sample_id] - 1}"
        samples.append(row.to_sample(sample_id, payloads))
    return samples


def train_tokenizer(texts: list[str], mcfg: ModelConfig, out_dir: str) -> DreamTokenizer:
    """The embedded default: a byte-level BPE trained on a bounded sample of kept documents."""
    tok = DreamTokenizer.build(mcfg.tokenizer, mcfg.vision.num_tokens, mcfg.dream.num_queries, texts)
    tok.save_pretrained(out_dir)
    return tok


__all__ = ["encode_doc", "pack_docs", "train_tokenizer", "tokenizer_for"]
