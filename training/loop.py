"""The per-worker training loop that Ray Train runs: DeepSpeed on the MultiTalk transformer, audio branch only.

Each worker builds the transformer (base weights frozen, audio branch fresh or from earlier audio weights), its
frozen encoders and its data stream, wraps the audio parameters in DeepSpeed (ZeRO, AdamW with warm-up), resumes
from the latest checkpoint when there is one and runs optimizer steps until `schedule.max_steps`. Rank 0 writes
every step's metrics to TensorBoard and metrics.jsonl; every `log_every` steps and with each checkpoint they go to
Ray Train too. At the end the frozen weights are checked unchanged, rank 0 exports multitalk.safetensors and
draws the loss curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from deepspeed import DeepSpeedEngine

from multitalk_model.accounting import training_flops, video_tokens
from multitalk_model.checkpoints import export_audio_weights
from multitalk_model.config import MultiTalkConfig, get_preset
from platform_common.pause import pause_point
from training.checkpointing import restore, save_and_report
from training.config import TrainingConfig
from training.data import ClipBatch, ClipStream, CursorTracker, build_loader
from training.encoders import FrozenEncoders
from training.evaluation import PeriodicEvaluation
from training.metrics import LOSS_CURVE_FILE, METRICS_FILE, MetricsLog, plot_loss_curve
from training.model import DTYPES, build_training_model, frozen_fingerprint
from training.objective import model_inputs, velocity_loss

logger = logging.getLogger(__name__)

EXPORT_FILE = "multitalk.safetensors"
SAMPLES_DIR = "samples"


def _deepspeed_config(config: TrainingConfig, world_size: int) -> dict:
    """DeepSpeed's config for `world_size` workers: batch geometry, gradient clipping, ZeRO and precision."""
    return {
        "train_batch_size": config.step_batch_size(world_size),
        "train_micro_batch_size_per_gpu": config.schedule.micro_batch_size,
        "gradient_accumulation_steps": config.accumulation_steps(world_size),
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": {
            "stage": config.deepspeed.zero_stage,
            "reduce_bucket_size": config.deepspeed.reduce_bucket_size,
            "overlap_comm": config.deepspeed.overlap_comm,
        },
        "bf16": {"enabled": config.model.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own step prints would only repeat it
    }


def _warmup_factor(warmup_steps: int):
    """Learning-rate factor of optimizer step s (0-based): linear warm-up to 1, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def build_engine(model: torch.nn.Module, config: TrainingConfig, world_size: int) -> DeepSpeedEngine:
    """DeepSpeed around the model's trainable parameters: AdamW with the warm-up schedule, ZeRO over the
    `world_size` workers of the process group that already exists (Ray Train's)."""
    params = [param for param in model.parameters() if param.requires_grad]
    # A torch optimizer: DeepSpeed's own would compile kernels first (and gives nothing here that this lacks).
    optimizer = torch.optim.AdamW(
        params,
        lr=config.optimizer.lr,
        betas=config.optimizer.betas,
        eps=config.optimizer.eps,
        weight_decay=config.optimizer.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(config.optimizer.warmup_steps))
    return deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=_deepspeed_config(config, world_size),
        dist_init_required=False,
    )[0]


@dataclass
class StepStats:
    """What one worker did in one optimizer step."""

    loss: float = 0.0  # summed over the micro-batches
    flops: float = 0.0
    tokens: float = 0.0
    waited_s: float = 0.0  # waiting for the data loader
    clips: list[list] = field(default_factory=list)  # [clip id, epoch, source] trained on


