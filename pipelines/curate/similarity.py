"""Image placement among sentences, and the similarity threshold that keeps an image.

`similarity.placement` says who places images:
- "source" (default): the dataset's own placement, kept as it is: MMC4's `matched_text_index`
  (several images may share a sentence: 4 of the 107 real documents in ../shared do) and OBELICS
  positions. A matrix shipped with a document does not always reproduce it (66 of those 417
  images land elsewhere under a re-assignment), and those placements are the dataset. Only
  `matched_sim` is checked against the threshold. An image without a source placement is dropped
  (`no_source_placement`), so a "source" run holds source placements only.
- "matrix": MMC4's assignment re-run over the document's `similarity_matrix` (CLIP scores for
  documents without one when `similarity.model` is set; the given matches when neither).
- "clip": MMC4's assignment over CLIP scores of every document.

Re-assignment ("matrix", "clip") is MMC4's published rule: a linear assignment over the images x
sentences cosine similarity matrix (at most one image per sentence), then a threshold on the
assigned similarity: 0.15 for MMC4, 0.25 for the "core" subsets. The scorer is a Hugging Face
CLIPModel (a folder or hub id); tests build a tiny one from config and save it to a tmp folder.
"""

from __future__ import annotations

import io
import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from .config import SimilarityConfig
from .filters import drop_image

STAGE = "similarity"


def assign(sim: np.ndarray, threshold: float) -> list[tuple[int | None, float, str]]:
    """sim: (images, sentences). Per image: (sentence or None, similarity, drop reason or "")."""
    n_img = sim.shape[0]
    out: list[tuple[int | None, float, str]] = [(None, float("nan"), "no_free_sentence")] * n_img
    if n_img == 0 or sim.shape[1] == 0:
        return out
    rows, cols = linear_sum_assignment(-sim)
    for r, c in zip(rows, cols):
        s = float(sim[r, c])
        out[r] = (int(c), s, "" if s >= threshold else "low_similarity")
    return out


def apply_assignment(doc: dict, sim: np.ndarray, threshold: float) -> None:
    """Assign the document's kept images; `sim` rows follow the order of doc["images"]."""
    kept = [i for i, img in enumerate(doc["images"]) if not img["drop_stage"]]
    if not kept:
        return
    result = assign(sim[kept], threshold)
    for i, (sentence, score, reason) in zip(kept, result):
        img = doc["images"][i]
        if reason == "no_free_sentence":
            drop_image(img, STAGE, reason, "more images than sentences: every sentence already has one")
        elif reason:
            drop_image(img, STAGE, reason, f"best free sentence {sentence} scores {score:.3f} < {threshold}")
        else:
            img["matched_text_index"] = sentence
            img["matched_sim"] = score


def apply_given_matches(doc: dict, threshold: float) -> None:
    """No matrix and no model: keep the given matches, at most one image per sentence (the best)."""
    kept = [img for img in doc["images"] if not img["drop_stage"]]
    order = sorted(kept, key=lambda im: -(im["matched_sim"] if not math.isnan(im["matched_sim"]) else -1))
    taken: dict[int, int] = {}
    n = len(doc["texts"])
    for img in order:
        idx = img["matched_text_index"]
        sim = img["matched_sim"]
        if not 0 <= idx < max(n, 1):
            drop_image(img, STAGE, "matched_text_index_out_of_range",
                       f"matched_text_index {idx} outside the {n} sentences")
        elif not math.isnan(sim) and sim < threshold:
            drop_image(img, STAGE, "low_similarity", f"matched_sim {sim:.3f} < {threshold}")
        elif idx in taken:
            drop_image(img, STAGE, "duplicate_sentence_match",
                       f"sentence {idx} already has an image (at most one image per sentence)")
        else:
            taken[idx] = 1


NO_PLACEMENT = -1  # readers.empty_image's matched_text_index when the record carries none


