"""Special tokens and the sequence layout: interleaved documents -> input_ids, labels, slot maps.

Design choices (see docs/architecture.md, "Sequence layout"):
- Any Hugging Face tokenizer can be the base (LLaMA/Vicuna for real runs); with none configured a
  small byte-level BPE is trained on the corpus (the embedded default), so nothing is downloaded.
- Each image at its place becomes `<dream_start> Q query slots <dream_end>` (creation) followed by
  `<im_start> N patch slots <im_end>` (comprehension of the real image, teacher forcing).
  Slot tokens all carry the `<im_patch>` id; the model finds them by the slot maps, never by id.
- Labels are aligned with input_ids (the model shifts): text, EOS and `<dream_start>` are targets,
  everything else -100. A truncated document gets no EOS (it did not end there).
- Truncation never cuts a block: an image that does not fit is dropped and listed; text may be cut
  at a token boundary and keeps filling the room after a dropped image.
- An empty document raises `EmptyDocumentError` (a ValueError with `reason = "empty_document"`), so
  the curator records it as a drop reason instead of writing a row with nothing to learn.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dreamcore.config import TokenizerConfig

IGNORE_INDEX = -100
PAD, IM_START, IM_PATCH, IM_END, DREAM_START, DREAM_END = (
    "<pad>", "<im_start>", "<im_patch>", "<im_end>", "<dream_start>", "<dream_end>",
)
IMAGE_TOKENS = (IM_START, IM_PATCH, IM_END, DREAM_START, DREAM_END)
DEFAULT_BOS, DEFAULT_EOS = "<s>", "</s>"
MODES = ("interleaved", "image-to-text", "text-to-image")
SLOTS_FILE = "dreamcore_tokenizer.json"  # slot counts saved beside the HF tokenizer files

Part = str | int  # a text chunk, or the index of an image in the document's image list


class SampledText(str):
    """Text the model generated, with the token ids it was sampled as.

    A prompt lays it out with these ids, not by re-tokenizing the text: byte-level BPE does not
    round-trip a chunk cut at a token boundary (a sampled "g" after text re-encodes as "Ġ", "g"),
    and the next round must see exactly the ids it sampled (same continuation, and a KV cache
    that stays valid).
    """

    token_ids: tuple[int, ...]

    def __new__(cls, text: str, token_ids: Iterable[int]) -> SampledText:
        obj = super().__new__(cls, text)
        obj.token_ids = tuple(int(i) for i in token_ids)
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (Ray) as itself, ids included
        return (SampledText, (str(self), self.token_ids))


class EmptyDocumentError(ValueError):
    """The document has neither text nor images; `reason` is the curator's drop-reason code."""

    reason = "empty_document"


class InterleaveProblem(NamedTuple):
    """An image `interleave` could not place; the curator records `reason` for it."""

    image: int
    reason: str
    detail: str


@dataclass
class EncodedDocument:
    """One document laid out as a token sequence; per-image lists are parallel to image_indices."""

    input_ids: list[int]
    labels: list[int]
    image_slots: list[int]  # first patch slot of each kept image's comprehension block, -1 none
    dream_slots: list[int]  # first query slot of each kept image's dream block, -1 none
    image_indices: list[int]  # which document image each entry is
    dropped_images: list[int] = field(default_factory=list)  # cut by truncation or max_images
    truncated: bool = False
    num_text_tokens: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedRow:
    """One fixed-length training row holding one or more documents (SAMPLE_SCHEMA minus bytes)."""

    input_ids: list[int]
    labels: list[int]
    num_tokens: int  # before padding
    doc_ids: list[str]
    doc_lengths: list[int]  # tokens of each doc_ids entry, in row order; they sum to num_tokens
    images: list[tuple[int, int]]  # (position of the document in pack()'s input, its image index)
    image_slots: list[int]
    dream_slots: list[int]

    def to_sample(self, sample_id: str, image_bytes: Sequence[bytes]) -> dict[str, Any]:
        """The SAMPLE_SCHEMA record; `image_bytes[i]` is the PNG of `self.images[i]`."""
        if len(image_bytes) != len(self.images):
            raise ValueError(
                f"sample {sample_id}: {len(image_bytes)} image payloads for {len(self.images)} "
                "image blocks; pass one PNG per entry of PackedRow.images, in that order"
            )
        return {
            "sample_id": sample_id,
            "doc_ids": list(self.doc_ids),
            "doc_lengths": list(self.doc_lengths),
            "input_ids": list(self.input_ids),
            "labels": list(self.labels),
            "num_tokens": self.num_tokens,
            "images": list(image_bytes),
            "image_slots": list(self.image_slots),
            "dream_slots": list(self.dream_slots),
        }


