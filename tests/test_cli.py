"""The `dreamcore` command line: every stage verb maps flags onto its config the same way.

defaults (or the chosen preset/profile) <- --config FILE <- --set KEY=VALUE <- named flags.
Fast: nothing here starts Ray (config errors are reported before any stage work begins).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from dreamcore.cli import VERBS, build_parser, main
from dreamcore.config import ConfigError

STAGES = ("curate", "train", "serve")
# The arguments each stage needs besides configuration.
REQUIRED = {
    "curate": ["in.jsonl", "--output", "out"],
    "train": ["--data", "data", "--output", "run"],
    "serve": ["--checkpoint", "/ckpt"],
}


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(list(argv)).parse_args(list(argv))


def load(*argv: str):
    """The stage's config, exactly as its `main` computes it."""
    args = parse(*argv)
    return importlib.import_module(args._module).load(args)


def yaml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Layout


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


def test_each_stage_verb_lives_in_its_stage_package():
    for stage in STAGES:
        assert VERBS[stage][0] == f"pipelines.{stage}.cli"


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_config_and_set_and_no_preset(stage, capsys):
    args = parse(stage, *REQUIRED[stage], "--config", "c.yaml", "--set", "a=1", "--set", "b.c=2")
    assert args.config == "c.yaml" and args.overrides == ["a=1", "b.c=2"]
    with pytest.raises(SystemExit):
        parse(stage, "--help")
    help_text = capsys.readouterr().out
    assert "--config FILE" in help_text and "--set KEY=VALUE" in help_text
    assert "--preset" not in help_text


@pytest.mark.parametrize("stage", STAGES)
def test_preset_is_rejected(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(stage, *REQUIRED[stage], "--preset", "tiny")
    assert exit_.value.code == 2
    assert "unrecognized arguments: --preset" in capsys.readouterr().err


def test_an_unknown_flag_is_named_by_its_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *REQUIRED["train"], "--preset", "tiny"])
    assert exit_.value.code == 2
    assert "dreamcore train: error: unrecognized arguments: --preset tiny" in capsys.readouterr().err


def test_parsing_the_stages_imports_neither_ray_nor_torch():
    """`dreamcore train --help` and friends stay fast: the stage packages load Ray lazily."""
    code = (
        "import sys\n"
        "from dreamcore.cli import build_parser\n"
        "for verb in ('curate', 'train', 'serve', 'submit'):\n"
        "    build_parser([verb])\n"
        "heavy = [m for m in ('ray', 'torch', 'deepspeed', 'fastapi') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).parents[1])


# ----------------------------------------------------------------------------------------------
# train


def test_train_flags_reach_the_config():
    cfg = load("train", *REQUIRED["train"], "--model", "dreamllm-7b", "--stage", "SFT", "--workers", "3", "--gpu")
    assert cfg.model.llm.name_or_path == "lmsys/vicuna-7b-v1.1"  # the --model preset
    assert cfg.model.stage == "SFT" and cfg.scaling.workers == 3 and cfg.scaling.gpu is True
    assert cfg.precision == "bf16"
    default = load("train", *REQUIRED["train"])
    assert default.model.llm.name_or_path is None and default.scaling.workers == 1  # tiny, defaults
    assert default.scaling.gpu is False


def test_train_layers_yaml_then_set_then_flags(tmp_path):
    path = yaml_file(tmp_path, "optim:\n  lr: 0.1\nscaling:\n  workers: 7\nmodel:\n  stage: I-creation\n")
    cfg = load("train", *REQUIRED["train"], "--config", path, "--set", "optim.lr=0.2")
    assert cfg.optim.lr == 0.2  # --set wins over YAML
    assert cfg.scaling.workers == 7 and cfg.model.stage == "I-creation"  # YAML wins over defaults
    cfg = load("train", *REQUIRED["train"], "--config", path, "--set", "scaling.workers=5", "--workers", "2",
               "--set", "model.stage=II", "--stage", "SFT")
    assert cfg.scaling.workers == 2 and cfg.model.stage == "SFT"  # flags win over --set and YAML
    # The YAML's model fields apply on top of the --model preset.
    cfg = load("train", *REQUIRED["train"], "--model", "dreamllm-7b", "--config", path)
    assert cfg.model.llm.num_layers == 32 and cfg.model.stage == "I-creation"


def test_train_python_api_matches_the_flags():
    from pipelines.train.config import load_train_config

    api = load_train_config("tiny", None, ["scaling.workers=5"], stage="SFT", workers=2, gpu=True, data=["data"])
    cli = load("train", *REQUIRED["train"], "--set", "scaling.workers=5", "--stage", "SFT", "--workers", "2", "--gpu")
    assert api == cli


def test_train_data_is_repeatable_with_weights(tmp_path):
    from pipelines.train.config import MixtureEntry

    cfg = load("train", "--data", "s3://b/mmc4@0.6", "--data", "pairs@0.4", "--data", "more", "--output", "run")
    assert cfg.data.mixture == [MixtureEntry("s3://b/mmc4", 0.6), MixtureEntry("pairs", 0.4), MixtureEntry("more", 1.0)]
    # a mixture in the YAML needs no --data; --data, like every flag, replaces it
    path = yaml_file(tmp_path, "data:\n  mixture:\n    - {path: a, weight: 2}\n    - {path: b}\n")
    assert [e.path for e in load("train", "--config", path, "--output", "run").data.mixture] == ["a", "b"]
    assert [e.path for e in load("train", "--config", path, "--data", "c", "--output", "run").data.mixture] == ["c"]
    with pytest.raises(ConfigError, match="no training data"):
        load("train", "--output", "run")
    with pytest.raises(ConfigError, match="weights must be > 0"):
        load("train", "--data", "a@0", "--output", "run")


def test_train_bad_values_exit_2(tmp_path, capsys):
    for bad in (["--workers", "two"], ["--stage", "III"], ["--model", "gpt-9"]):
        with pytest.raises(SystemExit) as exit_:
            parse("train", *REQUIRED["train"], *bad)
        assert exit_.value.code == 2
        assert bad[0] in capsys.readouterr().err
    # Config errors: one line naming the key, before any Ray work.
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                 "--set", "scaling.workerz=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dreamcore train:") and "scaling.workerz" in err
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                 "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# curate


