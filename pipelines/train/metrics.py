"""What a run reports: the progress line, MFU, and the metrics files in the run folder.

Ray Train keeps only the metrics of checkpointed reports (`Result.metrics`), so every logged step
also goes to `metrics.jsonl` and `metrics.csv` (and TensorBoard when it is installed), written by
rank 0. These files are appended across restarts; a resumed run continues the same step numbers.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

# Dense bf16 peak of one device, FLOP/s (vendor datasheets). Matched by substring of the CUDA name.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}

CSV_FIELDS = [
    "step", "epoch", "loss", "lm_loss", "vm_loss", "lr", "grad_norm", "tokens_per_s", "images_per_s",
    "samples_per_s", "step_time_s", "mfu", "elapsed_s", "val_loss", "val_lm_loss", "val_vm_loss",
]


def peak_flops(device_name: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured value, else a datasheet match, else None."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


def train_flops_per_token(n_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder LM (PaLM, appendix B): 6N + 12 * L * H * T.

    6N is forward (2N) + backward (4N) through the weights; 12LHT the attention scores and values.
    Only the LLM counts: MFU is quoted for the language model, as in the papers we compare with.
    """
    return 6.0 * n_params + 12.0 * num_layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None: unknown)."""
    if not peak or world_size < 1:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(row: dict[str, Any], max_steps: int, eta_s: float) -> str:
    """One human line per logging interval: step, losses, throughput, ETA (and MFU on GPU)."""
    parts = [
        f"step {row['step']}/{max_steps}",
        f"loss {row['loss']:.4f} (lm {row['lm_loss']:.4f}, vm {row['vm_loss']:.4f})",
        f"lr {row['lr']:.2e}",
        f"{row['tokens_per_s']:.0f} tok/s",
        f"{row['images_per_s']:.1f} img/s",
    ]
    if "val_loss" in row:  # a validation step
        parts.append(f"val {row['val_loss']:.4f} (lm {row['val_lm_loss']:.4f}, vm {row['val_vm_loss']:.4f})")
    if row["mfu"] is not None:  # None: the peak FLOP/s of the device is unknown (CPU)
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    parts.append(f"ETA {format_duration(eta_s)}")
    return "[train] " + " | ".join(parts)


# What MetricsWriter writes into the run folder besides model/. The two files also travel in every
# checkpoint (loop.save_checkpoint), so a run whose folder is in object storage keeps its history
# through a node's death (job._fetch_metrics).
METRICS_FILES = ("metrics.jsonl", "metrics.csv")
METRICS_DIRS = ("tensorboard",)


class MetricsWriter:
    """Appends metric rows to metrics.jsonl / metrics.csv (+ TensorBoard) in the run folder."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        new_csv = not self.csv_path.exists()
        self._csv_file = self.csv_path.open("a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional ([tensorboard] extra)
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._csv.writerow(row)
        self._csv_file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    group, name = ("val", key[4:]) if key.startswith("val_") else ("train", key)
                    self._tb.add_scalar(f"{group}/{name}", value, row["step"])
            self._tb.flush()

    def close(self) -> None:
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a resumed run keeps the last row written for each step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
