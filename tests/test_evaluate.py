"""`dreamcore evaluate`: CLIP score and FID of a checkpoint's images, with models given by path.

The tests build what a user would point at: a tiny CLIPModel folder (save_pretrained) and a tiny
TorchScript feature network with StyleGAN3's Inception calling convention.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _curate_helpers import save_tiny_clip  # noqa: E402
from _serve_helpers import make_checkpoint  # noqa: E402

from dreamcore.cli import main as dreamcore  # noqa: E402
from pipelines.evaluate import EvaluationError, frechet_distance, inception_features, load_inception  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small yellow circle on the left"]


class TinyInception(torch.nn.Module):
    """uint8 NCHW images -> (N, 8) features, with `return_features` as StyleGAN3's network takes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        y = torch.relu(self.conv(x.float() / 255.0))
        return y.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    torch.manual_seed(0)
    inception = root / "inception.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(inception))
    reference = root / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"checkpoint": make_checkpoint(root / "model"), "clip": save_tiny_clip(root / "clip"),
            "inception": inception, "reference": reference, "prompts": prompts}


def test_evaluate_scores_clip_and_fid_with_the_models_given(models, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = dreamcore(["evaluate", "--checkpoint", str(models["checkpoint"]), "--prompts", str(models["prompts"]),
                    "--output", str(out), "--clip", str(models["clip"]), "--fid-reference", str(models["reference"]),
                    "--inception", str(models["inception"]), "--steps", "2", "--batch-size", "3"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "evaluation.json").read_text())
    assert report["images"] == len(PROMPTS) == len(list((out / "images").glob("*.png")))
    clip = report["clip_score"]
    assert len(clip["per_image"]) == len(PROMPTS) and all(0 <= s <= 100 for s in clip["per_image"])
    assert clip["ci95"][0] <= clip["mean"] <= clip["ci95"][1]
    assert report["fid"]["value"] > 0 and report["fid"]["reference_images"] == 6
    assert "CLIP score" in capsys.readouterr().out


def test_unconfigured_metrics_say_what_enables_them(models, tmp_path):
    out = tmp_path / "eval"
    assert dreamcore(["evaluate", "--checkpoint", str(models["checkpoint"]), "--prompts", str(models["prompts"]),
                      "--output", str(out), "--steps", "1"]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert "--clip PATH" in report["clip_score"]["message"]
    assert "--fid-reference FOLDER and --inception PATH" in report["fid"]["message"]


def test_bad_inputs_are_one_clear_line(models, tmp_path, capsys):
    base = ["evaluate", "--checkpoint", str(models["checkpoint"]), "--prompts", str(models["prompts"]),
            "--output", str(tmp_path / "o")]
    assert dreamcore([*base, "--inception", str(models["inception"])]) == 2
    assert "needs both --fid-reference" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    assert dreamcore([*base, "--inception", str(bad), "--fid-reference", str(models["reference"])]) == 2
    assert "not a TorchScript model" in capsys.readouterr().err
    assert dreamcore([*base[:3], "--prompts", str(tmp_path / "none.txt"), "--output", "o"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert dreamcore([*base, "--clip", str(tmp_path)]) == 2
    assert "--clip=" in capsys.readouterr().err
    assert dreamcore([*base, "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
    broken = tmp_path / "ref"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    assert dreamcore([*base, "--fid-reference", str(broken), "--inception", str(models["inception"])]) == 2
    assert "a.png is not a readable image" in capsys.readouterr().err


def test_frechet_distance_is_zero_for_one_distribution_and_grows_with_a_shift(models):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=1e-6)  # |mu shift|^2 = 4 x 1^2
    with pytest.raises(EvaluationError, match="at least 2 images"):
        frechet_distance(a[:1], a)
    red = [Image.new("RGB", (30, 30), (255, 0, 0))] * 3
    net = load_inception(str(models["inception"]))
    feats = inception_features(net, red, size=64)
    assert feats.shape == (3, 8) and np.allclose(feats[0], feats[2])
    exported = models["inception"].with_suffix(".pt2")  # the same network through torch.export
    eager = TinyInception()
    eager.load_state_dict(net.state_dict())
    program = torch.export.export(eager, (torch.zeros(2, 3, 64, 64, dtype=torch.uint8),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(exported))
    assert np.allclose(inception_features(load_inception(str(exported)), red, size=64), feats, atol=1e-6)