class Worker:
    """One training worker: its model, encoders, optimizer, data and random state."""

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        # Where the worker runs, for data audits across nodes: Ray Train numbers nodes by IP, in world-rank order.
        self.placement = {
            "node": ray.get_runtime_context().get_node_id(),
            "node_rank": context.get_node_rank(),
            "local_rank": context.get_local_rank(),
        }
        self.device = ray.train.torch.get_device()  # this worker's GPU among those Ray gave the node, or the CPU
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            # DeepSpeed compiles a small shared-memory op for CPU collectives once; keep it beside the environment.
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        # The worker group may have shrunk (cluster.min_workers): the live world size sets the accumulation.
        self.accumulation_steps = config.accumulation_steps(self.world_size)
        if config.step_batch_size(self.world_size) != config.schedule.global_batch_size and self.rank == 0:
            logger.warning(
                "%d workers do not divide the global batch %d: each step takes %d samples",
                self.world_size,
                config.schedule.global_batch_size,
                config.step_batch_size(self.world_size),
            )
        self.architecture: MultiTalkConfig = get_preset(config.model.preset)
        self.dtype = DTYPES[config.model.precision]

        model = build_training_model(config.model, self.device, seed=config.schedule.seed)
        if config.model.activation_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        self.encoders = FrozenEncoders.load(config.model.model_dir, self.architecture, self.device, self.dtype)
        self.engine = build_engine(model, config, self.world_size)
        self.scheduler = self.engine.lr_scheduler
        self.frozen_at_start = frozen_fingerprint(self.engine.module)

        # Noise, timesteps and dropouts come from a generator of their own, saved with each checkpoint.
        self.generator = torch.Generator().manual_seed(config.schedule.seed * 1000 + self.rank)
        schedule = config.schedule
        self.dataset = ClipStream(
            config.data, self.architecture, schedule.micro_batch_size, schedule.seed, self.rank, self.world_size
        )
        self.tracker = CursorTracker(self.dataset.num_streams)
        self.step = 0

    def restore(self) -> None:
        """Continues from the latest checkpoint of the run, if there is one."""
        restored = restore(self.engine)
        if restored is None:
            return
        self.step, states = restored
        if self.rank < len(states):  # a worker added by an elastic resize keeps its fresh random state
            self.generator.set_state(states[self.rank]["generator"])
            torch.set_rng_state(states[self.rank]["torch"])
        cursors = [state["cursor"] for state in states]
        self.tracker = CursorTracker.resume(cursors, self.dataset.num_streams, self.dataset.own_streams)
        self.dataset.cursor, self.dataset.earlier = self.tracker.streams, self.tracker.earlier
        logger.info("rank %d resumed at step %d", self.rank, self.step)

    def state(self) -> dict:
        """This worker's part of a checkpoint beside DeepSpeed's: random generators and the data cursor."""
        return {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "cursor": self.tracker.state_dict(),
        }

    def train_step(self, batches: Iterator[ClipBatch]) -> StepStats:
        """One optimizer step: forward and backward over the micro-batches, then DeepSpeed's update."""
        stats = StepStats()
        for _ in range(self.accumulation_steps):
            wait_started = time.perf_counter()
            batch = next(batches)
            stats.waited_s += time.perf_counter() - wait_started
            inputs = model_inputs(batch, self.encoders, self.config.objective, self.generator, self.device, self.dtype)
            loss = velocity_loss(self.engine, inputs, self.config.objective, self.generator)
            self.engine.backward(loss)
            self.engine.step()  # updates at the accumulation boundary only
            self.tracker.advance(batch)
            latent_shape, persons = tuple(inputs.latents.shape[2:]), inputs.audio.shape[1]
            stats.loss += loss.item()
            stats.flops += len(batch) * training_flops(self.architecture, latent_shape, persons)
            stats.tokens += len(batch) * video_tokens(self.architecture, latent_shape)
            stats.clips += [list(clip) for clip in zip(batch.keys, batch.epochs, batch.sources, strict=False)]
        self.step += 1
        return stats

    def metrics(self, stats: StepStats, step_time: float) -> dict[str, float]:
        """The step's metrics over all workers (a collective)."""
        totals = torch.tensor(
            [stats.loss / self.accumulation_steps, stats.flops, stats.tokens, stats.waited_s / step_time],
            device=self.device,
        )
        dist.all_reduce(totals)
        loss, flops, tokens, waited = totals.tolist()
        return {
            "step": self.step,
            "loss": loss / self.world_size,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "samples_per_s": self.config.step_batch_size(self.world_size) / step_time,
            "tokens_per_s": tokens / step_time,
            "mfu": flops / step_time / (self.config.metrics.peak_tflops * 1e12 * self.world_size),
            "data_wait_fraction": waited / self.world_size,
            "step_time_s": step_time,
        }

    def frozen_tensors_changed(self) -> int:
        """How many frozen parameter tensors differ from the start of this run (must be 0)."""
        return int((frozen_fingerprint(self.engine.module) != self.frozen_at_start).any(dim=1).sum())

    def export(self, path: Path) -> None:
        """Rank 0 writes the audio weights; under ZeRO-3 every rank first helps gather them."""
        params = [param for param in self.engine.module.parameters() if param.requires_grad]
        gathered = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if self.config.deepspeed.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gathered:
            if self.rank == 0:
                export_audio_weights(self.engine.module, path)


