"""FSDP2 weight sharding and int8 weights on CPU: what each rank holds, what it costs, what int8 changes.

For the tiny config and a mid-sized one (dim 512, 4 blocks), in one run:
- per-rank parameter bytes and peak resident memory for K=1 (one process, whole model) and K=2 (FSDP2 over two
  gloo processes, sequence parallel on top), and the forward time ratio sharded / unsharded;
- int8 weight-only (torchao) against float32 in one process: the relative L2 difference of the output and the
  forward time ratio.

    python benchmarks/sharding.py [--repeats 3]

Processes share this machine's cores: K=2 runs two ranks on them, so the time ratio shows the cost of the
collectives and of splitting the work, not a speed-up.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

# This folder's serving.py would shadow the serving package: drop the script's own folder from the path.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from multitalk_model.checkpoints import build_model
from multitalk_model.config import MultiTalkConfig, get_preset
from multitalk_model.quantization import quantize_transformer
from serving.parallel import apply_sequence_parallel
from serving.sharding import local_parameter_bytes, shard_transformer

CONFIGS = {
    "tiny": (get_preset("tiny"), (3, 8, 8)),
    "mid": (
        get_preset("cpu-bench"),
        (5, 16, 24),
    ),
}


def make_inputs(config: MultiTalkConfig, latent: tuple[int, int, int], persons: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    t, h, w = latent
    frames = config.vae_scale * (t - 1) + 1
    masks = torch.zeros(1, persons + 1, h, w)
    masks[0, 0, :, : w // 2], masks[0, 1, :, w // 2 :] = 1, 1
    return {
        "hidden_states": torch.randn(1, config.in_channels, t, h, w, generator=gen),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 16, config.text_dim, generator=gen),
        "encoder_hidden_states_image": torch.randn(1, 257, config.image_dim, generator=gen),
        "audio": torch.randn(
            1, persons, frames, config.audio_window, config.audio_layers, config.audio_channels, generator=gen
        ),
        "region_masks": masks,
    }


def model_of(config: MultiTalkConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(config, "cpu").eval()


@torch.no_grad()
def seconds_per_forward(model: torch.nn.Module, inputs: dict, repeats: int) -> float:
    model(**inputs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_worker(rank: int, world: int, port: int, name: str, repeats: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    config, latent = CONFIGS[name]
    model = model_of(config)
    if world > 1:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        shard_transformer(model, init_device_mesh("cpu", (world,)))
        apply_sequence_parallel(model)
    seconds = seconds_per_forward(model, make_inputs(config, latent), repeats)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    result = {"param_bytes": local_parameter_bytes(model), "peak_rss": peak_rss, "seconds": seconds}
    torch.save(result, out_dir / f"{name}-k{world}-rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def run_ranks(world: int, name: str, repeats: int, out_dir: Path) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    mp.spawn(rank_worker, args=(world, store.port, name, repeats, out_dir), nprocs=world)
    return [torch.load(out_dir / f"{name}-k{world}-rank{rank}.pt") for rank in range(world)]


def int8_row(name: str, repeats: int) -> tuple[float, float]:
    torch.set_num_threads(1)
    config, latent = CONFIGS[name]
    inputs = make_inputs(config, latent)
    model = model_of(config)
    fp32_seconds = seconds_per_forward(model, inputs, repeats)
    with torch.no_grad():
        expected = model(**inputs).sample
    quantize_transformer(model, "int8")
    int8_seconds = seconds_per_forward(model, inputs, repeats)
    with torch.no_grad():
        actual = model(**inputs).sample
    return ((actual - expected).norm() / expected.norm()).item(), int8_seconds / fp32_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mib = 2**20
    print(f"{'config':<6} {'K':>2} {'rank':>4} {'params MiB':>11} {'peak RSS MiB':>13} {'s/forward':>10}")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            whole, sharded = run_ranks(1, name, args.repeats, Path(tmp)), run_ranks(2, name, args.repeats, Path(tmp))
            for world, results in ((1, whole), (2, sharded)):
                for rank, r in enumerate(results):
                    print(
                        f"{name:<6} {world:>2} {rank:>4} {r['param_bytes'] / mib:>11.2f} {r['peak_rss'] / mib:>13.0f}"
                        f" {r['seconds']:>10.4f}"
                    )
            param_ratio = max(r["param_bytes"] for r in sharded) / whole[0]["param_bytes"]
            time_ratio = max(r["seconds"] for r in sharded) / whole[0]["seconds"]
            summary.append((name, param_ratio, time_ratio))
    print()
    for name, param_ratio, time_ratio in summary:
        error, speed = int8_row(name, args.repeats)
        print(
            f"{name}: K=2 FSDP rank params / K=1 params {param_ratio:.3f}; step time sharded / unsharded "
            f"{time_ratio:.2f}; int8 vs fp32: relative L2 difference {error:.4f}, time int8 / fp32 {speed:.2f}"
        )


if __name__ == "__main__":
    main()
