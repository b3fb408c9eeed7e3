"""Filter rules. Each rule is a small class: a name, thresholds as fields, and `check` that
returns None (keep) or a reason. Stages apply lists of rules to document rows in place and mark
what they drop (`drop_stage`, `reason`, `error`); a dropped document takes its remaining images
with it (reason `document_dropped`), so image counts add up at every stage.

Order (one stage each in the manifest): filter (image size/aspect, opt-out, text quality) ->
dedup (exact sha256, perceptual hash, repeated across documents; needs the whole run) ->
similarity (MMC4 assignment, see similarity.py) -> documents (min/max images and sentences).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .config import FilterConfig, SafetyConfig


def kept_images(doc: dict) -> list[dict]:
    return [img for img in doc["images"] if not img["drop_stage"]]


def drop_image(img: dict, stage: str, reason: str, error: str = "") -> None:
    img.update(drop_stage=stage, reason=reason, error=error[:500])


def drop_document(doc: dict, stage: str, reason: str, error: str = "") -> None:
    doc.update(drop_stage=stage, reason=reason, error=error[:500])
    for img in kept_images(doc):
        drop_image(img, stage, "document_dropped", f"document dropped: {reason}")


# ----------------------------------------------------------------------------------------------
# Image rules: check(image, doc) -> reason | None


@dataclass
class ImageSizeRule:
    """MMC4: both sides >= 150 px and aspect ratio (w/h) within [0.5, 2] of the original image."""

    min_size: int = 150
    min_aspect: float = 0.5
    max_aspect: float = 2.0
    name: str = "image_size"

    def check(self, img: dict, doc: dict) -> str | None:
        w, h = img["orig_width"], img["orig_height"]
        if min(w, h) < self.min_size:
            return f"image_too_small ({w}x{h} < {self.min_size})"
        aspect = w / h
        if not self.min_aspect <= aspect <= self.max_aspect:
            return f"aspect_ratio ({aspect:.2f} outside [{self.min_aspect}, {self.max_aspect}])"
        return None


@dataclass
class OptOutRule:
    """Domains whose owners opted out: documents hosted there and images served from there."""

    domains: set[str] = field(default_factory=set)
    name: str = "optout_domain"

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> OptOutRule:
        domains = {d.strip().lower() for d in cfg.optout_domains if d.strip()}
        if cfg.optout_file:
            path = Path(cfg.optout_file)
            if not path.exists():
                raise FileNotFoundError(f"filter.optout_file {path} does not exist; give a file of domains")
            domains |= {ln.strip().lower() for ln in path.read_text().splitlines()
                        if ln.strip() and not ln.startswith("#")}
        return cls(domains)

    def matches(self, url: str) -> str | None:
        host = (urlsplit(url).hostname or "").lower()
        parts = host.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in self.domains:
                return ".".join(parts[i:])
        return None

    def check(self, img: dict, doc: dict) -> str | None:
        hit = self.matches(img["url"])
        return f"{self.name} ({hit})" if hit else None

    def check_document(self, doc: dict) -> str | None:
        hit = self.matches(doc["url"])
        return f"{self.name} ({hit})" if hit else None


# ----------------------------------------------------------------------------------------------
# Document rules: check_document(doc) -> reason | None

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class TextQualityRule:
    """OBELICS-style ratios over the document's text: word count, repeated sentences, symbols."""

    min_words: int = 10
    max_words: int = 100_000
    max_repetition_ratio: float = 0.3
    max_special_char_ratio: float = 0.3
    name: str = "text_quality"

    def check_document(self, doc: dict) -> str | None:
        texts = [t for t in doc["texts"] if t.strip()]
        if not texts:
            return "empty_text"
        joined = " ".join(texts)
        words = len(_WORD.findall(joined))
        if words < self.min_words:
            return f"too_few_words ({words} < {self.min_words})"
        if words > self.max_words:
            return f"too_many_words ({words} > {self.max_words})"
        counts = Counter(t.strip().lower() for t in texts)
        repeated = sum(n - 1 for n in counts.values())
        if len(texts) > 1 and repeated / len(texts) > self.max_repetition_ratio:
            return f"repetition ({repeated}/{len(texts)} sentences repeated)"
        non_space = [c for c in joined if not c.isspace()]
        special = sum(1 for c in non_space if not c.isalnum() and c not in ".,;:!?'\"-()")
        if non_space and special / len(non_space) > self.max_special_char_ratio:
            return f"special_characters ({special / len(non_space):.2f} > {self.max_special_char_ratio})"
        return None


