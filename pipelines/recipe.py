"""The embedded default as code: corpus, curation, training and evaluation of the `tiny` preset.

One function, `shapes_tiny()`, returns every setting the demo runs with (torchtitan style: a run
configuration is a Python function returning typed configs, not a pile of flags). `dreamcore
demo`, the tests and bench/quality.py all take it, so what the benchmark measures is what the
pipeline trains. Why each value is what it is: docs/architecture.md ("What makes the tiny preset
learn"). A recipe is a number of steps, never a wall clock: a slower machine takes longer and
trains the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamcore.config import ConfigError, preset
from pipelines.curate.config import CurateConfig, embedded
from pipelines.train.config import OptimConfig, TrainConfig


@dataclass(frozen=True)
class CorpusSettings:
    """A synthetic shapes corpus (`dreamcore.synthetic.make_corpus`)."""

    num_docs: int = 3000
    seed: int = 0
    single_image_fraction: float = 1.0  # share of one-image documents (text-image pairs)
    story_fraction: float = 0.0  # share of interleaved stories (2-4 images; the rest: unrelated images)


@dataclass
class Dataset:
    """One curated folder of the training mixture: its corpus, how curation lays it out, its share.

    The first dataset's curation trains the tokenizer; the others are curated with it
    (`model_overrides.tokenizer.name_or_path`), as a real run curates MMC4 and caption pairs with
    one tokenizer before mixing them.
    """

    name: str
    corpus: CorpusSettings
    curate: CurateConfig
    weight: float = 1.0  # relative share of training rows (TrainConfig.data.mixture)


@dataclass(frozen=True)
class EvalSettings:
    """Held-out scoring (`dreamcore.synthetic.evaluate`) through the serving engine."""

    num_prompts: int = 216  # every held-out combination six times: a 95% interval of about +-6 points
    num_images: int = 216
    num_stories: int = 72  # teacher-forced held-out stories (3 scored images each)
    num_free_stories: int = 36  # stories the model writes from their first sentence (the served loop)
    num_inference_steps: int = 50  # more DDIM steps than serving's default: shape is read at 16 px
    seed: int = 1  # added to the run's seed: held-out cases and sampling noise

    def evaluate_kwargs(self, run_seed: int = 0) -> dict[str, int]:
        """The keyword arguments of `dreamcore.synthetic.evaluate` (the demo and bench/quality.py)."""
        return {"num_prompts": self.num_prompts, "num_images": self.num_images, "num_stories": self.num_stories,
                "num_free_stories": self.num_free_stories, "num_inference_steps": self.num_inference_steps,
                "seed": run_seed + self.seed}


@dataclass
class Recipe:
    datasets: list[Dataset]
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def dataset(self, name: str) -> Dataset:
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(f"the recipe has no dataset {name!r}; it has {', '.join(d.name for d in self.datasets)}")


# Rows per optimizer step over all workers. Every row is packed (document-masked) to max_seq_len:
# a pair row holds about 9 one-image sequences (4.5 creation + 4.5 comprehension), a story row 1-2
# stories (about 4 images). 7 pair rows + 3 story rows: about 31 creation and 31 comprehension
# pairs and 13 story images a step, the LLM at 10 x 256 tokens.
GLOBAL_BATCH = 10


def shapes_tiny(workers: int = 2) -> Recipe:
    """The tiny preset on the shapes world, DreamLLM stage II: a mixture of text-image pairs and
    interleaved stories, 1200 steps of 10 packed rows.

    - pairs (weight PAIRS_WEIGHT): one-image documents, each a creation sequence (sentence -> dream
      block) and a comprehension sequence (image -> sentence);
    - stories: 2-4 images of one shape that changes, the text between images naming only what
      changes, so image k depends on the text and the images before it.
    Both are packed several sequences to a row; each attends only to itself (document masking).
    `workers` data-parallel Ray Train workers split the global batch, so 1 or 2 workers train on
    the same batches of 10 rows.
    """
    if workers < 1 or GLOBAL_BATCH % workers:
        raise ConfigError(f"shapes_tiny(workers={workers}): workers must divide the global batch {GLOBAL_BATCH}")
    pairs = embedded()
    pairs.tokenize.pair_layout = "pairs"  # one-image documents -> a creation and a comprehension sequence
    pairs.tokenize.packing = "pack"
    stories = embedded()
    stories.tokenize.pair_layout = "interleaved"
    stories.tokenize.packing = "pack"
    model = preset("tiny")
    model.decoder.coord_channels = True
    # The diffusion loss on 32 dream images a step (of about 44), split over the workers.
    model.loss.vm_max_images = VM_IMAGES // workers
    train = TrainConfig(
        model=model,
        micro_batch_size=GLOBAL_BATCH // workers,
        max_steps=1200,
        # The LLM starts at a quarter of the lr: trained as fast as the UNet, the dream queries'
        # attention locks onto the colour and size words within the first steps and never turns to
        # the position words (their conditions stay 0.01-0.04 apart; position at chance). Slower,
        # the conditions keep them apart (0.2-0.9) and the UNet learns to place shapes. Once they
        # have (the first third), the LLM's rate ramps up to LLM_LR_MULT_TO by two thirds, so the
        # text side (captions, the sentence after an image, shapes) learns faster
        # (docs/architecture.md, "What makes the tiny preset learn").
        optim=OptimConfig(lr=2e-3, weight_decay=0.0, beta2=0.95, grad_clip=1.0, warmup_steps=50, min_lr_ratio=0.1,
                          lr_mults={"llm": LLM_LR_MULT}, lr_mult_ramps={"llm": [LLM_LR_MULT_TO, 1 / 3, 2 / 3]}),
    )
    train.scaling.workers = workers
    # Stories first: their curation trains the tokenizer, on text that has every sentence kind.
    datasets = [
        Dataset("stories", CorpusSettings(num_docs=STORY_DOCS, seed=1, single_image_fraction=0.0, story_fraction=1.0),
                stories, weight=1.0 - PAIRS_WEIGHT),
        Dataset("pairs", CorpusSettings(num_docs=3000, seed=0), pairs, weight=PAIRS_WEIGHT),
    ]
    return Recipe(datasets=datasets, train=train.validate())


PAIRS_WEIGHT = 0.7  # DreamLLM's stage II mixes interleaved documents with pairs; see docs/architecture.md
LLM_LR_MULT = 0.25
LLM_LR_MULT_TO = 0.75
STORY_DOCS = 2000
VM_IMAGES = 32
