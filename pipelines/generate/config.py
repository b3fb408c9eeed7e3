"""GenerateConfig: every knob of `dreamcore generate` (offline), loaded through `load_config`.

Per-line limits and defaults are the server's own `LimitsConfig` / `DefaultsConfig`
(pipelines/serve/config.py), so a line is accepted offline exactly when /v1/generate would accept
the same request. The two pools size the LLM and the decoder separately, as the two Serve
deployments are; `num_cpus: 0` derives each actor's share from the cluster (see `stage_cpus`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamcore.config import ConfigError
from pipelines.serve.config import DefaultsConfig, LimitsConfig

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class PoolConfig:
    """One model pool: the actors of each round that runs this half of the model."""

    actors: int = 1  # per round: an LLM stage (or decoder stage) of the pipeline holds this many
    num_cpus: float = 0.0  # per actor; 0: derived from the cluster (GenerateConfig.stage_cpus)
    num_gpus: float = 0.0  # per actor, e.g. 0.25 puts four stage actors on one GPU
    batch_size: int = 8  # documents per engine call (rows of one Ray Data batch)
    threads: int = 1  # torch intra-op threads per actor (Ray sizes the process, torch does not see it)


def _llm_pool() -> PoolConfig:
    # Text batches well (one KV-cached decode for all rows): bigger batches.
    return PoolConfig(batch_size=16)


def _decoder_pool() -> PoolConfig:
    # An image is num_inference_steps UNet calls; 8 images already fill a CPU core or a GPU.
    return PoolConfig(batch_size=8)


@dataclass
class GenerateConfig:
    """The whole offline job; the prompts and the output folder are arguments of `generate()`."""

    checkpoint: str = ""  # a folder written by save_pretrained (or training)
    device: str = "auto"  # "auto" (cuda when the actor has a GPU), "cpu", "cuda"
    seed: int = 0  # lines without a seed get seed + a hash of their id: stable across reruns
    llm: PoolConfig = field(default_factory=_llm_pool)
    decoder: PoolConfig = field(default_factory=_decoder_pool)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    docs_per_shard: int = 256  # documents per Parquet file: the unit of commit and of lost work on a kill
    data_cpus: float = 0.5  # CPUs left to Ray Data's own tasks when num_cpus is derived
    progress: bool = True  # Ray Data progress bars (RAY_DATA_DISABLE_PROGRESS_BARS=1 turns them off)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r}: choose one of {', '.join(DEVICES)}")
        for name in ("llm", "decoder"):
            pool: PoolConfig = getattr(self, name)
            if pool.actors < 1 or pool.batch_size < 1 or pool.threads < 1:
                raise ConfigError(f"{name}.actors, {name}.batch_size and {name}.threads must be >= 1, got "
                                  f"{pool.actors}, {pool.batch_size}, {pool.threads}")
            if pool.num_cpus < 0 or pool.num_gpus < 0:
                raise ConfigError(f"{name}.num_cpus and {name}.num_gpus must be >= 0")
        if self.docs_per_shard < 1:
            raise ConfigError(f"docs_per_shard={self.docs_per_shard} must be >= 1")
        if self.data_cpus < 0:
            raise ConfigError(f"data_cpus={self.data_cpus} must be >= 0")

    def stage_cpus(self, rounds: int, cluster_cpus: float) -> tuple[float, float]:
        """CPUs per (LLM, decoder) actor for a pipeline of `rounds` image rounds.

        There are rounds + 1 LLM stages and `rounds` decoder stages, each its own actor pool. Ray Data
        starts every pool before any row flows and waits for resources without a word (RAY-NOTES: the
        silent ingest hang), so the pools must fit beside `data_cpus` for Data's own tasks.
        """
        llm_actors = (rounds + 1) * self.llm.actors
        dec_actors = rounds * self.decoder.actors
        room = cluster_cpus - self.data_cpus
        derived = room / (llm_actors + dec_actors)
        llm_cpus = self.llm.num_cpus or derived
        dec_cpus = self.decoder.num_cpus or derived
        need = llm_actors * llm_cpus + dec_actors * dec_cpus
        if derived <= 0 or need > room + 1e-9:
            raise ConfigError(
                f"{llm_actors} LLM and {dec_actors} decoder actors need {need:.2f} CPUs but the cluster has "
                f"{cluster_cpus:g} free, {self.data_cpus:g} of them kept for Ray Data (data_cpus); Ray Data would "
                "wait forever. Lower llm.num_cpus / decoder.num_cpus (0 derives them), llm.actors / "
                "decoder.actors, or the lines' max_images (limits.max_images)"
            )
        return llm_cpus, dec_cpus
