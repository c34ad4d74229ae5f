"""Training overhead on the tiny model: the Ray Train + DeepSpeed loop (one CPU worker, ZeRO-2) against a plain
single-process PyTorch loop doing the same work per step (same data loader, model, micro-batches, frozen encoders,
loss, backward, AdamW), and the share of the step the Ray loop spends waiting for data.

    python benchmarks/training.py --data CURATED_DIR [--steps 40]     # shards of pipelines/curate.py
    python benchmarks/training.py --gpu-slice [--layers 4]             # on a GPU: a slice of the 14B config

Targets: Ray/plain per-step time <= 1.2, data wait <= 5% of the step. The GPU slice runs the 14B block width and
sequence (81 frames at 640x640, 33,600 tokens) with fewer blocks in bf16 (random weights made on the GPU) with
activation checkpointing, and prints s/step, tokens/s and MFU (target >= 40%). It needs only torch, diffusers and
multitalk_model, so it runs on a bare GPU machine (benchmarks/gpu.py calls it); the Ray comparison imports the
training stack where it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import torch

from multitalk_model.accounting import training_flops, video_tokens
from multitalk_model.config import MultiTalkConfig, get_preset
from multitalk_model.fixtures.random_model import random_transformer

TINY_CONFIG = REPO / "training" / "configs" / "tiny-cpu.yaml"


def ray_step_times(
    config_path: Path, data: Path, output: Path, steps: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Per-step seconds and data-wait fractions of the real entry point (`training/train.py`) after the warm-up."""
    from training.metrics import METRICS_FILE, read_metrics

    command = [sys.executable, str(REPO / "training" / "train.py"), "--config", str(config_path)]
    command += ["--data", str(data), "--output", str(output), "--max-steps", str(steps)]
    log = output.parent / "train.log"
    with log.open("w") as stream:
        if subprocess.run(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"the training run failed; see {log}")
    records = read_metrics(output / METRICS_FILE)[warmup:]
    return [r["step_time_s"] for r in records], [r["data_wait_fraction"] for r in records]


