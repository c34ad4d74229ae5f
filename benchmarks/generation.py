"""Guidance passes batched into one forward vs run one after another, and how much the step cache skips.

On a CPU-sized config (dim 512, 8 heads, 4 layers, a 17-frame 128x224 clip = 560 tokens, two persons):
  * per-step time of the batched guidance passes against the same passes run sequentially (3 passes, and the
    2-pass scheme used with text scale 1), with the combined velocities checked equal;
  * the fraction of pass forwards the step cache skips over a 40-step, shift-7 schedule at the reference's
    default TeaCache threshold (0.2) and at 0.5. The tiny random model has no fitted polynomial, so this measures
    the raw-change rule; with the 14B weights the pipeline uses the reference's coefficients.

    python benchmarks/generation.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multitalk_model.checkpoints import build_model
from multitalk_model.config import get_preset
from multitalk_model.guidance import GuidanceScales, GuidedDenoiser, StepCache
from multitalk_model.sampling import euler_step, shifted_timesteps

CONFIG = get_preset("cpu-bench")
LATENT = (5, 16, 28)  # 17 frames of 128x224


def conditions(persons: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    t, h, w = LATENT
    masks = torch.zeros(1, persons + 1, h, w)
    masks[0, 0, :, : w // 2] = 1
    masks[0, 1, :, w // 2 :] = 1
    masks[0, 2, :2] = 1
    masks[0, :2, :2] = 0
    frames = CONFIG.vae_scale * (t - 1) + 1
    return {
        "text": torch.randn(1, 64, CONFIG.text_dim, generator=gen),
        "negative_text": torch.randn(1, 32, CONFIG.text_dim, generator=gen),
        "image": torch.randn(1, 257, CONFIG.image_dim, generator=gen),
        "audio": torch.randn(1, persons, frames, 5, CONFIG.audio_layers, CONFIG.audio_channels, generator=gen),
        "region_masks": masks,
    }


def step_seconds(denoiser: GuidedDenoiser, latent: torch.Tensor, repeats: int) -> float:
    denoiser(latent, 500.0)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        denoiser(latent, 500.0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def skipped_fraction(model, conds, threshold: float, steps: int = 40) -> float:
    cache = StepCache(threshold)
    denoiser = GuidedDenoiser(model, GuidanceScales(), **conds, step_cache=cache)
    timesteps = shifted_timesteps(steps, shift=7.0)
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 16, *LATENT, generator=gen)
    condition = torch.randn(1, CONFIG.in_channels - 16, *LATENT, generator=gen)
    for step in range(steps):
        velocity = denoiser(torch.cat([latent, condition], 1), timesteps[step])
        latent = euler_step(latent, velocity, timesteps[step], timesteps[step + 1])
    return cache.skipped_fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(CONFIG, "cpu").eval()
    conds = conditions()
    latent = torch.randn(1, CONFIG.in_channels, *LATENT)
    print(
        f"config: dim {CONFIG.dim}, {CONFIG.num_layers} layers, latent {LATENT}, 2 persons, "
        f"threads {torch.get_num_threads()}"
    )
    for scales in (GuidanceScales(text=5.0, audio=4.0), GuidanceScales(text=1.0, audio=4.0)):
        batched = GuidedDenoiser(model, scales, **conds, batched=True)
        sequential = GuidedDenoiser(model, scales, **conds, batched=False)
        torch.testing.assert_close(batched(latent, 500.0), sequential(latent, 500.0), rtol=1e-4, atol=1e-4)
        batched_s, sequential_s = (
            step_seconds(batched, latent, args.repeats),
            step_seconds(sequential, latent, args.repeats),
        )
        print(
            f"{len(batched.passes)} passes per step: batched {batched_s * 1000:.0f} ms, "
            f"sequential {sequential_s * 1000:.0f} ms"
            f" -> batched/sequential = {batched_s / sequential_s:.2f}x"
        )
    for threshold in (0.2, 0.5):
        print(
            f"step cache at threshold {threshold}: "
            f"{skipped_fraction(model, conds, threshold):.1%} of pass forwards skipped (40 steps)"
        )


if __name__ == "__main__":
    main()