def interleave(
    text_list: Sequence[str], matched_text_index: Sequence[Any], separator: str = " "
) -> tuple[list[Part], list[InterleaveProblem]]:
    """An MMC4 document (`text_list`, one `matched_text_index` per image) -> parts.

    Each image goes right after the text chunk it is matched to; several images after one chunk
    keep their order. Consecutive text chunks are joined with `separator` (MMC4 sentences carry no
    trailing space). With no text at all the images are placed in order. An image whose index is
    not a valid chunk index is left out and reported, never dropped silently.
    """
    has_text = any(t for t in text_list)
    after: dict[int, list[int]] = {}
    problems: list[InterleaveProblem] = []
    for img, idx in enumerate(matched_text_index):
        if not has_text:
            after.setdefault(0, []).append(img)
        elif isinstance(idx, bool) or not isinstance(idx, numbers.Integral):  # numpy ints from Arrow are fine
            problems.append(InterleaveProblem(
                img, "matched_text_index_invalid", f"image {img}: matched_text_index {idx!r} is not an integer"))
        elif not 0 <= idx < len(text_list):
            problems.append(InterleaveProblem(
                img, "matched_text_index_out_of_range",
                f"image {img}: matched_text_index {idx} is outside the {len(text_list)} text chunks"))
        else:
            after.setdefault(int(idx), []).append(img)
    if not has_text:
        return list(after.get(0, [])), problems

    parts: list[Part] = []
    pending: list[str] = []
    for i, text in enumerate(text_list):
        if text:
            pending.append(text)
        if i in after:
            if pending:
                parts.append(separator.join(pending))
                pending = []
            parts.extend(after[i])
    if pending:
        parts.append(separator.join(pending))
    return parts, problems


