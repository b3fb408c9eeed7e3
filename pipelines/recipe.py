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
    """The synthetic shapes corpus (`dreamcore.synthetic.make_corpus`)."""

    num_docs: int = 3000
    seed: int = 0
    single_image_fraction: float = 1.0  # share of one-image documents (text-image pairs)
    story_fraction: float = 0.0  # share of interleaved stories (2-4 images; the rest: unrelated images)


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
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    curate: CurateConfig = field(default_factory=embedded)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)


GLOBAL_BATCH = 64  # rows per optimizer step over all workers: 32 creation + 32 comprehension pairs


def shapes_tiny(workers: int = 2) -> Recipe:
    """The tiny preset on the shapes world: DreamLLM pair data, unpacked, 1500 steps of 64 rows.

    `workers` data-parallel Ray Train workers split the global batch, so 1 or 2 workers train on
    the same batches of 64 rows.
    """
    if workers < 1 or GLOBAL_BATCH % workers:
        raise ConfigError(f"shapes_tiny(workers={workers}): workers must divide the global batch {GLOBAL_BATCH}")
    curate = embedded()
    curate.tokenize.pair_layout = "pairs"  # one-image documents -> a creation and a comprehension row
    curate.tokenize.packing = "truncate"  # one sequence per row
    train = TrainConfig(
        model=preset("tiny"),
        micro_batch_size=GLOBAL_BATCH // workers,
        max_steps=1500,
        optim=OptimConfig(lr=2e-3, weight_decay=0.0, beta2=0.95, grad_clip=1.0, warmup_steps=50, min_lr_ratio=0.1),
    )
    train.scaling.workers = workers
    return Recipe(curate=curate, train=train.validate())
