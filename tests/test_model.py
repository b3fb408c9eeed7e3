"""DreamLLM forward: both losses, their gradients, zero vm_loss, freezing per stage, slot checks."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import (  # noqa: F401 (fixture)
    INTERLEAVED,
    TEXT_ONLY,
    debug_config,
    debug_model,
    debug_tokenizer,
    make_batch,
    one_thread,
)

from dreamcore.config import ConfigError
from dreamcore.model import DreamLLM, PlaceholderMismatchError, apply_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def _grad_norm(params) -> float:
    return float(sum(p.grad.abs().sum() for p in params if p.grad is not None))


def test_forward_gives_both_losses_and_every_trainable_part_gets_gradient():
    model, tok = debug_model()
    batch = make_batch(model.cfg, tok, INTERLEAVED)
    out = model(batch)
    assert set(out) == {"loss", "lm_loss", "vm_loss"}
    assert out["lm_loss"] > 0 and out["vm_loss"] > 0
    expected = model.cfg.loss.lm_weight * out["lm_loss"] + model.cfg.loss.vm_weight * out["vm_loss"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    for name, params in model.named_groups().items():
        assert _grad_norm(params) > 0, f"{name} got no gradient"
    # Every trainable tensor is reached (DDP / DeepSpeed ZeRO wait for each one's gradient).
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_vm_loss_gradients_reach_the_llm_through_a_frozen_unet():
    cfg = debug_config(decoder={"freeze": True}, loss={"lm_weight": 0.0, "vm_weight": 1.0})
    model, tok = debug_model(cfg)
    assert not any(p.requires_grad for p in model.decoder.parameters())
    model(make_batch(cfg, tok, INTERLEAVED))["loss"].backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert model.dream_queries.grad.abs().sum() > 0
    assert model.cond_proj.weight.grad.abs().sum() > 0
    # Only the diffusion loss is weighted, so these gradients came through the UNet into the LLM.
    assert _grad_norm(model.llm.model.layers[0].parameters()) > 0
    assert _grad_norm(model.llm.lm_head.parameters()) == 0


def test_batch_without_dream_blocks_has_an_exact_zero_vm_loss_that_still_reaches_parameters():
    model, tok = debug_model()
    out = model(make_batch(model.cfg, tok, TEXT_ONLY))
    assert out["vm_loss"].item() == 0.0
    assert out["lm_loss"] > 0
    out["loss"].backward()
    # Creation and vision parameters are in the graph (DDP/DeepSpeed see them) with zero gradient.
    for p in (model.dream_queries, model.cond_proj.weight, model.vision_proj.weight,
              *model.decoder.unet.parameters()):
        assert p.grad is not None and p.grad.abs().sum() == 0
    assert _grad_norm(model.llm.parameters()) > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("docs", [TEXT_ONLY, INTERLEAVED], ids=["text-only", "interleaved"])
def test_same_modules_on_every_rank_runs_every_part_and_changes_nothing(docs):
    """ZeRO-3 mode: whatever the batch holds, the vision tower, the LLM (twice: the batch, and the
    empty prompt of the condition drop), the condition projector and the UNet each run, so every
    rank gathers the same partitions; losses, gradients and the random stream equal the plain mode's."""
    results = []
    for uniform in (False, True):
        model, tok = debug_model(debug_config(decoder={"condition_drop_prob": 0.1}))
        model.same_modules_on_every_rank = uniform
        calls: dict[str, int] = {}
        for name in ("vision", "llm.model", "cond_proj", "decoder.unet"):
            model.get_submodule(name).register_forward_hook(
                lambda *_, name=name, calls=calls: calls.__setitem__(name, calls.get(name, 0) + 1))
        torch.manual_seed(3)
        out = model(make_batch(model.cfg, tok, docs))
        out["loss"].backward()
        after = torch.rand(4)  # the random stream after the step
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, calls, after, grads))
    (plain, plain_calls, plain_rng, plain_grads), (uniform, calls, rng, grads) = results
    assert calls == {"vision": 1, "llm.model": 2, "cond_proj": 2, "decoder.unet": 1}, calls
    for key in ("loss", "lm_loss", "vm_loss"):
        torch.testing.assert_close(uniform[key], plain[key], rtol=0, atol=0)
    assert torch.equal(rng, plain_rng)
    assert grads.keys() == plain_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, plain_grads[n], rtol=1e-6, atol=1e-7, msg=n)


def test_condition_drop_replaces_conditions_by_the_empty_prompt():
    cfg = debug_config(decoder={"condition_drop_prob": 1.0})
    model, tok = debug_model(cfg)
    a = make_batch(cfg, tok, [["a red circle", 0]])
    b = make_batch(cfg, tok, [["two yellow squares next to a blue circle", 0]])
    b["images"] = a["images"]

    def vm(batch, train: bool) -> float:
        model.train(train)
        torch.manual_seed(0)  # same noise and timesteps in both runs
        return model(batch)["vm_loss"].item()

    # Every condition dropped: the caption no longer matters; in eval nothing is dropped and it does.
    assert vm(a, True) == pytest.approx(vm(b, True), abs=1e-6)
    assert vm(a, False) != pytest.approx(vm(b, False), abs=1e-6)


STAGE_EXPECTATIONS = {
    # stage: (llm, vision_proj, dream_queries + cond_proj)
    "I-creation": (False, False, True),
    "I-comprehension": (False, True, False),
    "II": (True, True, True),
    "SFT": (True, True, True),
}


