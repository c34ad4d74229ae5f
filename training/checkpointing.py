"""Checkpoints of the trainable state, reported to Ray Train, and the resume from the latest one.

A checkpoint directory holds DeepSpeed's checkpoint under the tag `state` (the audio weights, the ZeRO-partitioned
optimizer state and the learning-rate scheduler; frozen weights are excluded), one `rank{r}.pt` per worker (its
random generators and data cursor) and the run's config. Every worker writes its part into a local folder and
reports it; Ray Train merges the parts into one directory in the run's storage. After a worker dies the worker
group restarts (FailureConfig) and `restore` loads the latest reported checkpoint; rerunning a finished or killed
run with the same name and output does the same. An elastic worker group (`cluster.min_workers`) may restart with
fewer or more workers than wrote the checkpoint. DeepSpeed loads ZeRO's partitioned optimizer state on the world size
that wrote it only, so such a resume (ZeRO 1 or 2) merges every trainable parameter's fp32 master weight and AdamW
state (moments and step) and its learning rate from the saved partitions and puts them into the new ones: the
optimizer goes on exactly where it stopped, and checkpoints stay DeepSpeed's own, with nothing extra to write.
"""

from __future__ import annotations

import copy
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from deepspeed import DeepSpeedEngine
from deepspeed.checkpoint.constants import (
    BASE_OPTIMIZER_STATE,
    OPTIMIZER_STATE_DICT,
    PARAM_SLICE_MAPPINGS,
    SINGLE_PARTITION_OF_FP32_GROUPS,
    ZERO_STAGE,
)
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_optim_files

from training.config import TrainingConfig

TAG = "state"
CONFIG_FILE = "training_config.json"
MASTER_WEIGHT = "fp32"  # beside the optimizer's own keys in a parameter's merged state


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def save_and_report(
    engine: DeepSpeedEngine, step: int, rank_state: dict, metrics: dict[str, float], config: TrainingConfig
) -> None:
    """Writes this worker's part of the step's checkpoint and reports it with the metrics (every worker calls it)."""
    with tempfile.TemporaryDirectory(prefix="multitalk-checkpoint-") as directory:
        save(engine, directory, step, rank_state, config)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def save(engine: DeepSpeedEngine, directory: str | Path, step: int, rank_state: dict, config: TrainingConfig) -> None:
    """Writes this worker's part of the step's checkpoint into `directory` (every worker calls it)."""
    rank = dist.get_rank()
    engine.save_checkpoint(str(directory), tag=TAG, client_state={"step": step}, exclude_frozen_parameters=True)
    torch.save(rank_state, Path(directory) / _rank_file(rank))
    if rank == 0:
        (Path(directory) / CONFIG_FILE).write_text(config.model_dump_json(indent=2))