@dataclass
class DocumentRule:
    """Document shape after image filtering: min/max images and sentences."""

    min_images: int = 1
    max_images: int = 30
    min_sentences: int = 1
    max_sentences: int = 500
    name: str = "document_shape"

    def check_document(self, doc: dict) -> str | None:
        n_img = len(kept_images(doc))
        n_txt = len([t for t in doc["texts"] if t.strip()])
        if n_img < self.min_images:
            return f"too_few_images ({n_img} < {self.min_images})"
        if self.max_images and n_img > self.max_images:
            return f"too_many_images ({n_img} > {self.max_images})"
        if n_txt < self.min_sentences:
            return f"too_few_sentences ({n_txt} < {self.min_sentences})"
        if self.max_sentences and n_txt > self.max_sentences:
            return f"too_many_sentences ({n_txt} > {self.max_sentences})"
        return None


def reason_name(reason: str) -> str:
    """Manifest key: the reason without its measured detail ("image_too_small (3x3 < 8)")."""
    return reason.split(" (", 1)[0]


def _split(reason: str) -> tuple[str, str]:
    return reason_name(reason), reason


# ----------------------------------------------------------------------------------------------
# Stages over lists of document rows


class FilterStage:
    """Stage `filter`: per-document rules that need nothing beyond the document itself."""

    stage = "filter"

    def __init__(self, cfg: FilterConfig, safety: SafetyConfig | None = None):
        self.image_rules: list = [ImageSizeRule(cfg.min_image_size, cfg.min_aspect_ratio, cfg.max_aspect_ratio)]
        self.doc_rules: list = [TextQualityRule(cfg.min_words, cfg.max_words, cfg.max_repetition_ratio,
                                                cfg.max_special_char_ratio)]
        optout = OptOutRule.from_config(cfg)
        if optout.domains:
            self.image_rules.append(optout)
            self.doc_rules.insert(0, optout)
        self.nsfw = None
        if safety is not None:  # after the cheap rules: a model runs only on what they kept
            from . import safety as rules

            self.doc_rules += rules.document_rules(safety)
            self.image_rules += rules.image_rules(safety)
            self.nsfw = rules.NSFWRule(safety) if safety.nsfw_model else None

    def __call__(self, docs: list[dict]) -> list[dict]:
        for doc in docs:
            if doc["drop_stage"]:
                continue
            for rule in self.doc_rules:
                reason = rule.check_document(doc)
                if reason:
                    name, detail = _split(reason)
                    drop_document(doc, self.stage, name, detail)
                    break
            if doc["drop_stage"]:
                continue
            for img in kept_images(doc):
                for rule in self.image_rules:
                    reason = rule.check(img, doc)
                    if reason:
                        name, detail = _split(reason)
                        drop_image(img, self.stage, name, detail)
                        break
        if self.nsfw is not None:  # one classifier call over the batch's kept, crawled images
            images = [img for doc in docs if not doc["drop_stage"] for img in kept_images(doc) if img.get("data")]
            for img, reason in zip(images, self.nsfw.reasons(images)):
                if reason:
                    drop_image(img, self.stage, *_split(reason))
        return docs


class DocumentStage:
    """Stage `documents`: document shape once every image rule has run."""

    stage = "documents"

    def __init__(self, cfg: FilterConfig):
        self.rule = DocumentRule(cfg.min_images, cfg.max_images, cfg.min_sentences, cfg.max_sentences)

    def __call__(self, docs: list[dict]) -> list[dict]:
        for doc in docs:
            if not doc["drop_stage"]:
                reason = self.rule.check_document(doc)
                if reason:
                    name, detail = _split(reason)
                    drop_document(doc, self.stage, name, detail)
        return docs


# ----------------------------------------------------------------------------------------------
# Dedup rules. The job runs them distributed (dedup.py); `DedupRules.plan` is the same rule set in
# one process, kept as the reference the distributed plan is tested and benchmarked against.


