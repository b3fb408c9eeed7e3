"""Fast unit tests of the training job's pieces: config, DeepSpeed JSON, metrics, data checks, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import make_data_folder, small_model_config  # noqa: E402

from dreamcore.config import ConfigError  # noqa: E402
from pipelines.train.config import TrainConfig, load_train_config  # noqa: E402
from pipelines.train.data import check_data_folder  # noqa: E402
from pipelines.train.deepspeed_config import deepspeed_config  # noqa: E402
from pipelines.train.metrics import (  # noqa: E402
    MetricsWriter,
    mfu,
    peak_flops,
    progress_line,
    read_metrics,
    train_flops_per_token,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_folder(tmp_path_factory.mktemp("train-data"), small_model_config(), num_docs=8)


def test_recipe_fields_are_settable_through_overrides(tmp_path):
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text("optim:\n  lr: 0.003\nmicro_batch_size: 16\n")
    cfg = load_train_config(
        "tiny", yaml_file, ["max_steps=123", "grad_accum=2", "model.loss.vm_weight=5", "optim.lr=0.002"],
        stage="I-creation", workers=2,
    )
    assert cfg.optim.lr == 0.002  # --set wins over the YAML file
    assert cfg.micro_batch_size == 16 and cfg.max_steps == 123 and cfg.grad_accum == 2
    assert cfg.model.loss.vm_weight == 5.0 and cfg.model.stage == "I-creation"
    assert cfg.scaling.workers == 2


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_train_config("tiny", None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_train_config("tiny", None, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="bf16 needs GPUs"):
        load_train_config("tiny", None, ["deepspeed.precision=bf16"])
    for bad in ("{GPU: 1}", "{trainer: -1}"):
        with pytest.raises(ConfigError, match="scaling.resources_per_worker takes custom resources"):
            load_train_config("tiny", None, [f"scaling.resources_per_worker={bad}"])
    assert load_train_config("tiny", None, ["scaling.resources_per_worker={trainer: 1}"]).scaling.resources_per_worker \
        == {"trainer": 1}


def test_deepspeed_json_follows_the_dataclass():
    cfg = load_train_config("tiny", None, ["micro_batch_size=4", "grad_accum=3", "optim.lr=0.01",
                                           "max_steps=500", "optim.warmup_steps=20", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 0.01
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in ds  # the job passes its own (pipelines/train/schedule.py)
    assert ds["zero_optimization"]["stage"] == 2  # ZeRO-2 default
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    gpu = load_train_config("tiny", None, ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true"], gpu=True)
    ds_gpu = deepspeed_config(gpu, world_size=8)
    assert ds_gpu["bf16"]["enabled"] is True and ds_gpu["fp16"]["enabled"] is False
    assert ds_gpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds_gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    json.dumps(ds_gpu)  # plain JSON, as written to the run folder


def test_mfu_formula():
    # 1B params, 16 layers, hidden 2048, 2048 tokens: 6N + 12 L H T.
    per_token = train_flops_per_token(10**9, 16, 2048, 2048)
    assert per_token == pytest.approx(6e9 + 12 * 16 * 2048 * 2048)
    peak = peak_flops("NVIDIA H100 80GB HBM3")
    assert peak == pytest.approx(989.4e12)
    assert mfu(50_000, per_token, 1, peak) == pytest.approx(50_000 * per_token / 989.4e12)
    assert mfu(50_000, per_token, 2, peak) == pytest.approx(mfu(50_000, per_token, 1, peak) / 2)
    assert peak_flops("cpu") is None and mfu(1.0, 1.0, 1, None) is None
    assert peak_flops("anything", override_tflops=100) == 1e14


def test_progress_line_and_metrics_files(tmp_path):
    row = {"step": 10, "epoch": 0, "loss": 1.5, "lm_loss": 0.5, "vm_loss": 0.1, "lr": 1e-3, "grad_norm": 1.0,
           "tokens_per_s": 1234.0, "images_per_s": 12.5, "samples_per_s": 8.0, "step_time_s": 0.2,
           "mfu": 0.41, "elapsed_s": 2.0}
    line = progress_line(row, max_steps=100, eta_s=90)
    for part in ("step 10/100", "lm 0.5000", "vm 0.1000", "1234 tok/s", "12.5 img/s", "MFU 41.0%", "ETA 1m30s"):
        assert part in line
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(row)
    writer.write(row | {"step": 11, "loss": 1.4})
    writer.write(row | {"step": 11, "loss": 1.3})  # a resumed run rewrites step 11: the last one wins
    writer.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [10, 11] and rows[1]["loss"] == 1.3
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4  # header + 3 rows


def test_data_folder_checks(data_dir, tmp_path):
    cfg = small_model_config()
    assert len(check_data_folder(data_dir, cfg)) == 1
    with pytest.raises(ConfigError, match="no such folder"):
        check_data_folder(tmp_path / "missing", cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .parquet shards"):
        check_data_folder(tmp_path / "empty", cfg)
    cfg.max_seq_len = 128
    with pytest.raises(ConfigError, match="model.max_seq_len=64"):
        check_data_folder(data_dir, cfg)


def test_a_folder_that_is_not_curated_data_is_one_clear_error(tmp_path):
    """A shard without the sample columns and a manifest.json that is not a JSON object are named
    with their fix (ConfigError, which the CLI prints as one line), never a KeyError/JSONDecodeError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = small_model_config()
    odd = tmp_path / "odd"
    (odd / "tokenizer").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), odd / "a.parquet")
    with pytest.raises(ConfigError, match="missing columns"):
        check_data_folder(odd, cfg)
    for text in ("{not json", "null", "[]"):
        (odd / "manifest.json").write_text(text)
        with pytest.raises(ConfigError, match="manifest.json is not a JSON object"):
            check_data_folder(odd, cfg)


