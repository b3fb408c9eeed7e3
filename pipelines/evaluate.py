"""`dreamcore evaluate --checkpoint DIR --prompts FILE --output OUT [--clip PATH] [--fid-reference FOLDER
--inception PATH]`: text-to-image quality of any checkpoint, with models the user points at.

- CLIP score (Hessel et al. 2021, as torchmetrics computes it: 100 x max(cos, 0)) between each
  prompt and the image the checkpoint draws for it, with a `transformers` CLIPModel folder or hub
  id (`--clip`, e.g. openai/clip-vit-large-patch14), scored by curation's own `ClipScorer`.
- FID (Heusel et al. 2017) between the generated images and a reference folder of images, on the
  2048-d pool features of an Inception network given by path (`--inception`): a TorchScript file
  that maps uint8 NCHW images to features, as StyleGAN3's / clean-fid's `inception-2015-12-05.pt`
  does. FID on a few hundred images is biased upward; compare runs at the same count.

The checkpoint runs on the GPU in bf16 when one is visible, else on the CPU in its own precision.
Images are drawn by the one generation engine (`dreamcore.generate.text_to_images`), caption i with
seed `--seed` + i, and saved under OUT/images/. A metric whose model is not configured is reported
as not configured, with the option that would enable it; nothing is downloaded. OUT/evaluation.json
holds every figure. The tiny and debug presets are tested with models the tests build.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreamcore.synthetic import Z95

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class EvaluationError(ValueError):
    """A bad input of `dreamcore evaluate`; the message names it and the fix."""


def read_prompts(path: str | Path) -> list[str]:
    """A text file (one prompt a line) or JSONL with a "prompt" or "caption" string per line."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--prompts {path}: no such file; give a text file (one prompt a line) or JSONL")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"--prompts {path}:{n}: not JSON ({e})") from None
            text = record.get("prompt", record.get("caption")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise EvaluationError(f"--prompts {path}:{n}: no \"prompt\" or \"caption\" string")
            prompts.append(text)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise EvaluationError(f"--prompts {path}: holds no prompts")
    return prompts


# ----------------------------------------------------------------------------------------------
# CLIP score


def clip_scores(images: Sequence[Image.Image], prompts: Sequence[str], clip_path: str,
                batch_size: int = 32) -> np.ndarray:
    """100 x max(cos, 0) between each image and its prompt."""
    from pipelines.curate.similarity import ClipScorer

    scorer = ClipScorer(clip_path, setting="--clip")
    out = []
    for start in range(0, len(images), batch_size):
        ims, texts = images[start:start + batch_size], prompts[start:start + batch_size]
        sim = scorer.score(list(texts), [_png(im) for im in ims])  # (images, texts)
        out.append(np.diag(sim))
    return 100.0 * np.maximum(np.concatenate(out), 0.0)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# FID


def load_inception(path: str) -> Any:
    """A TorchScript file (how the standard FID Inception is shipped), or a torch.export `.pt2`."""
    import torch

    try:
        if path.endswith(".pt2"):
            return torch.export.load(path).module()
        return torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise EvaluationError(
            f"--inception {path}: not a TorchScript model ({str(e).splitlines()[0]}); give a TorchScript "
            "Inception file such as StyleGAN3's / clean-fid's inception-2015-12-05.pt (or a torch.export "
            ".pt2)") from None


def inception_features(model: Any, images: Sequence[Image.Image], size: int = 299,
                       batch_size: int = 32) -> np.ndarray:
    """(N, D) float64 features: images resized to `size` (bicubic), as uint8 NCHW batches."""
    import torch

    feats = []
    for start in range(0, len(images), batch_size):
        arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
                        for im in images[start:start + batch_size]])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            try:  # StyleGAN3's network returns its pool features when asked; others return them as is
                y = model(x, return_features=True)
            except (RuntimeError, TypeError, ValueError):
                y = model(x)
        feats.append(y.reshape(len(arr), -1).double().numpy())
    return np.concatenate(feats)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        raise EvaluationError(f"FID needs at least 2 images on each side (got {len(a)} and {len(b)})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals (as pytorch-fid does)
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))


def read_images(folder: str | Path) -> list[Image.Image]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"--fid-reference {folder}: no such folder; give a folder of reference images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvaluationError(f"--fid-reference {folder}: holds no {', '.join(IMAGE_SUFFIXES)} images")
    images = []
    for p in files:
        try:
            images.append(Image.open(p).convert("RGB"))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise EvaluationError(f"--fid-reference {folder}: {p.name} is not a readable image ({e})") from None
    return images