def apply_source_placement(doc: dict, threshold: float) -> None:
    """Keep the dataset's placements; drop (with its reason) only what cannot be placed or scores
    below the threshold. No one-image-per-sentence rule: that is the matrix assignment's rule,
    not the source's."""
    n = len(doc["texts"])
    for img in doc["images"]:
        if img["drop_stage"]:
            continue
        idx, sim = img["matched_text_index"], img["matched_sim"]
        if idx == NO_PLACEMENT:
            drop_image(img, STAGE, "no_source_placement",
                       "the record gives no matched_text_index; similarity.placement=matrix places it "
                       "from the similarity matrix")
        elif not 0 <= idx < max(n, 1):
            drop_image(img, STAGE, "matched_text_index_out_of_range",
                       f"matched_text_index {idx} outside the {n} sentences")
        elif not math.isnan(sim) and sim < threshold:
            drop_image(img, STAGE, "low_similarity", f"matched_sim {sim:.3f} < {threshold}")


class ClipScorer:
    """Cosine similarities of images and sentences with a CLIPModel (GPU when one is visible)."""

    def __init__(self, model_path: str, device: str | None = None, setting: str = "similarity.model"):
        """`setting`: the option that named the model, for the error message."""
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model_path).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.processor = AutoImageProcessor.from_pretrained(model_path)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{setting}={model_path!r} is not a loadable CLIP folder/hub id "
                f"({type(e).__name__}: {str(e).splitlines()[0]}); set {setting} to a folder with "
                "a CLIPModel, its tokenizer and image processor, or unset it"
            ) from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.max_len = min(self.model.config.text_config.max_position_embeddings, 77)

    def score(self, texts: list[str], images: list[bytes]) -> np.ndarray:
        """(images, sentences) cosine similarity; empty sentences score -1 (never assigned)."""
        import torch
        from PIL import Image

        if not images or not texts:
            return np.zeros((len(images), len(texts)), dtype=np.float32)
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        with torch.inference_mode():
            pix = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            tok = self.tokenizer([t or " " for t in texts], padding=True, truncation=True,
                                 max_length=self.max_len, return_tensors="pt").to(self.device)
            img_emb = self.model.get_image_features(pixel_values=pix)
            txt_emb = self.model.get_text_features(**tok)
            img_emb = getattr(img_emb, "pooler_output", img_emb)
            txt_emb = getattr(txt_emb, "pooler_output", txt_emb)
            img_emb = torch.nn.functional.normalize(img_emb.float(), dim=-1)
            txt_emb = torch.nn.functional.normalize(txt_emb.float(), dim=-1)
            sim = (img_emb @ txt_emb.T).cpu().numpy()  # (images, sentences)
        sim[:, [i for i, t in enumerate(texts) if not t.strip()]] = -1.0
        return sim


class SimilarityStage:
    """Stage `similarity` over document rows; holds the CLIP model when one is configured."""

    stage = STAGE

    def __init__(self, cfg: SimilarityConfig, device: str | None = None):
        if cfg.problem():  # a config changed after it was loaded skips CurateConfig's check
            raise ValueError(cfg.problem())
        self.cfg = cfg
        self.threshold = cfg.effective_threshold()
        use_model = cfg.model and cfg.placement != "source"  # "source" never scores: no model load
        self.scorer = ClipScorer(cfg.model, device) if use_model else None

    def __call__(self, docs: list[dict]) -> list[dict]:
        if not self.cfg.enabled:
            return docs
        for doc in docs:
            if doc["drop_stage"] or not any(not im["drop_stage"] for im in doc["images"]):
                continue
            self.place(doc)
        return docs

    def place(self, doc: dict) -> None:
        """One kept document, in place (the per-document step; tests call it without Ray)."""
        if self.cfg.placement == "source" or doc.get("roles"):
            # A conversation's images belong to the turn that holds them: never re-assigned.
            apply_source_placement(doc, self.threshold)
            return
        matrix = doc["similarity"]
        recompute = self.cfg.recompute or self.cfg.placement == "clip"
        if self.scorer is not None and (recompute or not matrix):
            # Images dropped earlier have no bytes: score the kept ones, -inf for the rest.
            idx = [i for i, im in enumerate(doc["images"]) if not im["drop_stage"]]
            scores = self.scorer.score(doc["texts"], [doc["images"][i]["data"] for i in idx])
            sim = np.full((len(doc["images"]), len(doc["texts"])), -np.inf, dtype=np.float32)
            sim[idx] = scores
            doc["similarity"] = sim.tolist()
            apply_assignment(doc, sim, self.threshold)
        elif matrix:
            apply_assignment(doc, np.asarray(matrix, dtype=np.float32), self.threshold)
        else:
            apply_given_matches(doc, self.threshold)