class DreamTokenizer:
    """A Hugging Face tokenizer plus DreamLLM's special tokens and the document layout."""

    def __init__(self, hf_tokenizer: Any, num_image_tokens: int, num_dream_queries: int) -> None:
        if num_image_tokens < 1 or num_dream_queries < 1:
            raise ValueError(
                f"num_image_tokens={num_image_tokens}, num_dream_queries={num_dream_queries}: both must be "
                ">= 1 (they come from ModelConfig.vision.num_tokens and dream.num_queries)"
            )
        self.hf = hf_tokenizer
        self.num_image_tokens = num_image_tokens
        self.num_dream_queries = num_dream_queries
        self._add_special_tokens()
        ids = self.hf.convert_tokens_to_ids
        self.pad_id: int = self.hf.pad_token_id
        self.bos_id: int = self.hf.bos_token_id
        self.eos_id: int = self.hf.eos_token_id
        self.im_start_id: int = ids(IM_START)
        self.im_patch_id: int = ids(IM_PATCH)
        self.im_end_id: int = ids(IM_END)
        self.dream_start_id: int = ids(DREAM_START)
        self.dream_end_id: int = ids(DREAM_END)

    # ------------------------------------------------------------------------------------------
    # Construction, persistence

    def _add_special_tokens(self) -> None:
        """Add what the base lacks; reuse its BOS/EOS/pad so no pretrained embedding goes unused."""
        from tokenizers import AddedToken

        named = {}
        if self.hf.bos_token is None:
            named["bos_token"] = DEFAULT_BOS
        if self.hf.eos_token is None:
            named["eos_token"] = DEFAULT_EOS
        if self.hf.pad_token is None:
            named["pad_token"] = PAD
        if named:
            self.hf.add_special_tokens(named)
        vocab = self.hf.get_vocab()
        missing = [t for t in IMAGE_TOKENS if t not in vocab]
        if missing:
            self.hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                               special_tokens=True)

    @staticmethod
    def train(texts: Iterable[str], vocab_size: int) -> Any:
        """A byte-level BPE trained on `texts`, wrapped as a PreTrainedTokenizerFast (the embedded default).

        Specials get the first ids, so `<pad>` is 0 in every trained tokenizer.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        specials = [PAD, DEFAULT_BOS, DEFAULT_EOS, *IMAGE_TOKENS]
        floor = 256 + len(specials)  # every byte plus the specials
        if vocab_size < floor:
            raise ValueError(
                f"tokenizer vocab_size={vocab_size} is too small for a byte-level BPE; use >= {floor} "
                "(set tokenizer.vocab_size)"
            )
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("cannot train the BPE tokenizer on an empty corpus: pass some document texts")
        tok = Tokenizer(models.BPE())
        # Prefix space, as SentencePiece (LLaMA) does: a word opening a chunk after an image gets the
        # same token as mid-sentence, and decoded chunks concatenate with a space between them.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=DEFAULT_BOS, eos_token=DEFAULT_EOS, pad_token=PAD
        )

    @classmethod
    def build(
        cls,
        cfg: TokenizerConfig,
        num_image_tokens: int,
        num_dream_queries: int,
        corpus_texts: Iterable[str] | None = None,
    ) -> DreamTokenizer:
        """The tokenizer `cfg` names (path or hub id), or a BPE trained on `corpus_texts`."""
        if cfg.name_or_path:
            return cls(_load_hf(cfg.name_or_path), num_image_tokens, num_dream_queries)
        if corpus_texts is None:
            raise ValueError(
                "tokenizer.name_or_path is unset, so a BPE is trained on the corpus, but no corpus_texts were "
                "given; pass corpus_texts or set tokenizer.name_or_path to a Hugging Face tokenizer"
            )
        return cls(cls.train(corpus_texts, cfg.vocab_size), num_image_tokens, num_dream_queries)

    def save_pretrained(self, directory: str | Path) -> None:
        """HF tokenizer files plus the slot counts (they fix the layout as much as the vocab does)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        slots = {"num_image_tokens": self.num_image_tokens, "num_dream_queries": self.num_dream_queries}
        (directory / SLOTS_FILE).write_text(json.dumps(slots, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        num_image_tokens: int | None = None,
        num_dream_queries: int | None = None,
    ) -> DreamTokenizer:
        """Load a tokenizer saved by `save_pretrained`; counts given here must match the saved ones."""
        slots_path = Path(directory) / SLOTS_FILE
        given = {"num_image_tokens": num_image_tokens, "num_dream_queries": num_dream_queries}
        if slots_path.is_file():
            saved = json.loads(slots_path.read_text())
            for key, value in given.items():
                if value is not None and value != saved[key]:
                    raise ValueError(
                        f"{slots_path}: saved {key}={saved[key]} but {value} was asked for; the model config "
                        "and the tokenizer disagree on the sequence layout (rebuild the tokenizer or fix the config)"
                    )
            given = {k: int(saved[k]) for k in given}
        elif None in given.values():
            raise ValueError(
                f"{slots_path} is missing, so the slot counts are unknown; save with "
                "DreamTokenizer.save_pretrained or pass num_image_tokens and num_dream_queries"
            )
        return cls(_load_hf(str(directory)), given["num_image_tokens"], given["num_dream_queries"])

    # ------------------------------------------------------------------------------------------
    # Identity

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs: base vocabulary plus every added special token."""
        return len(self.hf)

    def content_hash(self) -> str:
        """sha256 of vocab, merges, specials and slot counts: what a manifest records to pin the data."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            state = json.loads(backend.to_str())
            # Runtime padding/truncation settings change nothing about the ids a document gets.
            state.pop("padding", None)
            state.pop("truncation", None)
        else:  # a slow (Python) tokenizer: its vocabulary and special tokens are what it is
            state = {"vocab": sorted(self.hf.get_vocab().items())}
        state["dreamcore"] = {
            "specials": {
                "pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id,
                "im_start": self.im_start_id, "im_patch": self.im_patch_id, "im_end": self.im_end_id,
                "dream_start": self.dream_start_id, "dream_end": self.dream_end_id,
            },
            "num_image_tokens": self.num_image_tokens,
            "num_dream_queries": self.num_dream_queries,
        }
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------------------------------
    # Text

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a text chunk, no BOS/EOS."""
        # split_special_tokens: a document that contains "<im_patch>" as text must not forge a slot.
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; slot and block tokens are special, so they vanish with skip_special_tokens.

        With the trained BPE each text chunk starts with a space (its prefix space), so decoded
        pieces of a generated document concatenate cleanly; strip the first one for display.
        """
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------
    # Blocks

    @property
    def dream_block_len(self) -> int:
        return self.num_dream_queries + 2

    @property
    def image_block_len(self) -> int:
        return self.num_image_tokens + 2

    def _dream_block(self) -> tuple[list[int], list[int]]:
        ids = [self.dream_start_id, *[self.im_patch_id] * self.num_dream_queries, self.dream_end_id]
        labels = [self.dream_start_id] + [IGNORE_INDEX] * (len(ids) - 1)  # the model learns WHEN to draw
        return ids, labels

    def _image_block(self) -> tuple[list[int], list[int]]:
        ids = [self.im_start_id, *[self.im_patch_id] * self.num_image_tokens, self.im_end_id]
        return ids, [IGNORE_INDEX] * len(ids)

    # ------------------------------------------------------------------------------------------
    # Documents

    def encode_document(
        self,
        parts: Sequence[Part],
        max_len: int | None = None,
        mode: str = "interleaved",
        max_images: int | None = None,
    ) -> EncodedDocument:
        """Lay out one document (see the module docstring); `max_images` caps the image blocks kept.

        Modes:
        - "interleaved": text in order; each image gets a dream block then a comprehension block.
        - "image-to-text": comprehension block(s) of the image(s) first, then the text as target
          (captioning; no dream block).
        - "text-to-image": the text as context (labels -100: the condition, not the target), then
          one dream block per image with `<dream_start>` as target, then EOS; no comprehension block.
          Caption language modelling is left to "image-to-text" pairs and interleaved documents.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not a layout; choose one of {', '.join(MODES)}")
        parts = self._check_parts(parts)
        if not any(p != "" for p in parts):
            raise EmptyDocumentError("document has no text and no images; nothing to train on")
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len={max_len} cannot hold even BOS and EOS; use max_len >= 2")

        tokens = self._tokenize_parts(parts)  # one batched call; str parts become token lists
        texts = [p for p in tokens if isinstance(p, list)]
        images = [p for p in tokens if isinstance(p, int)]
        if mode == "image-to-text":
            items: list[tuple[str, Any]] = [("image", i) for i in images] + [("text", t) for t in texts]
        elif mode == "text-to-image":
            items = [("context", t) for t in texts] + [("dream", i) for i in images]
        else:
            items = [("text", p) if isinstance(p, list) else ("both", p) for p in tokens]

        enc = self._layout(items, room=None, max_images=max_images)
        if max_len is None or len(enc) <= max_len:
            return enc
        if mode == "text-to-image":
            return self._truncate_caption(texts, images, max_len, max_images)
        return self._layout(items, room=max_len, max_images=max_images)

    def _truncate_caption(
        self, texts: list[list[int]], images: list[int], max_len: int, max_images: int | None
    ) -> EncodedDocument:
        """text-to-image over max_len: cut the caption, not the dream blocks (they hold the target)."""
        keep = min(len(images), max_images if max_images is not None else len(images),
                   (max_len - 2) // self.dream_block_len)
        caption = [t for text in texts for t in text]
        budget = max_len - 2 - keep * self.dream_block_len
        items = [("context", caption[:budget])] + [("dream", i) for i in images]
        enc = self._layout(items, room=None, max_images=keep)
        enc.truncated = True
        return enc

    def encode_conversation(
        self,
        turns: Sequence[tuple[str, Part]],
        template: str = "vicuna_v1",
        max_len: int | None = None,
        max_images: int | None = None,
    ) -> EncodedDocument:
        """Instruction data (stage III): (role, part) turns laid out by a chat template
        (dreamcore.chat); labels on assistant turns only (their text, the `<dream_start>` of images
        they draw, the EOS that closes each), everything else -100. Over `max_len` the
        conversation is cut at a token boundary, whole blocks only."""
        from dreamcore.chat import chat_segments

        roles, parts = [r for r, _ in turns], self._check_parts([p for _, p in turns])
        segments = chat_segments(template, list(zip(roles, parts)))
        if not any(s.kind in ("target", "draw") for s in segments):
            raise EmptyDocumentError("conversation has no assistant text or image; nothing to train on")
        tokens = iter(self._tokenize_parts([s.value for s in segments if isinstance(s.value, str)]))
        items: list[tuple[str, Any]] = []
        for seg in segments:
            if seg.kind == "eos":
                items.append(("text", [self.eos_id]))
            elif isinstance(seg.value, str):
                items.append(("text" if seg.kind == "target" else "context", next(tokens)))
            else:
                items.append(("both" if seg.kind == "draw" else "image", seg.value))
        enc = self._layout(items, room=None, max_images=max_images, eos=False)
        if max_len is not None and len(enc) > max_len:
            enc = self._layout(items, room=max_len, max_images=max_images, eos=False)
        return enc

    def encode_prompt(self, parts: Sequence[Part], drawn: Collection[int] = ()) -> EncodedDocument:
        """A generation prompt: BOS, text, and a comprehension block per given image; no EOS.

        Given images are read, not drawn, so they get no dream block; images listed in `drawn`
        (ones the model generated earlier in the document) keep their dream block before it, as in
        training. Labels are all -100.
        """
        tokens = self._tokenize_parts(self._check_parts(parts))
        items = [("context", p) if isinstance(p, list) else ("both" if p in drawn else "image", p)
                 for p in tokens]
        enc = self._layout(items, room=None, max_images=None, eos=False)
        enc.labels = [IGNORE_INDEX] * len(enc.input_ids)
        return enc

    def _tokenize_parts(self, parts: list[Part]) -> list[list[int] | int]:
        """Non-empty text parts -> token lists (one batched tokenizer call); image indices kept."""
        texts = [p for p in parts if isinstance(p, str) and p and not isinstance(p, SampledText)]
        # split_special_tokens: a document that contains "<im_patch>" as text must not forge a slot.
        encoded = iter(self.hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                       if texts else ())
        out: list[list[int] | int] = []
        for p in parts:
            if isinstance(p, SampledText):
                if p.token_ids:
                    out.append(self._check_sampled(p.token_ids))
            elif isinstance(p, str):
                if p:
                    out.append(next(encoded))
            else:
                out.append(p)
        return out

    def _check_sampled(self, ids: Sequence[int]) -> list[int]:
        """Sampled ids must be ordinary tokens: a slot or block marker would forge a layout."""
        reserved = {self.im_start_id, self.im_patch_id, self.im_end_id, self.dream_start_id, self.dream_end_id,
                    self.bos_id, self.pad_id}
        bad = [i for i in ids if not 0 <= i < self.vocab_size or i in reserved]
        if bad:
            raise ValueError(f"SampledText holds token ids {bad[:5]} that are out of range or reserved "
                             "(slot and block markers); pass the text as a plain str instead")
        return list(ids)

    @staticmethod
    def _check_parts(parts: Sequence[Part]) -> list[Part]:
        """Parts as plain str/int (numpy integers from Arrow columns are accepted), or a TypeError."""
        if isinstance(parts, str):
            raise TypeError("parts must be a list of text chunks and image indices, not one string; wrap it: [text]")
        out: list[Part] = []
        for i, p in enumerate(parts):
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, numbers.Integral) and not isinstance(p, bool) and p >= 0:
                out.append(int(p))
            else:
                raise TypeError(
                    f"parts[{i}] = {p!r}: a part is a text chunk (str) or an image index (int >= 0)"
                )
        return out

    def _layout(
        self,
        items: Sequence[tuple[str, Any]],
        room: int | None,
        max_images: int | None,
        eos: bool = True,
    ) -> EncodedDocument:
        """Emit items in order. With `room` set the result is truncated to it: no EOS, whole blocks only."""
        truncated = room is not None
        ids: list[int] = [self.bos_id]
        labels: list[int] = [IGNORE_INDEX]
        enc = EncodedDocument(ids, labels, [], [], [], truncated=truncated)

        def left() -> int:
            return (room - len(ids)) if room is not None else 1 << 62

        for kind, value in items:
            if kind in ("text", "context"):  # value: token ids
                tokens = value[: max(0, left())]
                ids.extend(tokens)
                labels.extend(tokens if kind == "text" else [IGNORE_INDEX] * len(tokens))
                enc.num_text_tokens += len(tokens)
                continue
            need = {"both": self.dream_block_len + self.image_block_len,
                    "dream": self.dream_block_len, "image": self.image_block_len}[kind]
            capped = max_images is not None and len(enc.image_indices) >= max_images
            if capped or need > left():
                enc.dropped_images.append(value)
                continue
            dream_slot = image_slot = -1
            if kind in ("both", "dream"):
                dream_slot = len(ids) + 1
                block_ids, block_labels = self._dream_block()
                ids.extend(block_ids)
                labels.extend(block_labels)
            if kind in ("both", "image"):
                image_slot = len(ids) + 1
                block_ids, block_labels = self._image_block()
                ids.extend(block_ids)
                labels.extend(block_labels)
            enc.image_indices.append(value)
            enc.dream_slots.append(dream_slot)
            enc.image_slots.append(image_slot)
        if eos and not truncated:
            ids.append(self.eos_id)
            labels.append(self.eos_id)
        return enc

    # ------------------------------------------------------------------------------------------
    # Packing

    def pack(
        self,
        encoded_docs: Sequence[EncodedDocument],
        seq_len: int,
        max_images: int,
        doc_ids: Sequence[str] | None = None,
        packing: bool = True,
    ) -> list[PackedRow]:
        """Greedy first-fit packing of documents into rows of `seq_len` tokens, <= max_images each.

        `packing=False` puts one document per row. Documents keep their own BOS/EOS; rows are padded
        with pad_id (labels -100). Each row records its documents' lengths (`doc_lengths`): training
        restarts positions and masks attention per document, so a packed document sees only itself. Encode with max_len=seq_len and max_images first: a document that
        alone exceeds a row is an error, not a silent cut.
        """
        if doc_ids is None:
            doc_ids = [str(i) for i in range(len(encoded_docs))]
        if len(doc_ids) != len(encoded_docs):
            raise ValueError(f"pack: {len(doc_ids)} doc_ids for {len(encoded_docs)} documents")
        for doc, doc_id in zip(encoded_docs, doc_ids):
            if len(doc) > seq_len or len(doc.image_indices) > max_images:
                raise ValueError(
                    f"document {doc_id}: {len(doc)} tokens / {len(doc.image_indices)} images does not fit a row "
                    f"of {seq_len} tokens / {max_images} images; encode it with "
                    f"encode_document(max_len={seq_len}, max_images={max_images})"
                )
        rows: list[list[int]] = []  # document positions per row
        lengths: list[int] = []
        counts: list[int] = []
        # Rows no remaining document could fit are closed, so first-fit scans only open rows
        # (the same result as scanning all, without rescanning rows that are full).
        shortest = min((len(d) for d in encoded_docs), default=0)
        shortest_text_only = min((len(d) for d in encoded_docs if not d.image_indices), default=seq_len + 1)
        open_rows: list[int] = []
        for pos, doc in enumerate(encoded_docs):
            n, k = len(doc), len(doc.image_indices)
            target = None
            if packing:
                target = next((r for r in open_rows
                               if lengths[r] + n <= seq_len and counts[r] + k <= max_images), None)
            if target is None:
                rows.append([])
                lengths.append(0)
                counts.append(0)
                target = len(rows) - 1
                open_rows.append(target)
            rows[target].append(pos)
            lengths[target] += n
            counts[target] += k
            room = seq_len - lengths[target]
            if room < shortest or (counts[target] >= max_images and room < shortest_text_only):
                open_rows.remove(target)
        return [self._fill_row(encoded_docs, doc_ids, members, seq_len) for members in rows]

    def _fill_row(
        self, docs: Sequence[EncodedDocument], doc_ids: Sequence[str], members: list[int], seq_len: int
    ) -> PackedRow:
        row = PackedRow(input_ids=[], labels=[], num_tokens=0, doc_ids=[], doc_lengths=[], images=[],
                        image_slots=[], dream_slots=[])
        for pos in members:
            doc, offset = docs[pos], len(row.input_ids)
            row.input_ids.extend(doc.input_ids)
            row.labels.extend(doc.labels)
            row.doc_ids.append(doc_ids[pos])
            row.doc_lengths.append(len(doc))
            for img, islot, dslot in zip(doc.image_indices, doc.image_slots, doc.dream_slots):
                row.images.append((pos, img))
                row.image_slots.append(islot + offset if islot >= 0 else -1)
                row.dream_slots.append(dslot + offset if dslot >= 0 else -1)
        row.num_tokens = len(row.input_ids)
        pad = seq_len - row.num_tokens
        row.input_ids.extend([self.pad_id] * pad)
        row.labels.extend([IGNORE_INDEX] * pad)
        return row


def _load_hf(name_or_path: str) -> Any:
    """AutoTokenizer.from_pretrained with an error that names the path and the fix."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError, bad JSON, the Rust tokenizers' own errors: one message for all
        raise ValueError(
            f"cannot load a tokenizer from {name_or_path!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}. "
            "Set tokenizer.name_or_path to a folder holding tokenizer files (tokenizer.json or "
            "tokenizer.model), or a hub id (offline runs need it in the local Hugging Face cache)"
        ) from None
