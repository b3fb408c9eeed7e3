"""CurateConfig: every knob of the curation job, loaded through `dreamcore.config.load_config`.

Defaults follow img2dataset (crawl) and MMC4 / OBELICS (filters); `embedded()` is the preset the
demo and tests use (loopback images allowed, thresholds fit the small synthetic images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dreamcore.config import ConfigError, ModelConfig, preset

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")  # img2dataset's
ENCODE_FORMATS = ("png", "jpg", "webp")
PACKING = ("pack", "truncate")
PAIR_LAYOUTS = ("interleaved", "pairs")
SIMILARITY_STYLES = ("mmc4", "core")
# Who places images among sentences: the dataset itself, its similarity matrix, or a CLIP model.
PLACEMENTS = ("source", "matrix", "clip")


@dataclass
class CrawlConfig:
    """Image download, verification and resize (img2dataset's options, plus the safety caps)."""

    timeout_s: float = 10.0
    retries: int = 2  # extra attempts after 429/5xx, timeouts and connection errors
    backoff_s: float = 0.5  # first back-off; doubles per attempt; a Retry-After header wins (capped)
    max_backoff_s: float = 10.0
    user_agent_token: str | None = None  # appended to the user agent, as img2dataset does
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    allow_private_networks: bool = False  # SSRF guard off only for loopback demos and tests
    max_redirects: int = 5
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000  # refused from the header, before any full decode
    allowed_formats: list[str] = field(default_factory=lambda: ["jpeg", "png", "webp"])
    threads: int = 32  # per Ray task; I/O bound, so many threads share one core
    per_host_concurrency: int = 16
    # Documents per Ray Data batch (one crawl task): a task's fixed costs (scheduling, Arrow
    # conversion, threads starting on a batch) are paid per batch, so small batches cost crawl rate.
    batch_size: int = 64
    num_cpus: float = 0.5  # per crawl task: waiting on sockets needs little CPU, so tasks overlap
    image_size: int = 0  # 0 = the model's image_resolution
    resize_mode: str = "center_crop"  # training rows need square images
    resize_only_if_bigger: bool = False
    encode_format: str = "png"
    encode_quality: int = 6  # PNG compression 0-9; JPEG/WebP quality 0-100


@dataclass
class FilterConfig:
    """Thresholds of the filter rules (0 or empty turns a rule off)."""

    min_image_size: int = 150  # MMC4: both sides >= 150 px
    min_aspect_ratio: float = 0.5  # MMC4: width / height in [0.5, 2]
    max_aspect_ratio: float = 2.0
    dedup_exact: bool = True
    near_duplicate_distance: int = 4  # perceptual hash Hamming distance; -1 turns it off
    max_documents_per_image: int = 10  # an image in more documents is a logo/banner: dropped
    min_words: int = 10  # text quality (OBELICS-style)
    max_words: int = 100_000
    max_repetition_ratio: float = 0.3  # share of duplicated sentences
    max_special_char_ratio: float = 0.3
    min_images: int = 1
    max_images: int = 30
    min_sentences: int = 1
    max_sentences: int = 500
    optout_domains: list[str] = field(default_factory=list)
    optout_file: str | None = None  # one domain per line


@dataclass
class SimilarityConfig:
    """Where each image goes among the sentences, and the similarity threshold that keeps it.

    placement "source" keeps the dataset's own placement (MMC4 `matched_text_index`, OBELICS
    positions): those placements are the dataset, and a shipped matrix does not always reproduce
    them. "matrix" re-assigns with MMC4's linear assignment over the document's similarity matrix
    (CLIP for documents without one when `model` is set); "clip" scores every document with `model`.
    """

    enabled: bool = True
    placement: str = "source"
    style: str = "mmc4"  # mmc4: threshold 0.15; core: 0.25 (used when threshold is unset)
    threshold: float | None = None
    model: str | None = None  # CLIP folder/hub id (placement matrix or clip)
    recompute: bool = False  # placement matrix: score with the model even when a matrix is there
    batch_size: int = 8
    num_gpus: float = -1  # -1: one GPU per actor when the cluster has GPUs, else CPU actors
    actors: int = 1

    def problem(self) -> str | None:
        """What makes this setting contradict itself (checked at load and by the stage), or None."""
        if self.placement not in PLACEMENTS:
            return f"similarity.placement={self.placement!r} is not valid; choose one of {', '.join(PLACEMENTS)}"
        if self.placement == "clip" and not self.model:
            return ("similarity.placement=clip needs similarity.model (a CLIP folder or hub id); set it, "
                    "or use placement source or matrix")
        if self.placement == "source" and self.recompute:
            return ("similarity.recompute=true re-scores images, which placement=source never does (it keeps "
                    "the dataset's placements); set similarity.placement=clip to re-assign with the model")
        if self.placement == "source" and self.model:
            return (f"similarity.model={self.model!r} is set but placement=source never uses it (it keeps the "
                    "dataset's placements); set similarity.placement=matrix or clip, or unset the model")
        return None

    def effective_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.15 if self.style == "mmc4" else 0.25


@dataclass
class SafetyConfig:
    """Safety rules (pipelines/curate/safety.py); each is off until configured (0, no path)."""

    nsfw_model: str | None = None  # folder written by NSFWClassifier.save_pretrained
    nsfw_threshold: float | None = None  # None: the classifier's own (config.json "threshold")
    drop_faces: bool = False  # drop images with faces (the data's face_detections, else the detector)
    face_detector: str | None = None  # OpenCV Haar/LBP cascade XML, used where the data has no field
    stop_words_min_ratio: float = 0.0  # e.g. 0.3: documents whose words are < 30% stop words go
    stop_words_file: str | None = None  # one word per line; default: safety.ENGLISH_STOP_WORDS
    flagged_words_max_ratio: float = 0.0  # e.g. 0.01, with flagged_words_file
    flagged_words_file: str | None = None
    language_model: str | None = None  # fastText language identification model (.bin / .ftz)
    languages: list[str] = field(default_factory=lambda: ["en"])
    language_min_score: float = 0.5

    def problems(self) -> list[str]:
        """Configured paths that do not exist, and inconsistent settings: one line each."""
        out = []
        for key in ("nsfw_model", "face_detector", "stop_words_file", "flagged_words_file", "language_model"):
            path = getattr(self, key)
            if path and not Path(path).exists():
                out.append(f"safety.{key}={path} does not exist; give the path of the file/folder or unset it")
        if self.flagged_words_max_ratio > 0 and not self.flagged_words_file:
            out.append("safety.flagged_words_max_ratio is set but safety.flagged_words_file is not; "
                       "give a file of flagged words (one per line)")
        if self.face_detector and not self.drop_faces:
            out.append("safety.face_detector is set but safety.drop_faces is false; set drop_faces: true")
        return out


@dataclass
class TokenizeConfig:
    packing: str = "pack"  # pack several documents per row, or one truncated document per row
    # One-image documents: "interleaved" lays them out like any MMC4 document; "pairs" turns each
    # into DreamLLM's pair data, a creation sequence (its sentence, then the dream block) and a
    # comprehension sequence (the image, then its sentence as target), in separate rows.
    pair_layout: str = "interleaved"
    tokenizer_sample_docs: int = 2000  # driver-side sample for training the byte-level BPE
    batch_size: int = 64
    samples_per_file: int = 2048


@dataclass
class CurateConfig:
    """The whole job. `model` is a preset name; `model_overrides` adjust it (`max_seq_len: 512`)."""

    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    # Instruction data (LLaVA-style `image` paths): the folder or URI they are relative to;
    # "" = the folder of each instruction file.
    image_root: str = ""
    shards_per_commit: int = 8  # input shards per published group (the resume granularity)
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("crawl.resize_mode", self.crawl.resize_mode, RESIZE_MODES),
            ("crawl.encode_format", self.crawl.encode_format, ENCODE_FORMATS),
            ("tokenize.packing", self.tokenize.packing, PACKING),
            ("tokenize.pair_layout", self.tokenize.pair_layout, PAIR_LAYOUTS),
            ("similarity.style", self.similarity.style, SIMILARITY_STYLES),
        ]
        for key, value, choices in checks:
            if value not in choices:
                raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")
        if self.similarity.problem():
            raise ConfigError(self.similarity.problem())
        if self.shards_per_commit < 1:
            raise ConfigError("shards_per_commit must be >= 1")

    def model_config(self) -> ModelConfig:
        from dreamcore.config import merge

        return merge(preset(self.model), self.model_overrides, prefix="model_overrides")

    def image_size(self) -> int:
        return self.crawl.image_size or self.model_config().image_resolution


def embedded() -> CurateConfig:
    """The demo/test preset: loopback allowed, small images and short documents accepted."""
    cfg = CurateConfig()
    cfg.crawl.allow_private_networks = True
    cfg.crawl.timeout_s = 5.0
    cfg.filter.min_image_size = 8
    cfg.filter.min_words = 1
    cfg.filter.max_documents_per_image = 0
    cfg.filter.near_duplicate_distance = -1  # synthetic shapes repeat by design
    cfg.filter.dedup_exact = False
    cfg.progress = True
    return cfg


PRESETS = {"default": CurateConfig, "embedded": embedded}