def test_hand_made_folders_list_shards_in_path_order(tmp_path):
    """Without a manifest, shards sort as paths do (component by component): the order a
    checkpoint's data position was taken in, whatever '-' and '/' sort as in strings."""
    from pipelines.train.data import parquet_files

    for rel in ("a/x.parquet", "a-b.parquet", "b.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [Path(f).relative_to(tmp_path).as_posix() for f in parquet_files(tmp_path)] == [
        "a/x.parquet", "a-b.parquet", "b.parquet"]


def test_frozen_modules_cast_to_bf16_and_kept_out_of_optimizer():
    from dreamcore.model import DreamLLM
    from dreamcore.tokenizer import DreamTokenizer
    from pipelines.train.loop import cast_frozen, trainable_parameters

    cfg = small_model_config()
    cfg.vision.freeze = True
    cfg.decoder.freeze = True
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries, ["a red circle"] * 4)
    model = DreamLLM(cfg, tok)
    cast = cast_frozen(model, torch.bfloat16)
    assert set(cast) == {"vision", "decoder"}
    assert all(p.dtype == torch.bfloat16 for p in model.vision.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.decoder.parameters())
    assert all(p.dtype == torch.float32 for p in model.llm.parameters())
    trainable = {id(p) for p in trainable_parameters(model)}
    assert not trainable & {id(p) for p in model.vision.parameters()}
    assert not trainable & {id(p) for p in model.decoder.parameters()}
    assert id(model.dream_queries) in trainable


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from dreamcore.cli import main

    assert main(["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                 "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_a_ramped_multiplier_moves_between_its_fractions_of_the_run():
    from dreamcore.config import load_config
    from pipelines.train.schedule import group_lr, lr_factor, lr_mult

    cfg = load_config(TrainConfig(), None, ["optim.lr=0.01", "optim.warmup_steps=10", "optim.lr_mults.llm=0.25",
                                            "optim.lr_mult_ramps.llm=[0.75, 0.25, 0.75]"]).validate()
    o = cfg.optim
    assert [round(lr_mult("llm", s, o, 100), 4) for s in (0, 25, 50, 75, 99)] == [0.25, 0.25, 0.5, 0.75, 0.75]
    assert lr_mult("decoder", 50, o, 100) == 1.0
    assert lr_factor(0, o, 100) == pytest.approx(0.1) and lr_factor(9, o, 100) == pytest.approx(1.0)
    assert lr_factor(99, o, 100) == pytest.approx(o.min_lr_ratio, abs=1e-3)
    assert group_lr({"name": "llm"}, 50, o, 100) == pytest.approx(0.01 * lr_factor(50, o, 100) * 0.5)


def test_defaults_are_valid():
    assert TrainConfig().validate().precision == "fp32"


def test_lr_mults_give_components_their_own_learning_rate_through_the_schedule():
    """optim.lr_mults: each named component trains at lr x mult, through the job's warmup + cosine
    (the LambdaLR loop.py hands DeepSpeed), every trainable parameter in exactly one group."""
    from torch.optim.lr_scheduler import LambdaLR

    from dreamcore.config import load_config
    from dreamcore.model import DreamLLM
    from dreamcore.tokenizer import DreamTokenizer
    from pipelines.train.loop import optimizer_groups, trainable_parameters
    from pipelines.train.schedule import lr_factor, lr_lambdas

    cfg = load_config(TrainConfig(), None, ["optim.lr=0.01", "optim.lr_mults.llm=0.25"])
    cfg = load_config(cfg, None, ["optim.lr_mults.dream_queries=4"]).validate()  # keys merge
    assert cfg.optim.lr_mults == {"llm": 0.25, "dream_queries": 4}
    mcfg = small_model_config()
    mcfg.decoder.freeze = True
    tok = DreamTokenizer.build(mcfg.tokenizer, mcfg.vision.num_tokens, mcfg.dream.num_queries, ["a red circle"] * 4)
    model = DreamLLM(mcfg, tok)
    groups = optimizer_groups(model, cfg.optim)
    assert [g["name"] for g in groups] == ["base", "llm", "dream_queries"]  # the logged lr is group 0's: lr
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in trainable_parameters(model)) and len(ids) == len(set(ids))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.llm.parameters()}
    assert not {id(p) for p in model.decoder.parameters()} & set(ids)  # frozen: in no group
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    sched = LambdaLR(opt, lr_lambdas(opt.param_groups, cfg.optim, 20))
    for step in range(9):
        base, llm, queries = (g["lr"] for g in opt.param_groups)
        assert base == pytest.approx(0.01 * lr_factor(step, cfg.optim, 20))  # step 0 at lr / warmup_steps
        assert llm == pytest.approx(0.25 * base) and queries == pytest.approx(4 * base)
        opt.step()
        sched.step()
    for bad, message in ((["optim.lr_mults.lm=2"], "unknown component"), (["optim.lr_mults.llm=0"], "> 0"),
                         (["optim.lr_mult_ramps.llm=[0.5, 0.6, 0.4]"], "start < end"),
                         (["optim.lr_mult_ramps.vm=[0.5, 0.1, 0.4]"], "unknown component")):
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig(), None, bad).validate()


