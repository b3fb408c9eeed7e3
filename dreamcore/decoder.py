"""The image decoder: a diffusers UNet conditioned on DreamLLM's dream-query states.

Design (DreamLLM, Dong et al. 2024, section 2.1):
- The UNet's `encoder_hidden_states` are the LLM's last hidden states at the dream-query positions,
  projected by the model's `cond_proj` (Q, cross_attention_dim). Stable Diffusion's text encoder is
  never loaded.
- Training: the usual denoising MSE against the scheduler's target (epsilon or v). The UNet can be
  frozen while the condition still receives gradients: they flow *through* the UNet into the LLM.
- Sampling: DDIM with classifier-free guidance; the unconditional condition comes from the same LLM
  and queries run on an empty prompt (computed by the caller, passed in as `uncond`).
  Each image is a `Trajectory` (its own sampler, noise and progress); `step` advances any set of
  them in one UNet call, so `sample` and the serving replica's step-level batching
  (dreamcore/denoiser.py) are the same code.
- Two set-ups: a pretrained Stable Diffusion folder / hub id (`unet/`, `vae/`, `scheduler/`, loaded
  by dreamcore.pretrained.load_decoder) whose latents are scaled by the VAE's `scaling_factor`, or
  (tiny preset) a pixel-space UNet built from config: 3 channels in and out,
  `sample_size = resolution`, trained from scratch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch import nn

from dreamcore.config import ConfigError, DecoderConfig

PREDICTION_TYPES = ("epsilon", "v_prediction")


def unet_from_config(cfg: DecoderConfig, in_channels: int = 3) -> UNet2DConditionModel:
    """A randomly initialised UNet; cross-attention in every block but the lowest-resolution down
    block and its mirror (the Stable Diffusion pattern)."""
    n = len(cfg.block_out_channels)
    if n < 1:
        raise ConfigError("decoder.block_out_channels is empty; give at least one width, e.g. [32, 32]")
    down = tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]) if n > 1 else ("CrossAttnDownBlock2D",)
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)) if n > 1 else ("CrossAttnUpBlock2D",)
    groups = min(32, *cfg.block_out_channels)
    # decoder.attention_head_dim goes to diffusers unchanged, and diffusers' UNet2DConditionModel
    # reads it as the NUMBER of heads (a naming quirk it keeps for compatibility): the tiny preset's
    # 2 means 2 heads of width 16. Pretrained decoders bring their own value.
    heads = cfg.attention_head_dim
    return UNet2DConditionModel(
        sample_size=cfg.resolution,
        in_channels=in_channels + (2 if cfg.coord_channels else 0),
        out_channels=in_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=groups,
        only_cross_attention=cfg.only_cross_attention,
    )


def scheduler_config(cfg: DecoderConfig) -> dict[str, Any]:
    """The noise schedule of a decoder built from config (pretrained ones bring their own)."""
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"decoder.prediction_type={cfg.prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
        )
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,  # the tiny pixel-space model should not hide a bad x0 estimate by clipping
    )


class DiffusionDecoder(nn.Module):
    """UNet (+ optional VAE) + schedulers: `loss(images, cond)` for training, `sample(...)` for images."""

    def __init__(
        self,
        cfg: DecoderConfig,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL | None,
        scheduler_cfg: dict[str, Any],
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.unet = unet
        self.vae = vae
        # Training noise schedule (DDPM) and the sampler (DDIM) share one set of betas.
        self.train_scheduler = DDPMScheduler.from_config(scheduler_cfg)
        self.sample_scheduler_config = dict(self.train_scheduler.config)
        self.prediction_type = self.train_scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"decoder scheduler prediction_type={self.prediction_type!r} is not supported; "
                f"use one of {', '.join(PREDICTION_TYPES)}"
            )
        if not 0.0 <= cfg.eta <= 1.0:
            raise ConfigError(f"decoder.eta={cfg.eta} is outside [0, 1]; use 0 (deterministic DDIM) to 1 (DDPM-like)")
        self.resolution = cfg.resolution
        # A UNet with 2 more inputs than outputs was built with coordinate planes (decoder.coord_channels).
        self.coord_channels = unet.config.in_channels - unet.config.out_channels
        if self.coord_channels not in (0, 2):
            raise ConfigError(f"the UNet has {unet.config.in_channels} input and {unet.config.out_channels} output "
                              "channels; a decoder needs equal counts, or 2 more inputs (coordinate planes)")
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        if self.resolution % self.vae_scale:
            raise ConfigError(
                f"decoder.resolution={self.resolution} is not a multiple of the VAE's downscale factor "
                f"{self.vae_scale}"
            )
        if vae is not None:
            vae.requires_grad_(False)  # the VAE never trains (DreamLLM and the tiny preset alike)
        self._samplers: dict[int, DDIMScheduler] = {}

    # ------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_config(cls, cfg: DecoderConfig) -> DiffusionDecoder:
        """Random init from config. With `use_vae` a small AutoencoderKL is built too (tests)."""
        vae = None
        channels = 3
        if cfg.use_vae:
            n = len(cfg.vae_block_out_channels)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(cfg.vae_block_out_channels),
                latent_channels=4,
                norm_num_groups=min(32, *cfg.vae_block_out_channels),
                sample_size=cfg.resolution,
            )
            channels = 4
        sample_cfg = cfg
        if vae is not None:
            sample_cfg = dataclasses.replace(cfg, resolution=cfg.resolution // 2 ** (len(vae.config.block_out_channels) - 1))
        return cls(cfg, unet_from_config(sample_cfg, in_channels=channels), vae, scheduler_config(cfg))

    # ------------------------------------------------------------------------------------------
    # Pixels <-> model space

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """(K, 3, R, R) images in [-1, 1] -> what the UNet denoises (latents scaled, or pixels)."""
        if self.vae is None:
            return images
        with torch.no_grad():
            posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.sample() * self.vae.config.scaling_factor

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> (K, 3, R, R) in [0, 1]."""
        if self.vae is not None:
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------------------
    # Training

    def loss(self, images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Denoising MSE. images: (K, 3, R, R) in [-1, 1]; cond: (K, Q, cross_attention_dim).

        Gradients reach `cond` even when the UNet is frozen (DreamLLM trains the LLM this way).
        """
        if images.shape[0] != cond.shape[0]:
            raise ValueError(f"decoder.loss: {images.shape[0]} images but {cond.shape[0]} conditions")
        x0 = self.to_model_space(images)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.train_scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.train_scheduler.get_velocity(x0, noise, t)
        pred = self.denoise(xt.to(self.unet.dtype), t, cond.to(self.unet.dtype))
        return F.mse_loss(pred.float(), target.float())

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for x at timestep t; with coordinate planes, each pixel's (x, y) too."""
        if self.coord_channels:
            k, _, h, w = x.shape
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
                                    torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype), indexing="ij")
            x = torch.cat([x, torch.stack([xs, ys]).expand(k, -1, -1, -1)], dim=1)
        return self.unet(x, t, encoder_hidden_states=cond).sample

    # ------------------------------------------------------------------------------------------
    # Sampling

    def start(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        eta: float | None = None,
    ) -> Trajectory:
        """One image's denoising run, at its starting noise (drawn on CPU from `generator`).

        cond / uncond: (Q, C). Checked here, per image, so that a bad image is refused on its own
        and never fails the UNet call it would have shared with others.
        """
        steps = self.cfg.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        scale = self.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        eta = self.cfg.eta if eta is None else float(eta)
        if steps < 1:
            raise ValueError(f"sample: num_inference_steps={steps}; give at least 1")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"sample: eta={eta} is outside [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)")
        if not np.isfinite(scale):
            raise ValueError(f"sample: guidance_scale={scale} is not a finite number")
        want = (self.unet.config.cross_attention_dim,)
        for name, c in (("cond", cond), ("uncond", uncond)):
            if c is not None and (c.dim() != 2 or tuple(c.shape[1:]) != want):
                raise ValueError(f"sample: {name} has shape {tuple(c.shape)}; it must be (num_queries, {want[0]})")
            if c is not None and not torch.isfinite(c).all():
                raise ValueError(f"sample: {name} holds NaN or infinite values")
        if scale != 1.0 and uncond is None:
            raise ValueError("guidance_scale != 1 needs `uncond` (the empty-prompt dream condition)")
        sched = self._sampler(steps)
        device, dtype = self.unet.device, self.unet.dtype
        shape = (self.unet.config.out_channels, self.latent_size, self.latent_size)
        x = _draw([generator], shape)[0].to(device=device, dtype=dtype) * sched.init_noise_sigma
        return Trajectory(cond.to(device=device, dtype=dtype),
                          None if scale == 1.0 else uncond.to(device=device, dtype=dtype),
                          scale, eta, generator, sched, x)

    def step(self, trajectories: list[Trajectory]) -> None:
        """Advance every unfinished trajectory by one denoising step, all in one UNet call.

        Rows may differ in step count, progress and guidance: the UNet takes one timestep per row,
        and the guided ones add their unconditional row to the same call. This is what lets the
        serving replica admit an image at any step (dreamcore/denoiser.py).
        """
        live = [tr for tr in trajectories if not tr.done]
        if not live:
            return
        guided = [tr for tr in live if tr.uncond is not None]
        # Rows: [unconditional rows of the guided; conditional rows of all]
        x = torch.stack([tr.x for tr in guided] + [tr.x for tr in live])
        t = torch.stack([tr.timestep for tr in guided] + [tr.timestep for tr in live])
        enc = torch.stack([tr.uncond for tr in guided] + [tr.cond for tr in live])
        with torch.no_grad():
            out = self.denoise(x, t.to(x.device), enc)
        out_u, out_c = out[:len(guided)], out[len(guided):]
        u = 0
        for i, tr in enumerate(live):
            pred = out_c[i]
            if tr.uncond is not None:
                pred = out_u[u] + tr.scale * (pred - out_u[u])
                u += 1
            # eta > 0: the step noise from the image's own generator (batch-independent)
            noise = _draw([tr.generator], tr.x.shape).to(tr.x.device, tr.x.dtype) if tr.eta > 0 else None
            tr.x = tr.scheduler.step(pred[None], tr.timestep, tr.x[None], eta=tr.eta,
                                     variance_noise=None if noise is None else noise).prev_sample[0]
            tr.index += 1

    def _sampler(self, steps: int) -> DDIMScheduler:
        """The DDIM sampler for a step count (one per count: its `step` keeps no per-run state)."""
        if steps not in self._samplers:
            sched = DDIMScheduler.from_config(self.sample_scheduler_config)
            sched.set_timesteps(steps)  # timesteps on CPU; step() moves them to the UNet's device
            self._samplers[steps] = sched
        return self._samplers[steps]

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | list[int] | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """DDIM + classifier-free guidance -> (K, 3, R, R) images in [0, 1].

        cond: (K, Q, C) or (Q, C). uncond: the empty-prompt condition, (Q, C) or (K, Q, C); needed
        when guidance_scale != 1. `seed` (one int, or one per image) draws each image's starting
        noise, and with eta > 0 its noise at every step, from its own CPU generator, so an image
        does not depend on the batch it was served in. eta: `decoder.eta` unless given.
        """
        if cond.dim() == 2:
            cond = cond.unsqueeze(0)
        k = cond.shape[0]
        if uncond is not None and uncond.dim() == 2:
            uncond = uncond.unsqueeze(0).expand(k, -1, -1)
        generators = _generators(k, generator, seed)
        runs = [self.start(cond[i], None if uncond is None else uncond[i], num_inference_steps, guidance_scale,
                           generators[i], eta) for i in range(k)]
        while not all(tr.done for tr in runs):
            self.step(runs)
        return self.to_pixels(torch.stack([tr.x for tr in runs]))

    @torch.no_grad()
    def pixels_uint8(self, trajectories: list[Trajectory]) -> np.ndarray:
        """Finished trajectories -> (K, R, R, 3) uint8 images (what the engine and serving hand out)."""
        images = self.to_pixels(torch.stack([tr.x for tr in trajectories]))
        return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclasses.dataclass