def restore(engine: DeepSpeedEngine) -> tuple[int, list[dict]] | None:
    """Loads the latest reported checkpoint into the engine; returns (step, every worker's state of the checkpoint in
    rank order), None if there is none."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load(engine, directory)


def load(engine: DeepSpeedEngine, directory: str | Path) -> tuple[int, list[dict]]:
    """Loads a checkpoint directory into a freshly built engine, whatever the number of workers that wrote it;
    returns (step, every worker's state of the checkpoint in rank order)."""
    states = [torch.load(path, weights_only=True) for path in sorted(Path(directory).glob("rank*.pt"))]
    resized = len(states) != dist.get_world_size()
    # The checkpoint holds no frozen weights: they stay as loaded from the base model.
    path, client_state = engine.load_checkpoint(
        str(directory), tag=TAG, load_module_strict=False, load_optimizer_states=not resized
    )
    if path is None:
        raise RuntimeError(f"{directory}: DeepSpeed could not load the checkpoint tagged {TAG!r}")
    if resized:
        _load_repartitioned(engine, Path(directory) / TAG)
    return client_state["step"], states


def _load_repartitioned(engine: DeepSpeedEngine, zero_dir: Path) -> None:
    """Puts the fp32 master weights and optimizer state of a checkpoint written by another number of workers into
    this engine's ZeRO 1/2 partitions, as its optimizer's first step would have created them."""
    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer):
        raise ValueError(
            f"{zero_dir}: a checkpoint resumes on another number of workers under ZeRO 1 or 2 only, not with "
            f"{type(zero).__name__} (ZeRO stage {engine.zero_optimization_stage()})"
        )
    # The parameters with a fragment in this rank's partitions, by name (what DeepSpeed saves beside the partitions).
    owned = {name for group in zero._param_slice_mappings for name in group}
    states, shared, settings = _state_by_parameter(zero_dir, owned)
    keys = {key for state in states.values() for key in state} - {MASTER_WEIGHT}
    optimizer = zero.optimizer  # the torch optimizer over ZeRO's flat fp32 partitions, one a parameter group
    if optimizer.state:
        raise RuntimeError(f"{zero_dir}: a resized checkpoint loads into a freshly built engine only")
    if len(settings) != len(optimizer.param_groups):
        raise ValueError(
            f"{zero_dir}: {len(settings)} parameter groups, the optimizer has {len(optimizer.param_groups)}"
        )
    for group, saved in zip(optimizer.param_groups, settings, strict=True):
        # The learning rate as the scheduler last set it (the scheduler's own state says only when it steps next).
        group.update({key: value for key, value in saved.items() if key != "params"})
        partition = group["params"][0]
        optimizer.state[partition] = {key: copy.deepcopy(value) for key, value in shared.items()}  # each its own
        optimizer.state[partition].update({key: torch.zeros_like(partition) for key in keys})
    # What DeepSpeed does after its first step: each parameter's optimizer state becomes a view into the partition's.
    zero._lazy_init_hp_params_optimizer_state()
    for name, param in engine.module.named_parameters():
        if name not in owned:
            continue
        state = states.get(name)
        if state is None or state[MASTER_WEIGHT].numel() != param.numel():
            found = "missing" if state is None else f"{state[MASTER_WEIGHT].numel()} elements"
            raise ValueError(f"{zero_dir}: trainable parameter {name} of {param.numel()} elements is {found} there")
        safe_set_full_fp32_param(param, state[MASTER_WEIGHT])
        for key in keys:
            safe_set_full_optimizer_state(param, state[key], key)


def _state_by_parameter(
    zero_dir: Path, names: set[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], list[dict[str, Any]]]:
    """A ZeRO 1/2 checkpoint's fp32 master weight and per-element optimizer state (AdamW's moments) of the trainable
    parameters `names`, flat, merged from every rank's partition; the optimizer state the parameters share (AdamW's
    step); and the optimizer's parameter groups (learning rate, betas, ...). Only these parameters' state is kept:
    each new rank holds its own share, not the whole optimizer.

    A rank's partition is a contiguous slice of its parameter group flattened, so a parameter is its fragments in
    the partitions of consecutive ranks; DeepSpeed records each fragment's place in the partition by name."""
    fragments: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    shared: dict[str, Any] = {}
    for path in get_optim_files(str(zero_dir)):  # in rank order
        saved = torch.load(path, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        if saved[ZERO_STAGE] == 3:
            raise ValueError(f"{path}: a ZeRO-3 checkpoint resumes on the number of workers that wrote it only")
        optimizer = saved[BASE_OPTIMIZER_STATE]
        for group, slices in enumerate(saved[PARAM_SLICE_MAPPINGS]):
            state = optimizer["state"].get(optimizer["param_groups"][group]["params"][0], {})
            partition = {MASTER_WEIGHT: saved[SINGLE_PARTITION_OF_FP32_GROUPS][group]}
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() == 1:
                    partition[key] = value
                else:
                    shared[key] = value
            for name, address in slices.items():
                if name not in names:
                    continue
                for key, values in partition.items():
                    fragments[name][key].append(values.narrow(0, address.start, address.numel).clone())
    merged = {name: {key: torch.cat(parts) for key, parts in state.items()} for name, state in fragments.items()}
    return merged, shared, optimizer["param_groups"]


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
