"""Safety filters a data team expects before training on web data, as rules like filters.py's.

- NSFW images: a small classifier over CLIP image embeddings, as LAION's safety model is (an MLP
  on CLIP ViT-L/14 embeddings). `NSFWClassifier` is a folder (`config.json` + `model.safetensors`)
  naming the CLIP model it reads; `save_pretrained` writes one (tests build a tiny one; a team
  converts its own classifier's weights into it).
- Faces: MMC4 ships `face_detections` per image (its "fewer faces" release removed such images);
  when the data carries the field it is used as it is. Otherwise an OpenCV cascade file given by
  path detects faces in the crawled image.
- OBELICS-style word ratios: the share of stop words (text that is not prose has few) and of
  flagged words (a list the team gives; none is shipped here).
- Language: a fastText language-identification model given by path (lid.176.bin in practice);
  documents in other languages, or identified with too little confidence, are dropped.

Each rule answers None (keep) or a reason whose name before " (" is the manifest's key, so every
drop is counted with its reason. Models are loaded once per worker process (`load_model`).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .config import SafetyConfig

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)  # letters, with an inner apostrophe

# English stop words: the function words every prose paragraph is made of (a short, common list;
# `stop_words_file` replaces it, one word per line, for other languages).
ENGLISH_STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just me
more most my myself no nor not now of off on once only or other our ours ourselves out over own
same she should so some such than that the their theirs them themselves then there these they
this those through to too under until up very was we were what when where which while who whom
why will with would you your yours yourself yourselves
""".split())


def _read_words(path: str) -> frozenset[str]:
    return frozenset(w.strip().lower() for w in Path(path).read_text().splitlines()
                     if w.strip() and not w.startswith("#"))


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


# ----------------------------------------------------------------------------------------------
# Document rules


@dataclass
class StopWordRule:
    """Prose is made of function words; lists, menus and keyword spam are not."""

    min_ratio: float
    stop_words: frozenset[str] = ENGLISH_STOP_WORDS
    name: str = "stop_word_ratio"

    def check_document(self, doc: dict) -> str | None:
        ws = words(" ".join(doc["texts"]))
        if not ws:
            return None  # the text-quality rule reports empty text
        ratio = sum(w in self.stop_words for w in ws) / len(ws)
        return f"{self.name} ({ratio:.2f} < {self.min_ratio})" if ratio < self.min_ratio else None


@dataclass
class FlaggedWordRule:
    """Documents whose share of flagged words (the team's list) is above the cap."""

    max_ratio: float
    flagged: frozenset[str]
    name: str = "flagged_word_ratio"

    def check_document(self, doc: dict) -> str | None:
        ws = words(" ".join(doc["texts"]))
        if not ws:
            return None
        ratio = sum(w in self.flagged for w in ws) / len(ws)
        return f"{self.name} ({ratio:.3f} > {self.max_ratio})" if ratio > self.max_ratio else None


class LanguageRule:
    """fastText language identification of the document's text (one line: fastText reads lines)."""

    name = "language"

    def __init__(self, model_path: str, languages: list[str], min_score: float):
        self.model = load_model("fasttext", model_path)
        self.languages = set(languages)
        self.min_score = min_score

    def identify(self, text: str) -> tuple[str, float]:
        labels, scores = self.model.predict(" ".join(text.split()), k=1)
        return labels[0].removeprefix("__label__"), float(scores[0])

    def check_document(self, doc: dict) -> str | None:
        text = " ".join(t for t in doc["texts"] if t.strip())
        if not text:
            return None
        lang, score = self.identify(text)
        if lang not in self.languages:
            return f"{self.name} ({lang}, score {score:.2f}; kept: {', '.join(sorted(self.languages))})"
        if score < self.min_score:
            return f"{self.name} ({lang} with score {score:.2f} < {self.min_score})"
        return None


# ----------------------------------------------------------------------------------------------
# Image rules


class FaceRule:
    """The data's own face detections when it carries them (`face_count` >= 0), else the detector."""

    name = "face_detected"

    def __init__(self, detector_path: str | None):
        self.detector = load_model("cascade", detector_path) if detector_path else None

    def count(self, img: dict) -> int:
        known = img.get("face_count")
        known = -1 if known is None else known
        if known >= 0 or self.detector is None or not img.get("data"):
            return max(known, 0)
        import cv2

        gray = cv2.imdecode(np.frombuffer(img["data"], np.uint8), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            return 0
        return len(self.detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)))

    def check(self, img: dict, doc: dict) -> str | None:
        n = self.count(img)
        return f"{self.name} ({n} face{'s' if n != 1 else ''})" if n else None