class Trajectory:
    """One image being denoised: its conditions, sampler, noise generator, sample and progress.

    Trajectories of one decoder share UNet calls (`DiffusionDecoder.step`) whatever their step
    counts and guidance, so an image is the same whichever images it was denoised beside (up to
    floating-point rounding of the batched kernels).
    """

    cond: torch.Tensor  # (Q, C)
    uncond: torch.Tensor | None  # (Q, C); None: no guidance (scale 1)
    scale: float
    eta: float
    generator: torch.Generator | None
    scheduler: DDIMScheduler
    x: torch.Tensor  # (C, h, w): the current sample in model space
    index: int = 0  # steps taken

    @property
    def done(self) -> bool:
        return self.index >= len(self.scheduler.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.index]

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)


def _generators(
    k: int, generator: torch.Generator | None, seed: int | list[int] | None
) -> list[torch.Generator | None]:
    """One CPU generator per image (all the shared `generator`, or the global RNG, without seeds)."""
    if seed is None:
        return [generator] * k
    seeds = [seed] * k if isinstance(seed, int) else list(seed)
    if len(seeds) != k:
        raise ValueError(f"sample: {len(seeds)} seeds for {k} conditions; give one seed per condition")
    # Item i of a batch seeded with the same seed repeated gets seed + i, so the images differ.
    if isinstance(seed, int):
        seeds = [seed + i for i in range(k)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def _draw(generators: list[torch.Generator | None], shape: tuple[int, ...]) -> torch.Tensor:
    """(K, *shape) standard normal noise, row i from generators[i]."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(K, 3, H, W) in [0, 1] -> PIL RGB images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
