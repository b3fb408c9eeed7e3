"""DiffusionDecoder: losses per prediction type, CFG sampling, seeds, VAE path; SD-folder loading
(dreamcore.pretrained.load_decoder)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _model_helpers import debug_config, one_thread  # noqa: F401 (fixture)
from diffusers import DDPMScheduler

from dreamcore.config import ConfigError, tiny
from dreamcore.decoder import DiffusionDecoder, to_pil
from dreamcore.pretrained import load_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

DEBUG = debug_config()
Q, C = DEBUG.dream.num_queries, DEBUG.decoder.cross_attention_dim


def _decoder(**changes) -> DiffusionDecoder:
    torch.manual_seed(0)
    return DiffusionDecoder.from_config(debug_config(decoder=changes).decoder)


def _cond(k: int, seed: int) -> torch.Tensor:
    return torch.randn(k, Q, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_reaches_the_condition_through_a_frozen_unet(prediction_type: str):
    dec = _decoder(prediction_type=prediction_type)
    dec.requires_grad_(False)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    cond = _cond(3, 0).requires_grad_(True)
    loss = dec.loss(images, cond)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert cond.grad.abs().sum() > 0


def test_v_prediction_target_differs_from_epsilon():
    eps, v = _decoder(prediction_type="epsilon"), _decoder(prediction_type="v_prediction")
    v.load_state_dict(eps.state_dict())
    images, cond = torch.rand(2, 3, 16, 16) * 2 - 1, _cond(2, 0)
    torch.manual_seed(1)
    a = eps.loss(images, cond)
    torch.manual_seed(1)
    b = v.loss(images, cond)
    assert a.item() != pytest.approx(b.item())


def test_bad_prediction_type_is_a_config_error():
    with pytest.raises(ConfigError, match="prediction_type"):
        _decoder(prediction_type="sample")


def test_loss_checks_condition_count():
    with pytest.raises(ValueError, match="2 images but 3 conditions"):
        _decoder().loss(torch.zeros(2, 3, 16, 16), _cond(3, 0))


def test_cfg_sampling_uses_the_unconditional_branch_and_guidance():
    dec = _decoder().eval()
    cond, uncond, other_uncond = _cond(2, 0), _cond(1, 1)[0], _cond(1, 2)[0]
    g1 = dec.sample(cond, uncond, num_inference_steps=4, guidance_scale=1.0, seed=0)
    g3 = dec.sample(cond, uncond, num_inference_steps=4, guidance_scale=3.0, seed=0)
    g3_other = dec.sample(cond, other_uncond, num_inference_steps=4, guidance_scale=3.0, seed=0)
    g1_other = dec.sample(cond, other_uncond, num_inference_steps=4, guidance_scale=1.0, seed=0)
    assert g1.shape == (2, 3, 16, 16) and g1.min() >= 0 and g1.max() <= 1
    assert not torch.allclose(g1, g3)  # guidance changes the image
    assert not torch.allclose(g3, g3_other)  # the unconditional branch is used under guidance
    torch.testing.assert_close(g1, g1_other)  # ... and not at scale 1
    with pytest.raises(ValueError, match="needs `uncond`"):
        dec.sample(cond, None, num_inference_steps=2, guidance_scale=2.0)


def test_seeds_make_sampling_deterministic_and_batch_independent():
    dec = _decoder().eval()
    cond, uncond = _cond(3, 0), _cond(1, 1)[0]
    a = dec.sample(cond, uncond, num_inference_steps=3, seed=[5, 6, 7])
    b = dec.sample(cond, uncond, num_inference_steps=3, seed=[5, 6, 7])
    torch.testing.assert_close(a, b)
    alone = dec.sample(cond[1:2], uncond, num_inference_steps=3, seed=[6])
    torch.testing.assert_close(alone[0], a[1], atol=1e-5, rtol=1e-4)
    c = dec.sample(cond, uncond, num_inference_steps=3, seed=[8, 9, 10])
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="one seed per condition"):
        dec.sample(cond, uncond, num_inference_steps=2, seed=[1, 2])
    pil = to_pil(a)
    assert len(pil) == 3 and pil[0].size == (16, 16) and pil[0].mode == "RGB"


def test_vae_decoder_works_in_latent_space():
    dec = _decoder(use_vae=True)
    assert dec.latent_size == 8 and dec.unet.config.in_channels == 4
    assert not any(p.requires_grad for p in dec.vae.parameters())
    loss = dec.loss(torch.rand(2, 3, 16, 16) * 2 - 1, _cond(2, 0))
    assert torch.isfinite(loss)
    out = dec.eval().sample(_cond(2, 0), _cond(1, 1)[0], num_inference_steps=2, seed=0)
    assert out.shape == (2, 3, 16, 16)


def test_loads_a_stable_diffusion_style_folder(tmp_path):
    """unet/, vae/, scheduler/ saved by diffusers come back through load_decoder."""
    src = _decoder(use_vae=True, prediction_type="v_prediction")
    src.unet.save_pretrained(tmp_path / "unet")
    src.vae.save_pretrained(tmp_path / "vae")
    DDPMScheduler.from_config(src.sample_scheduler_config).save_pretrained(tmp_path / "scheduler")
    cfg = debug_config(decoder={"use_vae": True, "name_or_path": str(tmp_path)}).decoder
    loaded = load_decoder(cfg).eval()
    assert loaded.prediction_type == "v_prediction"  # the folder's scheduler wins over the config
    cond, uncond = _cond(1, 0), _cond(1, 1)[0]
    torch.testing.assert_close(src.eval().sample(cond, uncond, 2, seed=3), loaded.sample(cond, uncond, 2, seed=3))


def test_missing_or_mismatched_sd_folder_is_a_clear_error(tmp_path):
    cfg = debug_config(decoder={"name_or_path": str(tmp_path / "nowhere")}).decoder
    with pytest.raises(ConfigError, match="nowhere.*unet/, scheduler/"):
        load_decoder(cfg)
    src = _decoder()
    src.unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler.from_config(src.sample_scheduler_config).save_pretrained(tmp_path / "scheduler")
    wrong = debug_config(decoder={"name_or_path": str(tmp_path), "cross_attention_dim": C // 2}).decoder
    with pytest.raises(ConfigError, match=f"set decoder.cross_attention_dim={C}"):
        load_decoder(wrong)


def test_stochastic_sampling_is_seeded_per_image():
    """eta > 0 draws fresh noise at every step, from each image's own generator: the same seed gives
    the same image in any batch, and the result differs from deterministic DDIM."""
    dec = _decoder().eval()
    cond, uncond = _cond(3, 0), _cond(1, 1)[0]
    a = dec.sample(cond, uncond, num_inference_steps=4, seed=[5, 6, 7], eta=1.0)
    torch.testing.assert_close(a, dec.sample(cond, uncond, num_inference_steps=4, seed=[5, 6, 7], eta=1.0))
    alone = dec.sample(cond[2:], uncond, num_inference_steps=4, seed=[7], eta=1.0)
    torch.testing.assert_close(alone[0], a[2], atol=1e-5, rtol=1e-4)
    ddim = dec.sample(cond, uncond, num_inference_steps=4, seed=[5, 6, 7], eta=0.0)
    assert not torch.allclose(a, ddim)
    dec.cfg = dataclasses.replace(dec.cfg, eta=1.0)  # the config's eta is the default
    torch.testing.assert_close(a, dec.sample(cond, uncond, num_inference_steps=4, seed=[5, 6, 7]))
    with pytest.raises(ValueError, match="eta=1.5 is outside"):
        dec.sample(cond, uncond, num_inference_steps=2, seed=0, eta=1.5)
    with pytest.raises(ConfigError, match="decoder.eta=-0.5"):
        _decoder(eta=-0.5)


def test_tiny_preset_samples_stochastically_with_mild_guidance():
    """tiny() samples with eta 1 at guidance 2 (docs/architecture.md says why); the demo and
    bench/quality.py score with these settings, as serving samples with them."""
    cfg = tiny().decoder
    assert cfg.eta == 1.0 and cfg.guidance_scale == 2.0


def test_coordinate_planes_tell_the_unet_where_each_pixel_is(tmp_path):
    """decoder.coord_channels: the UNet takes 2 more inputs than it predicts, the (x, y) planes are
    added inside `denoise` (training and sampling alike), and a saved UNet brings them back."""
    dec = _decoder(coord_channels=True, only_cross_attention=True)
    assert (dec.unet.config.in_channels, dec.unet.config.out_channels, dec.coord_channels) == (5, 3, 2)
    assert torch.isfinite(dec.loss(torch.rand(2, 3, 16, 16) * 2 - 1, _cond(2, 0)))
    x, t, cond = torch.randn(1, 3, 16, 16), torch.tensor([500]), _cond(1, 0)
    with torch.no_grad():  # the same pixels shifted: a plain UNet sees a shifted copy, this one does not
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        by_hand = dec.unet(torch.cat([x, xs[None, None], ys[None, None]], 1), t, encoder_hidden_states=cond).sample
        torch.testing.assert_close(dec.denoise(x, t, cond), by_hand)
        swapped = dec.unet(torch.cat([x, ys[None, None], xs[None, None]], 1), t, encoder_hidden_states=cond).sample
        assert not torch.allclose(by_hand, swapped)
    out = dec.eval().sample(_cond(2, 0), _cond(1, 1)[0], num_inference_steps=2, seed=0)
    assert out.shape == (2, 3, 16, 16)  # noise and images have the image's channels, not the UNet's inputs
    dec.unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler.from_config(dec.sample_scheduler_config).save_pretrained(tmp_path / "scheduler")
    loaded = load_decoder(debug_config(decoder={"name_or_path": str(tmp_path)}).decoder).eval()
    assert loaded.coord_channels == 2
    torch.testing.assert_close(loaded.sample(_cond(2, 0), _cond(1, 1)[0], 2, seed=0), out)


def test_a_unet_with_unmatched_channels_is_refused():
    unet = _decoder(coord_channels=True).unet
    unet.register_to_config(in_channels=4)
    with pytest.raises(ConfigError, match="2 more inputs"):
        DiffusionDecoder(debug_config().decoder, unet, None, _decoder().sample_scheduler_config)
