"""Checkpoints of the trainable state, reported to Ray Train, and the resume from the latest one.

A checkpoint directory holds DeepSpeed's checkpoint under the tag `state` (the audio weights, the ZeRO-partitioned
optimizer state and the learning-rate scheduler; frozen weights are excluded), one `rank{r}.pt` per worker (its
random generators and data cursor) and the run's config. Every worker writes its part into a local folder and
reports it; Ray Train merges the parts into one directory in the run's storage. After a worker dies the worker
group restarts (FailureConfig) and `restore` loads the latest reported checkpoint; rerunning a finished or killed
run with the same name and output does the same. An elastic worker group (`cluster.min_workers`) may restart with
fewer or more workers than wrote the checkpoint: DeepSpeed cannot split ZeRO's optimizer state anew, so such a
resume loads the exact fp32 weights, the step and the learning-rate schedule, and AdamW's moments start afresh.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import torch
from deepspeed import DeepSpeedEngine
from deepspeed.utils import safe_set_full_fp32_param
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from training.config import TrainingConfig

TAG = "state"
CONFIG_FILE = "training_config.json"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def save_and_report(
    engine: DeepSpeedEngine, step: int, rank_state: dict, metrics: dict[str, float], config: TrainingConfig
) -> None:
    """Writes this worker's part of the step's checkpoint and reports it with the metrics (every worker calls it)."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix="multitalk-checkpoint-") as directory:
        engine.save_checkpoint(directory, tag=TAG, client_state={"step": step}, exclude_frozen_parameters=True)
        torch.save(rank_state, Path(directory) / _rank_file(rank))
        if rank == 0:
            (Path(directory) / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def restore(engine: DeepSpeedEngine) -> tuple[int, list[dict]] | None:
    """Loads the latest reported checkpoint into the engine; returns (step, every worker's state of the checkpoint in
    rank order), None if there is none."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        states = [torch.load(path, weights_only=True) for path in sorted(Path(directory).glob("rank*.pt"))]
        resized = len(states) != ray.train.get_context().get_world_size()
        # The checkpoint holds no frozen weights: they stay as loaded from the base model.
        path, client_state = engine.load_checkpoint(
            directory, tag=TAG, load_module_strict=False, load_optimizer_states=not resized
        )
        if path is None:
            raise RuntimeError(f"{directory}: DeepSpeed could not load the checkpoint tagged {TAG!r}")
        if resized:  # the bf16 weights DeepSpeed loaded lack the fp32 master weights' precision
            weights = trainable_state_dict(directory)
            for name, param in engine.module.named_parameters():
                if param.requires_grad:
                    safe_set_full_fp32_param(param, weights[name])
    return client_state["step"], states


def trainable_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint directory (the fp32 master weights, any ZeRO stage), by parameter name."""
    if not (Path(checkpoint_dir) / TAG).is_dir():
        raise FileNotFoundError(f"{Path(checkpoint_dir) / TAG}: missing; {checkpoint_dir} is not a training checkpoint")
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=TAG)


def checkpoint_config(checkpoint_dir: str | Path) -> TrainingConfig:
    """The config of the run that wrote a checkpoint."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {checkpoint_dir} is not a training checkpoint")
    return TrainingConfig.model_validate_json(path.read_text())
