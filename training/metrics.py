"""Rank 0's record of a run: TensorBoard scalars, metrics.jsonl (one line per logged step) and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # workers have no display
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Appends each logged step to TensorBoard and metrics.jsonl; a resumed run appends after the restart."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.output / TENSORBOARD_DIR))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            # Names with a group of their own (eval/sync.confidence) keep it; the rest are training's.
            self.writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
        self.writer.flush()
        with (self.output / METRICS_FILE).open("a") as file:
            file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The logged steps in order, each step's last record (steps redone after a restart replace the lost ones)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """A PNG of the training loss over the optimizer steps."""
    records = read_metrics(metrics_path)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot([r["step"] for r in records], [r["loss"] for r in records], marker="." if len(records) < 50 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("velocity MSE")
    axis.set_title("training loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path)
    plt.close(figure)
    return out_path