def _periodic_evaluation(config: TrainingConfig, worker: Worker) -> PeriodicEvaluation | None:
    """Rank 0's evaluation of the current weights on the configured test set, if any."""
    if worker.rank != 0 or not config.evaluation.test_set:
        return None
    return PeriodicEvaluation(
        config.evaluation, config.model.model_dir, worker.encoders.encoders, worker.architecture, config.output
    )


def train_loop_per_worker(config_values: dict) -> None:
    """Ray Train's entry on every worker."""
    config = TrainingConfig.model_validate(config_values)
    schedule, output = config.schedule, Path(config.output)
    worker = Worker(config)
    worker.restore()
    batches = iter(build_loader(worker.dataset, config.data))
    metrics_log = MetricsLog(output) if worker.rank == 0 else None
    evaluation = _periodic_evaluation(config, worker)
    sample_log = None
    if config.data.log_sample_keys:
        (output / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        sample_log = (output / SAMPLES_DIR / f"rank{worker.rank:05d}.jsonl").open("a")

    changed = 0
    while worker.step < schedule.max_steps:
        started = time.perf_counter()
        stats = worker.train_step(batches)
        metrics = worker.metrics(stats, time.perf_counter() - started)
        last = worker.step == schedule.max_steps
        if last:
            changed = metrics["frozen_tensors_changed"] = worker.frozen_tensors_changed()
        if evaluation is not None and evaluation.due(worker.step, last):
            scores = evaluation(worker.engine.module, worker.step)
            metrics.update({f"eval/{name}": value for name, value in scores.items()})
        if metrics_log is not None:
            metrics_log.write(worker.step, {k: v for k, v in metrics.items() if k != "step"})
        if sample_log is not None:
            record = {"step": worker.step, "pid": os.getpid(), **worker.placement, "clips": stats.clips}
            sample_log.write(json.dumps(record) + "\n")
            sample_log.flush()
        # Reports are few: Ray Train takes one per worker at a time, and a report is a barrier of all workers.
        if worker.step % schedule.checkpoint_every == 0 or last:
            save_and_report(worker.engine, worker.step, worker.state(), metrics, config)
            pause_point(f"training-checkpoint-{worker.step}")
        elif worker.step % schedule.log_every == 0:
            ray.train.report(metrics)

    if sample_log is not None:
        sample_log.close()
    if changed:
        raise RuntimeError(f"{changed} frozen parameter tensors changed during training")
    worker.export(output / EXPORT_FILE)
    if metrics_log is not None:
        metrics_log.close()
        if (output / METRICS_FILE).is_file():
            plot_loss_curve(output / METRICS_FILE, output / LOSS_CURVE_FILE)
        logger.info("finished at step %d; audio weights in %s", worker.step, output / EXPORT_FILE)