@dataclass
class DedupRules:
    """Exact (sha256) and near (perceptual hash) duplicates keep their first occurrence in
    (doc_id, index) order; an image in more than `max_documents` documents is dropped everywhere
    (logos, banners, spacers: MMC4 removes them the same way). An image is a near duplicate when any
    earlier exact survivor (or published image) lies within `near_distance` bits, dropped or not: a
    decision that needs no sequential pass, so dedup.py can make it partition by partition."""

    exact: bool = True
    near_distance: int = 4  # -1: off
    max_documents: int = 10  # 0: off
    stage: str = "dedup"

    def plan(self, records: list[tuple[str, int, str, str]],
             seen_sha: set[str] | None = None, seen_phash: list[int] | None = None
             ) -> dict[tuple[str, int], tuple[str, str]]:
        """records: (doc_id, index, sha256, phash hex). Returns {(doc_id, index): (reason, error)}."""
        drops: dict[tuple[str, int], tuple[str, str]] = {}
        records = sorted(records)
        if self.max_documents:
            docs_per_hash: dict[str, set[str]] = defaultdict(set)
            for doc_id, _, sha, _ in records:
                docs_per_hash[sha].add(doc_id)
            for doc_id, idx, sha, _ in records:
                n = len(docs_per_hash[sha])
                if n > self.max_documents:
                    drops[(doc_id, idx)] = ("repeated_image", f"same image in {n} documents > {self.max_documents}")
        sha_first: dict[str, tuple[str, int]] = {}
        for s in seen_sha or ():
            sha_first[s] = ("an earlier shard group", -1)
        near = _NearIndex(self.near_distance) if self.near_distance >= 0 else None
        if near is not None:
            for h in seen_phash or ():
                near.add(h, ("an earlier shard group", -1))
        for doc_id, idx, sha, ph in records:
            key = (doc_id, idx)
            if key in drops:
                continue
            if self.exact:
                first = sha_first.get(sha)
                if first is not None:
                    drops[key] = ("duplicate_image", f"same sha256 as {first[0]} image {first[1]}")
                    continue
                sha_first[sha] = key
            if near is not None and ph:
                h = int(ph, 16)
                hit = near.find(h)
                near.add(h, key)  # dropped or not: the rule compares against every earlier survivor
                if hit is not None:
                    drops[key] = ("near_duplicate_image", f"perceptual hash within {self.near_distance} "
                                                          f"of {hit[0]} image {hit[1]}")
        return drops


def phash_bands(distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of distance+1 bit bands of a 64-bit hash: two hashes within Hamming distance
    `distance` differ in at most `distance` bands, so they agree exactly on one (pigeonhole)."""
    n = distance + 1
    edges = [round(i * 64 / n) for i in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]


class _NearIndex:
    """Candidates come from band buckets (see `phash_bands`) instead of a scan over every hash;
    `find` returns the earliest added hash within the distance."""

    def __init__(self, distance: int):
        self.distance = distance
        self.bands = phash_bands(distance)
        self.buckets: list[dict[int, list[tuple[int, int]]]] = [defaultdict(list) for _ in self.bands]
        self.keys: list[tuple[str, int]] = []  # in the order added: list position = rank

    def add(self, h: int, key: tuple[str, int]) -> None:
        for (lo, mask), bucket in zip(self.bands, self.buckets):
            bucket[(h >> lo) & mask].append((h, len(self.keys)))
        self.keys.append(key)

    def find(self, h: int) -> tuple[str, int] | None:
        best = None
        for (lo, mask), bucket in zip(self.bands, self.buckets):
            for v, rank in bucket.get((h >> lo) & mask, ()):  # listed in the order added
                if best is not None and rank >= best:
                    break
                if (v ^ h).bit_count() <= self.distance:
                    best = rank
                    break
        return None if best is None else self.keys[best]


def apply_plan(docs: list[dict], drops: dict[tuple[str, int], tuple[str, str]], stage: str) -> list[dict]:
    for doc in docs:
        if doc["drop_stage"]:
            continue
        for idx, img in enumerate(doc["images"]):
            hit = drops.get((doc["doc_id"], idx))
            if hit and not img["drop_stage"]:
                drop_image(img, stage, *hit)
    return docs