def test_curate_profile_and_model_reach_the_config():
    cfg = load("curate", *REQUIRED["curate"], "--profile", "embedded", "--model", "dreamllm-7b")
    assert cfg.crawl.allow_private_networks is True and cfg.filter.min_image_size == 8  # embedded
    assert cfg.model == "dreamllm-7b" and cfg.model_config().max_seq_len == 2048
    default = load("curate", *REQUIRED["curate"])
    assert default.crawl.allow_private_networks is False and default.model == "tiny"


def test_curate_layers_yaml_then_set_then_flags(tmp_path):
    path = yaml_file(tmp_path, "model: dreamllm-7b\ncrawl:\n  timeout_s: 3\n  threads: 4\n")
    cfg = load("curate", *REQUIRED["curate"], "--config", path, "--set", "crawl.timeout_s=5")
    assert cfg.crawl.timeout_s == 5.0 and cfg.crawl.threads == 4 and cfg.model == "dreamllm-7b"
    cfg = load("curate", *REQUIRED["curate"], "--config", path, "--set", "model=dreamllm-7b", "--model", "tiny")
    assert cfg.model == "tiny"  # the flag wins over --set and YAML
    # The profile is only the starting point: YAML and --set apply on top of it.
    cfg = load("curate", *REQUIRED["curate"], "--profile", "embedded", "--set", "crawl.allow_private_networks=false")
    assert cfg.crawl.allow_private_networks is False and cfg.filter.min_image_size == 8


def test_curate_bad_values_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("curate", *REQUIRED["curate"], "--profile", "tiny")
    assert exit_.value.code == 2 and "--profile" in capsys.readouterr().err
    assert main(["curate", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"),
                 "--set", "crawl.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "crawl.nope" in err


# ----------------------------------------------------------------------------------------------
# serve


def test_serve_flags_reach_the_config():
    cfg = load("serve", "--checkpoint", "/ckpt", "--host", "0.0.0.0", "--port", "8123")
    assert (cfg.checkpoint, cfg.host, cfg.port) == ("/ckpt", "0.0.0.0", 8123)
    default = load("serve", "--checkpoint", "/ckpt")
    assert (default.host, default.port) == ("127.0.0.1", 8000)


def test_serve_layers_yaml_then_set_then_flags(tmp_path):
    path = yaml_file(tmp_path, "port: 3\ncheckpoint: /from-yaml\ndecoder:\n  autoscaling:\n    max_replicas: 3\n")
    cfg = load("serve", "--config", path, "--set", "port=4")
    assert cfg.port == 4 and cfg.checkpoint == "/from-yaml" and cfg.decoder.autoscaling.max_replicas == 3
    cfg = load("serve", "--config", path, "--set", "port=4", "--port", "5", "--checkpoint", "/flag")
    assert cfg.port == 5 and cfg.checkpoint == "/flag"


def test_serve_python_api_matches_the_flags():
    from pipelines.serve.config import load_serve_config

    api = load_serve_config(None, ["port=4"], checkpoint="/ckpt", port=5, host=None)
    assert api == load("serve", "--set", "port=4", "--checkpoint", "/ckpt", "--port", "5")


def test_serve_without_checkpoint_or_with_bad_values_exits_2(capsys):
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint" in err
    with pytest.raises(ConfigError, match="no checkpoint"):
        load("serve")
    assert main(["serve", "--checkpoint", "/ckpt", "--set", "limits.nope=1"]) == 2
    assert "limits.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        parse("serve", "--checkpoint", "/ckpt", "--port", "http")
    assert exit_.value.code == 2 and "--port" in capsys.readouterr().err