# ----------------------------------------------------------------------------------------------
# The evaluation


def evaluate(checkpoint: str, prompts: Sequence[str], output: str | Path, clip: str | None = None,
             fid_reference: str | None = None, inception: str | None = None, seed: int = 0,
             batch_size: int = 8, num_inference_steps: int | None = None,
             guidance_scale: float | None = None) -> dict[str, Any]:
    """Draw one image per prompt with `checkpoint`, score what is configured; returns the report."""
    from dreamcore.checkpoint import from_pretrained
    from dreamcore.engine import TextEngine
    from dreamcore.generate import text_to_images

    if batch_size < 1:
        raise EvaluationError(f"--batch-size {batch_size}: give 1 or more prompts per engine batch")
    if (fid_reference is None) != (inception is None):
        raise EvaluationError("FID needs both --fid-reference FOLDER and --inception PATH")
    reference = read_images(fid_reference) if fid_reference else None
    net = load_inception(inception) if inception else None
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = from_pretrained(checkpoint, device=device,
                                       dtype=torch.bfloat16 if device == "cuda" else None)
    model.eval()
    engine = TextEngine(model, tokenizer)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        images += text_to_images(model, tokenizer, prompts[start:start + batch_size], num_inference_steps,
                                 guidance_scale, seed=seed + start, engine=engine)
    out = Path(output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(out / "images" / f"{i:05d}.png")

    report: dict[str, Any] = {"checkpoint": str(checkpoint), "images": len(images), "seed": seed}
    if clip:
        scores = clip_scores(images, prompts, clip)
        half = Z95 * float(scores.std(ddof=1)) / math.sqrt(len(scores)) if len(scores) > 1 else float("nan")
        report["clip_score"] = {"model": clip, "mean": float(scores.mean()),
                                "ci95": [float(scores.mean()) - half, float(scores.mean()) + half],
                                "per_image": [round(float(s), 4) for s in scores]}
    else:
        report["clip_score"] = {"configured": False,
                                "message": "no CLIP model configured: give --clip PATH (a transformers "
                                           "CLIPModel folder or hub id)"}
    if net is not None:
        gen = inception_features(net, images)
        ref = inception_features(net, reference)
        report["fid"] = {"inception": inception, "reference": str(fid_reference), "value": frechet_distance(gen, ref),
                         "generated": len(gen), "reference_images": len(ref)}
    else:
        report["fid"] = {"configured": False,
                         "message": "no FID configured: give --fid-reference FOLDER and --inception PATH "
                                    "(a TorchScript Inception, e.g. inception-2015-12-05.pt)"}
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="exported model folder (RUN_DIR/model)")
    parser.add_argument("--prompts", required=True, help="text file (one prompt a line) or JSONL with \"prompt\"")
    parser.add_argument("--output", required=True, help="folder for images/ and evaluation.json")
    parser.add_argument("--clip", default=None, help="CLIPModel folder or hub id for the CLIP score")
    parser.add_argument("--fid-reference", default=None, help="folder of reference images for FID")
    parser.add_argument("--inception", default=None, help="TorchScript Inception file for FID features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per engine batch")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's)")
    parser.add_argument("--guidance-scale", type=float, default=None)


def main(args: argparse.Namespace) -> int:
    try:
        report = evaluate(args.checkpoint, read_prompts(args.prompts), args.output, args.clip,
                          args.fid_reference, args.inception, args.seed, args.batch_size, args.steps,
                          args.guidance_scale)
    except (EvaluationError, ValueError, FileNotFoundError) as e:
        print(f"dreamcore evaluate: {e}", file=sys.stderr)
        return 2
    clip, fid = report["clip_score"], report["fid"]
    print(f"[evaluate] {report['images']} images -> {args.output}")
    print("[evaluate] CLIP score " + (f"{clip['mean']:.2f} [{clip['ci95'][0]:.2f}, {clip['ci95'][1]:.2f}]"
                                      if "mean" in clip else clip["message"]))
    print("[evaluate] FID " + (f"{fid['value']:.2f} ({fid['generated']} vs {fid['reference_images']} images)"
                               if "value" in fid else fid["message"]))
    return 0