class NSFWClassifier:
    """An MLP over L2-normalised CLIP image embeddings -> P(unsafe); a folder of its own.

    config.json: {"clip_model": path (absolute, or relative to the folder), "hidden": [..],
    "threshold": p}; model.safetensors: the MLP's weights (torch.nn.Sequential names)."""

    def __init__(self, folder: str, device: str = "cpu"):
        import torch
        from safetensors.torch import load_file
        from transformers import CLIPImageProcessor, CLIPModel

        root = Path(folder)
        try:
            self.config = json.loads((root / "config.json").read_text())
            clip = Path(self.config["clip_model"])
            clip = clip if clip.is_absolute() else root / clip
            self.clip = CLIPModel.from_pretrained(clip).eval().to(device)
            self.processor = CLIPImageProcessor.from_pretrained(clip)
            self.mlp = self.build(self.clip.config.projection_dim, self.config["hidden"])
            self.mlp.load_state_dict(load_file(root / "model.safetensors"))
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"safety.nsfw_model={folder} is not a loadable classifier folder "
                             f"({type(e).__name__}: {str(e).splitlines()[0]}); write one with "
                             "NSFWClassifier.save_pretrained") from None
        self.mlp.eval().to(device)
        self.device = device
        self.threshold = float(self.config.get("threshold", 0.5))
        self._torch = torch

    @staticmethod
    def build(dim: int, hidden: list[int]) -> Any:
        import torch

        layers: list[torch.nn.Module] = []
        for h in hidden:
            layers += [torch.nn.Linear(dim, h), torch.nn.ReLU()]
            dim = h
        return torch.nn.Sequential(*layers, torch.nn.Linear(dim, 1))

    @staticmethod
    def save_pretrained(folder: str | Path, mlp: Any, clip_model: str, hidden: list[int],
                        threshold: float = 0.5) -> Path:
        from safetensors.torch import save_file

        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, root / "model.safetensors")
        (root / "config.json").write_text(json.dumps(
            {"type": "dreamcore-nsfw-mlp", "clip_model": str(clip_model), "hidden": hidden, "threshold": threshold},
            indent=2))
        return root

    def embed(self, images: list[bytes]) -> Any:
        from PIL import Image

        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        with self._torch.inference_mode():
            pix = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            emb = self.clip.get_image_features(pixel_values=pix)
            emb = getattr(emb, "pooler_output", emb)  # a tensor, or an output object in newer transformers
            return self._torch.nn.functional.normalize(emb.float(), dim=-1)

    def scores(self, images: list[bytes]) -> np.ndarray:
        """P(unsafe) per image."""
        if not images:
            return np.zeros(0, dtype=np.float32)
        with self._torch.inference_mode():
            return self._torch.sigmoid(self.mlp(self.embed(images))).squeeze(-1).cpu().numpy()


@lru_cache(maxsize=8)
def load_model(kind: str, path: str) -> Any:
    """One model per worker process and path (Ray reuses workers across batches); the job also calls
    it on the driver before any Ray work, so a bad path fails at once with a ValueError naming it."""
    if kind == "fasttext":
        import fasttext

        try:
            return fasttext.load_model(path)
        except ValueError as e:
            raise ValueError(f"safety.language_model={path} is not a fastText model ({e})") from None
    if kind == "cascade":
        import cv2

        try:
            cascade = cv2.CascadeClassifier(path)
        except (cv2.error, SystemError):
            cascade = None
        if cascade is None or cascade.empty():
            raise ValueError(f"safety.face_detector={path} is not an OpenCV cascade XML file")
        return cascade
    if kind == "nsfw":
        return NSFWClassifier(path)
    raise KeyError(kind)


# ----------------------------------------------------------------------------------------------
# The stage's rules from the configuration


def document_rules(cfg: SafetyConfig) -> list:
    """Document rules in the order they run. Language first: a French page fails the English
    stop-word ratio too, and "language (fr, ...)" is the reason a data team can act on."""
    rules: list = []
    if cfg.language_model:
        rules.append(LanguageRule(cfg.language_model, cfg.languages, cfg.language_min_score))
    if cfg.stop_words_min_ratio > 0:
        stop = _read_words(cfg.stop_words_file) if cfg.stop_words_file else ENGLISH_STOP_WORDS
        rules.append(StopWordRule(cfg.stop_words_min_ratio, stop))
    if cfg.flagged_words_max_ratio > 0 and cfg.flagged_words_file:
        rules.append(FlaggedWordRule(cfg.flagged_words_max_ratio, _read_words(cfg.flagged_words_file)))
    return rules


def image_rules(cfg: SafetyConfig) -> list:
    return [FaceRule(cfg.face_detector)] if cfg.drop_faces else []


class NSFWRule:
    """Images whose P(unsafe) is above the threshold; scored a batch at a time (one CLIP call)."""

    name = "nsfw"

    def __init__(self, cfg: SafetyConfig):
        self.model: NSFWClassifier = load_model("nsfw", cfg.nsfw_model)
        self.threshold = cfg.nsfw_threshold if cfg.nsfw_threshold is not None else self.model.threshold

    def reasons(self, images: list[dict]) -> list[str | None]:
        scores = self.model.scores([img["data"] for img in images])
        return [f"{self.name} (p={s:.2f} > {self.threshold})" if s > self.threshold else None for s in scores]