def plain_step_times(config_path: Path, data: Path, steps: int, warmup: int) -> list[float]:
    """Per-step seconds of one plain process doing a worker's step: same data loader, model, loss and AdamW."""
    from training.config import load_config
    from training.data import ClipStream, build_loader
    from training.encoders import FrozenEncoders
    from training.model import build_training_model
    from training.objective import model_inputs, velocity_loss

    config = load_config(config_path, data=str(data), output=str(data))
    torch.set_num_threads(1)  # a Ray worker with 1 CPU runs torch on one thread
    architecture = get_preset(config.model.preset)
    model = build_training_model(config.model, "cpu", seed=0)
    model.enable_gradient_checkpointing()
    model.train()
    encoders = FrozenEncoders.load(config.model.model_dir, architecture, "cpu", torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay)
    dataset = ClipStream(config.data, architecture, config.schedule.micro_batch_size, 0, rank=0, world_size=1)
    batches = iter(build_loader(dataset, config.data))
    generator, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        for _ in range(config.accumulation_steps(1)):
            inputs = model_inputs(next(batches), encoders, config.objective, generator, cpu, torch.float32)
            (velocity_loss(model, inputs, config.objective, generator) / config.accumulation_steps(1)).backward()
        torch.nn.utils.clip_grad_norm_(params, config.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times[warmup:]


def tiny_overhead(data: Path, steps: int, warmup: int) -> None:
    import yaml

    from multitalk_model.fixtures.tiny_model import build_tiny_model_dir

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        config = yaml.safe_load(TINY_CONFIG.read_text())
        config["model"]["model_dir"] = str(build_tiny_model_dir(scratch / "tiny-model"))
        config["schedule"]["checkpoint_every"] = steps  # one checkpoint, at the end: steps measure training only
        config["schedule"]["log_every"] = steps
        # One worker against one plain process: the same CPU for each, so the difference is Ray Train + DeepSpeed.
        schedule = config["schedule"]
        schedule["global_batch_size"] = schedule["global_batch_size"] // config["cluster"]["num_workers"]
        config["cluster"]["num_workers"] = 1
        config_path = scratch / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        ray_times, waits = ray_step_times(config_path, data, scratch / "out", steps, warmup)
        plain_times = plain_step_times(config_path, data, steps, warmup)
    ray_s, plain_s = statistics.median(ray_times), statistics.median(plain_times)
    schedule = config["schedule"]
    micro_batch, per_step = schedule["micro_batch_size"], schedule["global_batch_size"]
    print(f"tiny model, 1 CPU worker, micro-batches of {micro_batch}, {per_step} samples per step")
    print(f"median step: Ray Train + DeepSpeed {ray_s:.3f} s, plain PyTorch {plain_s:.3f} s ({len(ray_times)} steps)")
    print(f"ratio  Ray Train + DeepSpeed / plain per-step time: {ray_s / plain_s:.3f}  (target <= 1.2)")
    print(f"ratio  data wait / step time: {statistics.mean(waits):.3f}  (target <= 0.05)")


@dataclasses.dataclass(frozen=True)
class SliceStep:
    """One training step of a slice of a configuration (one sample) on one device."""

    layers: int
    tokens: int  # video tokens of the sample
    step_s: float  # median over the steps after the first
    flops: int  # training FLOPs of the step (accounting.training_flops)
    peak_bytes: int | None  # peak device memory allocated (None on the CPU)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    @property
    def tflops(self) -> float:
        return self.flops / self.step_s / 1e12


def gpu_slice(config: MultiTalkConfig, frames: int, height: int, width: int, steps: int) -> SliceStep:
    """Training steps of `config` (a slice: fewer blocks of a real width) on the GPU, or the CPU without one.

    bf16 random weights, only the audio branch trainable (as stage 1), activation checkpointing on every block,
    AdamW; one sample of `frames` frames at height x width with one person. The first step is the warm-up.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_transformer(config, device).train()
    audio_names = set(model.audio_parameter_names())
    for name, param in model.named_parameters():
        param.requires_grad_(name in audio_names)
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, fused=device.type == "cuda")
    latent = ((frames - 1) // config.vae_scale + 1, height // 8, width // 8)
    generator = torch.Generator(device).manual_seed(0)
    random = lambda *shape: torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16)  # noqa: E731
    inputs = {
        "hidden_states": random(1, config.in_channels, *latent),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": random(1, config.text_len, config.text_dim),
        "encoder_hidden_states_image": random(1, 257, config.image_dim),
        "audio": random(1, 1, frames, config.audio_window, config.audio_layers, config.audio_channels),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(steps, 2)):
        started = time.perf_counter()
        model(**inputs).sample.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return SliceStep(
        layers=config.num_layers,
        tokens=video_tokens(config, latent),
        step_s=statistics.median(times[1:]),
        flops=training_flops(config, latent, 1),
        peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="folder of curated shards with single and multi_event clips")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each loop")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timings")
    parser.add_argument("--gpu-slice", action="store_true", help="measure a slice of the 14B config instead")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the 14B slice")
    parser.add_argument("--frames", type=int, default=81, help="video frames of the 14B slice's sample (4n + 1)")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 640), metavar=("H", "W"), help="its pixels")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device (default: by its name)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.gpu_slice:
        from benchmarks.gpu import device_peak_tflops

        config = dataclasses.replace(get_preset("multitalk-14b"), num_layers=args.layers)
        result = gpu_slice(config, args.frames, *args.size, steps=max(3, args.steps // 8))
        peak_tflops, card = args.peak_tflops, "given"
        if peak_tflops is None:
            card, peak_tflops = device_peak_tflops()
        print(f"14B width, {args.layers} of 40 blocks, {args.frames} frames at {args.size[0]}x{args.size[1]}")
        print(f"step {result.step_s:.3f} s; {result.tokens_per_s:,.0f} tokens/s; {result.tflops:.1f} TFLOP/s")
        if peak_tflops:
            print(f"MFU {result.tflops / peak_tflops:.3f} of {peak_tflops} TFLOP/s ({card}; target >= 0.40)")
        if result.peak_bytes is not None:
            print(f"peak memory {result.peak_bytes / 2**30:.1f} GiB")
    elif args.data is None:
        parser.error("--data is required (a folder written by pipelines/curate.py)")
    else:
        tiny_overhead(args.data.resolve(), args.steps, args.warmup)


if __name__ == "__main__":
    main()
