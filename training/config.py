"""The training run's configuration: a YAML file validated into typed models; a bad value fails naming its field."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from evaluation.clips import Protocol
from multitalk_model.config import PRESETS, check_clip_frames
from pipelines.schema import Kind
from platform_common.config import ConfigError as ConfigError  # what load_config raises, for its callers
from platform_common.config import (
    ConfigSection,
    absolute_location,
    existing_local_path,
    read_config,
    require,
)


class ModelConfig(ConfigSection):
    preset: str = Field(default="multitalk-14b", description="architecture: a preset of multitalk_model.config")
    model_dir: str | None = Field(
        default=None,
        description="model directory (multitalk_model.components layout): frozen encoders and base transformer",
    )
    audio_weights: str | None = Field(
        default=None,
        description="official-format audio weights to start from (stage 2: stage 1's export); none: a fresh audio "
        "branch whose output projections are zero, so step 0 is the base image-to-video model",
    )
    precision: Literal["bf16", "fp32"] = Field(default="bf16", description="dtype of the model and the encoders")
    activation_checkpointing: bool = Field(default=True, description="recompute each block in backward")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {', '.join(sorted(PRESETS))}")
        return value


class DataConfig(ConfigSection):
    path: str | None = Field(default=None, description="folder of curated webdataset shards (--data overrides)")
    ai2v_kinds: list[Kind] = Field(
        default=["single"], min_length=1, description="shard kinds trained with audio + image (stage 1 single, 2 dual)"
    )
    i2v_kind: Kind = Field(default="multi_event", description="shard kind trained image-only, its audio zeroed")
    i2v_ratio: float = Field(default=0.2, ge=0, lt=1, description="share of image-to-video samples in each batch")
    num_frames: int = Field(default=81, description="video frames per sample (4n + 1), taken from the clip's start")
    max_area: int | None = Field(
        default=None, ge=256, description="pixels: larger clips are scaled down to this area (none: curated size)"
    )
    shuffle_buffer: int = Field(default=64, ge=1, description="samples held to shuffle the stream")
    num_workers: int = Field(default=2, ge=0, description="loader processes per training worker")
    prefetch_batches: int = Field(default=2, ge=1, description="batches each loader process prepares ahead")
    log_sample_keys: bool = Field(
        default=False, description="write every step's clip ids per rank to OUTPUT/samples/ (data audits)"
    )

    _frames_are_4n_plus_1 = field_validator("num_frames")(check_clip_frames)


class ObjectiveConfig(ConfigSection):
    family: Literal["multitalk", "infinitetalk"] = Field(
        default="multitalk",
        description="model family trained: its sampler's conditioning (infinitetalk: frame 0 from a sampled "
        "position of the clip, the first motion_frames frames as clean context; set motion_frames: 9 for it)",
    )
    timestep_shift: float = Field(default=7.0, gt=0, description="shift of the sampled flow timesteps (as inference)")
    timestep_sampling: Literal["uniform", "logit_normal"] = Field(
        default="uniform", description="distribution of the timesteps before the shift"
    )
    text_dropout: float = Field(default=0.1, ge=0, lt=1, description="rate of captions replaced by the null prompt")
    audio_dropout: float = Field(default=0.1, ge=0, lt=1, description="rate of audio-video samples with audio zeroed")
    null_prompt: str = Field(default="", description="what a dropped caption (or a clip without one) becomes")
    motion_condition_ratio: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="share of samples conditioned on their first motion_frames frames, as streaming inference "
        "conditions every clip after the first (the rest: on their first frame, as the first clip)",
    )
    motion_frames: int = Field(
        default=25, description="video frames (4n + 1) given to motion-conditioned samples, as generation's"
    )
    loss_weighting: Literal["none", "diffsynth"] = Field(
        default="none",
        description="per-timestep loss weights: none, or the bell DiffSynth-Studio weights Wan's training with",
    )

    _motion_frames_are_4n_plus_1 = field_validator("motion_frames")(check_clip_frames)


class OptimizerConfig(ConfigSection):
    lr: float = Field(default=2e-5, gt=0, description="AdamW learning rate after the warm-up (then constant)")
    warmup_steps: int = Field(default=500, ge=0, description="optimizer steps of linear warm-up from 0")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW decoupled weight decay")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(default=1.0, gt=0, description="global gradient norm clip")


class DeepSpeedConfig(ConfigSection):
    zero_stage: Literal[1, 2, 3] = Field(default=2, description="ZeRO stage (3 also partitions the frozen weights)")
    reduce_bucket_size: int = Field(default=200_000_000, ge=1, description="elements per gradient reduce bucket")
    overlap_comm: bool = Field(default=True, description="overlap gradient reduction with backward")


class ScheduleConfig(ConfigSection):
    max_steps: int = Field(default=10_000, ge=1, description="optimizer steps of the run (--max-steps overrides)")
    global_batch_size: int = Field(default=64, ge=1, description="samples per optimizer step, all workers together")
    micro_batch_size: int = Field(default=1, ge=1, description="samples per worker per forward")
    checkpoint_every: int = Field(default=500, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(default=3, ge=1, description="most recent checkpoints kept in storage")
    log_every: int = Field(
        default=10, ge=1, description="optimizer steps between reports to Ray Train (TensorBoard gets every step)"
    )
    seed: int = Field(default=0, description="seed of initialisation, noise, timesteps, dropout and data order")


class ClusterConfig(ConfigSection):
    run_name: str = Field(default="multitalk-train", description="Ray Train run name; rerunning it resumes")
    num_workers: int = Field(default=64, ge=1, description="training workers (one per GPU)")
    min_workers: int | None = Field(
        default=None,
        ge=1,
        description="fewest workers the run may shrink to when nodes are gone (elastic; none: always num_workers); "
        "the global batch stays, each worker accumulates more micro-batches",
    )
    use_gpu: bool = Field(default=True, description="one GPU per worker")
    cpus_per_worker: float = Field(default=8, gt=0, description="CPUs per worker (its loader processes run there)")
    worker_resources: dict[str, float] = Field(
        default={}, description="further Ray resources per worker, e.g. a node type's custom resource that pins them"
    )
    max_failures: int = Field(default=3, ge=-1, description="worker-group restarts from the latest checkpoint")
    ray_address: str | None = Field(default=None, description="Ray cluster address (default: RAY_ADDRESS or local)")
    local_num_cpus: int = Field(default=2, ge=1, description="CPUs of an embedded local Ray")


class MetricsConfig(ConfigSection):
    peak_tflops: float = Field(
        default=989.5, gt=0, description="dense peak TFLOP/s of one device in the training dtype, for MFU"
    )


class EvaluationSettings(ConfigSection):
    test_set: str | None = Field(
        default=None,
        description="small fixed test set (curated test folder or manifest of videos); none: no evaluation",
    )
    every: int = Field(default=500, ge=1, description="optimizer steps between evaluations (and one at the end)")
    max_clips: int = Field(default=4, ge=1, description="clips of the test set evaluated")
    protocol: Protocol = Field(
        default_factory=lambda: Protocol(steps=8, frame_num=33), description="generation settings (few steps, small)"
    )
    syncnet_path: str | None = Field(default=None, description="SyncNet weights for Sync-C/D")
    keep_best: str | None = Field(
        default=None, description="metric (e.g. sync.confidence) whose best step's audio weights go to OUTPUT/best"
    )


class TrainingConfig(ConfigSection):
    output: str | None = Field(
        default=None, description="folder for checkpoints, TensorBoard, metrics and the export (--output overrides)"
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="transformer and frozen encoders")
    data: DataConfig = Field(default_factory=DataConfig, description="shards and batches")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="flow-matching loss")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW and warm-up")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="ZeRO settings")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="steps, batches, checkpoints")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray Train workers and restarts")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="throughput accounting")
    evaluation: EvaluationSettings = Field(
        default_factory=EvaluationSettings, description="periodic evaluation on held-out clips"
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingConfig:
        per_step = self.schedule.micro_batch_size * self.cluster.num_workers
        if self.schedule.global_batch_size % per_step:
            raise ValueError(
                f"schedule.global_batch_size {self.schedule.global_batch_size} is not a multiple of "
                f"micro_batch_size x num_workers = {per_step}"
            )
        if self.cluster.min_workers is not None and self.cluster.min_workers > self.cluster.num_workers:
            raise ValueError(
                f"cluster.min_workers {self.cluster.min_workers} exceeds cluster.num_workers {self.cluster.num_workers}"
            )
        if self.cluster.min_workers is not None and self.deepspeed.zero_stage == 3:
            raise ValueError("cluster.min_workers: a resized run reloads ZeRO 1 or 2 checkpoints only (not stage 3)")
        if self.evaluation.test_set and self.deepspeed.zero_stage == 3:
            raise ValueError("evaluation.test_set: periodic evaluation needs whole weights on rank 0 (ZeRO 1 or 2)")
        return self

    @model_validator(mode="after")
    def _motion_frames_fit(self) -> TrainingConfig:
        if self.objective.motion_condition_ratio > 0 and self.objective.motion_frames >= self.data.num_frames:
            raise ValueError(
                f"objective.motion_frames {self.objective.motion_frames} must be fewer than data.num_frames "
                f"{self.data.num_frames} (or set objective.motion_condition_ratio to 0)"
            )
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each of `world_size` workers: the global batch over the workers,
        rounded up when a shrunken worker group does not divide it."""
        return -(-self.schedule.global_batch_size // (self.schedule.micro_batch_size * world_size))

    def step_batch_size(self, world_size: int) -> int:
        """Samples per optimizer step on `world_size` workers: the global batch, or the few more of a rounded-up
        accumulation."""
        return self.accumulation_steps(world_size) * self.schedule.micro_batch_size * world_size


def load_config(
    path: str | os.PathLike,
    data: str | None = None,
    output: str | None = None,
    max_steps: int | None = None,
    sets: Mapping[str, Any] | None = None,
) -> TrainingConfig:
    """Read and validate a YAML config; `sets` (dotted field -> value, from --set) and the non-None arguments
    (data.path, output, schedule.max_steps) override fields of the file."""
    flags = {"data.path": data, "output": output, "schedule.max_steps": max_steps}
    overrides = {**(sets or {}), **{name: value for name, value in flags.items() if value is not None}}
    config = read_config(path, TrainingConfig, overrides)
    require(path, {"output": config.output, "data.path": config.data.path, "model.model_dir": config.model.model_dir})
    config.output = absolute_location(config.output)
    config.data.path = existing_local_path(path, "data.path", config.data.path, "directory")
    config.model.model_dir = existing_local_path(path, "model.model_dir", config.model.model_dir, "directory")
    if config.model.audio_weights:
        config.model.audio_weights = existing_local_path(
            path, "model.audio_weights", config.model.audio_weights, "file"
        )
    if config.evaluation.test_set:
        config.evaluation.test_set = absolute_location(config.evaluation.test_set)
        if not Path(config.evaluation.test_set).exists():
            raise ConfigError(f"{path}: evaluation.test_set: {config.evaluation.test_set} does not exist")
    return config