@pytest.mark.parametrize("stage", list(STAGE_EXPECTATIONS))
@pytest.mark.parametrize("frozen", [True, False])
def test_apply_stage_sets_what_trains(stage: str, frozen: bool):
    cfg = debug_config(decoder={"freeze": frozen, "use_vae": True}, vision={"freeze": frozen})
    model, _ = debug_model(cfg)
    apply_stage(model, stage)
    llm, vproj, creation = STAGE_EXPECTATIONS[stage]
    assert all(p.requires_grad == llm for p in model.llm.parameters())
    assert all(p.requires_grad == vproj for p in model.vision_proj.parameters())
    assert model.dream_queries.requires_grad == creation
    assert model.cond_proj.weight.requires_grad == creation
    assert not any(p.requires_grad for p in model.decoder.vae.parameters())  # the VAE never trains
    unet_trains = any(p.requires_grad for p in model.decoder.unet.parameters())
    assert unet_trains == (creation and not frozen)
    vision_trains = any(p.requires_grad for p in model.vision.parameters())
    assert vision_trains == (vproj and not frozen)
    # Layers past select_layer and CLIP's post-layernorm never get a gradient: they never train.
    assert not any(p.requires_grad for p in model.vision.post_layernorm.parameters())
    assert not any(p.requires_grad for p in model.vision.encoder.layers[-1].parameters())
    summary = model.parameter_summary()
    assert summary["all"]["trainable"] == sum(p.numel() for p in model.trainable_parameters())
    assert summary["llm"]["trainable"] == (summary["llm"]["total"] if llm else 0)


def test_apply_stage_rejects_unknown_stage():
    model, _ = debug_model()
    with pytest.raises(ConfigError, match="choose one of"):
        apply_stage(model, "III")


def test_frozen_stage_trains_only_its_parameters():
    cfg = debug_config(stage="I-creation")
    model, tok = debug_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model(make_batch(cfg, tok, INTERLEAVED))["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert "dream_queries" in changed and "cond_proj.weight" in changed
    assert not any(n.startswith(("llm.", "vision_proj.", "vision.")) for n in changed)


def test_placeholder_mismatch_fails_loudly_with_counts():
    model, tok = debug_model()
    batch = make_batch(model.cfg, tok, INTERLEAVED)
    broken = dict(batch, image_slots=batch["image_slots"].clone())
    broken["image_slots"][0, 1] = -1  # one comprehension block fewer than the sequence holds
    with pytest.raises(PlaceholderMismatchError, match=r"sample 0: input_ids hold 48 <im_patch>.*= 32"):
        model(broken)
    shifted = dict(batch, dream_slots=batch["dream_slots"].clone())
    shifted["dream_slots"][1, 0] += 3  # right count, wrong place
    with pytest.raises(PlaceholderMismatchError, match="sample 1: 3 <im_patch> placeholders lie outside"):
        model(shifted)
    with pytest.raises(PlaceholderMismatchError, match="uint8"):
        model(dict(batch, images=batch["images"].float()))


def test_tokenizer_with_other_slot_counts_is_caught():
    cfg = debug_config()
    model, _ = debug_model(cfg)
    other = debug_config(dream={"num_queries": 4})
    tok4 = debug_tokenizer(other)
    with pytest.raises(PlaceholderMismatchError, match="num_dream_queries"):
        model(make_batch(other, tok4, INTERLEAVED))


def test_decoder_only_model_refuses_training_forward():
    cfg = debug_config()
    tok = debug_tokenizer(cfg)
    model = DreamLLM(cfg, tok, components=("decoder",))
    assert model.llm is None and model.decoder is not None
    with pytest.raises(RuntimeError, match="built without llm"):
        model(make_batch(cfg, tok, TEXT_ONLY))


def test_lm_loss_equals_the_bare_llm_loss_on_text():
    model, tok = debug_model()
    batch = make_batch(model.cfg, tok, TEXT_ONLY)
    with torch.no_grad():
        ours = model(batch)["lm_loss"]
        ref = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
    torch.testing.assert_close(ours, ref)


def test_slot_contents_replace_placeholder_embeddings():
    """Changing an image changes the LM loss of the text after it (its patches are read)."""
    model, tok = debug_model()
    batch = make_batch(model.cfg, tok, INTERLEAVED)
    other = dict(batch, images=255 - batch["images"])
    with torch.no_grad():
        assert model(batch)["lm_loss"] != model(other)["lm_loss"]


def test_vm_max_images_trains_the_decoder_on_a_uniform_subset_with_its_own_conditions():
    """loss.vm_max_images: the diffusion loss sees at most that many dream images per micro-batch,
    each with the condition of its own dream block; evaluation sees all of them."""
    cfg = debug_config(loss={"vm_max_images": 1}, decoder={"condition_drop_prob": 0.0})
    model, tok = debug_model(cfg)
    batch = make_batch(cfg, tok, INTERLEAVED)
    seen = []
    real = model.decoder.loss
    model.decoder.loss = lambda images, cond: seen.append((images, cond)) or real(images, cond)
    model.eval()
    with torch.no_grad():
        model(batch)
    all_images, all_cond = seen.pop()
    assert all_images.shape[0] >= 2  # the test needs a choice
    model.train()
    picked = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = model(batch)
        images, cond = seen.pop()
        assert images.shape[0] == 1
        # The image and the condition of its own dream block (two blocks may share a picture).
        match = [i for i in range(all_images.shape[0]) if torch.equal(all_images[i], images[0])
                 and torch.allclose(all_cond[i], cond[0], atol=1e-5)]
        assert len(match) == 1
        picked.add(match[0])
    assert len(picked) >= 2  # drawn at random, not always the first
    out["loss"].backward()
    assert model.dream_queries.grad.abs().sum() > 0


def test_a_negative_vm_max_images_is_a_config_error():
    with pytest.raises(ConfigError, match="loss.vm_max_images=-1"):
        debug_config(loss={"vm_max_images": -1})