def test_checkpoints_hold_every_rng_state():
    """torch CPU, numpy and Python streams continue exactly where the saved state left them (CUDA too
    when present); a state saved by an older checkpoint (torch only) still restores."""
    import random

    import numpy as np

    from pipelines.train.loop import rng_states, set_rng_states

    saved = rng_states()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    set_rng_states({"torch": saved["torch"]})
    assert torch.equal(torch.rand(3), first[0])


def test_each_preset_and_stage_starts_from_its_recipe():
    """dreamllm-7b takes DreamLLM's published settings per stage (pipelines/train/recipes.py); tiny
    keeps its own; a user's setting wins over the recipe; the stage may come from --set too."""
    ii = load_train_config("dreamllm-7b", stage="II")
    assert (ii.optim.lr, ii.max_steps, ii.optim.warmup_steps, ii.optim.min_lr_ratio) == (2e-5, 4000, 12, 0.0)
    assert (ii.optim.beta2, ii.optim.weight_decay, ii.micro_batch_size, ii.model.stage) == (0.999, 0.0, 8, "II")
    assert load_train_config("dreamllm-7b", stage="I").optim.lr == 2e-3
    assert load_train_config("dreamllm-7b", stage="I-creation").max_steps == 30_000
    sft = load_train_config("dreamllm-7b", None, ["model.stage=SFT"])
    assert (sft.optim.lr, sft.max_steps, sft.model.stage) == (4e-5, 120, "SFT")
    mine = load_train_config("dreamllm-7b", None, ["optim.lr=1e-5", "max_steps=50"], stage="II")
    assert (mine.optim.lr, mine.max_steps, mine.optim.warmup_steps) == (1e-5, 50, 12)
    debug = load_train_config("dreamllm-debug", stage="SFT")
    assert (debug.optim.lr, debug.max_steps, debug.micro_batch_size) == (4e-5, 8, 2)
    tiny = load_train_config("tiny", stage="SFT")
    assert (tiny.optim.lr, tiny.max_steps, tiny.optim.warmup_steps) == (TrainConfig().optim.lr, 200, 50)
    assert tiny.model.stage == "SFT"


def test_the_rayjob_trains_the_7b_recipe_at_the_papers_global_batch():
    """The RayJob manifest's command line gives stage II's recipe, and with its workers and
    grad_accum the global batch DreamLLM trained with (1024)."""
    import argparse

    import yaml

    from pipelines.train import cli

    spec = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "kuberay" / "rayjob-train.yaml").read_text())
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg = cli.load(parser.parse_args(spec["spec"]["entrypoint"].split()[4:]))
    assert (cfg.optim.lr, cfg.max_steps, cfg.model.stage) == (2e-5, 4000, "II")
    assert cfg.global_batch_size(cfg.scaling.workers) == 1024
