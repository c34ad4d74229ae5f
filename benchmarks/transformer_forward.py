"""MultiTalk forward vs the plain diffusers WanTransformer3DModel on the same config, weights and inputs.

A CPU-sized config where attention matters (dim 1024, 8 heads, 2 layers, 5 x 32 x 56 latents = 2,240 tokens).
Prints the time ratio for 1 and 2 persons, and the peak extra memory of the person localisation: ours (an
attention whose values are the masks) against the reference's materialised [heads, tokens, ref_tokens] map.
First, how long the 14B preset takes to build on the meta device (what loading a checkpoint starts with), against
this config's build with real weights.

    python benchmarks/transformer_forward.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from multitalk_model.checkpoints import build_model
from multitalk_model.config import MultiTalkConfig, get_preset
from multitalk_model.fixtures.random_model import plain_wan_twin
from multitalk_model.localization import region_scores, token_region_masks

CONFIG = MultiTalkConfig(
    num_layers=2,
    num_attention_heads=8,
    attention_head_dim=128,
    ffn_dim=2816,
    freq_dim=256,
    text_dim=512,
    image_dim=1280,
)
LATENT = (5, 32, 56)


def inputs(persons: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    t, h, w = LATENT
    frames = CONFIG.vae_scale * (t - 1) + 1
    masks = torch.zeros(1, persons + 1, h, w)
    if persons == 1:
        masks[:] = 1
    else:
        masks[0, 0, 2:30, 2:26] = 1
        masks[0, 1, 2:30, 30:54] = 1
        masks[0, 2] = 1 - masks[0, 0] - masks[0, 1]
    return {
        "hidden_states": torch.randn(1, CONFIG.in_channels, t, h, w, generator=gen),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 512, CONFIG.text_dim, generator=gen),
        "encoder_hidden_states_image": torch.randn(1, 257, CONFIG.image_dim, generator=gen),
        "audio": torch.randn(1, persons, frames, 5, CONFIG.audio_layers, CONFIG.audio_channels, generator=gen),
        "region_masks": masks,
    }


def reference_localisation(query, key, masks):
    """The reference's calculate_x_ref_attn_map: a materialised softmax map times each mask, 2 head chunks."""
    heads = query.shape[2]
    total = 0
    for chunk in range(2):
        q = query[:, :, chunk * heads // 2 : (chunk + 1) * heads // 2].transpose(1, 2)
        k = key[:, :, chunk * heads // 2 : (chunk + 1) * heads // 2].transpose(1, 2)
        attn = (q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1)).softmax(-1)  # [B, H/2, L, R]
        maps = [(attn * m[None, None, None]).sum(-1) / m.sum() for m in masks]
        total = total + torch.stack([x.mean(1) for x in maps])
    return total / 2


def _high_water_mark() -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _peak_rss_delta(which: str, queue) -> None:
    torch.manual_seed(0)
    t, h, w = LATENT
    tokens, ref = t * (h // 2) * (w // 2), (h // 2) * (w // 2)
    heads, head_dim = CONFIG.num_attention_heads, CONFIG.attention_head_dim
    query = torch.randn(1, tokens, heads, head_dim)
    key = torch.randn(1, ref, heads, head_dim)
    masks = inputs(2)["region_masks"]
    values = token_region_masks(masks, (h // 2, w // 2))
    token_masks = (torch.nn.functional.interpolate(masks, size=(h // 2, w // 2)) > 0).flatten(2)[0].float()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak to the current resident size
    before = _high_water_mark()
    with torch.no_grad():
        if which == "ours":
            region_scores(query, key, values)
        else:
            reference_localisation(query, key, token_masks)
    queue.put(_high_water_mark() - before)


def peak_extra_memory(which: str) -> int:
    """Peak RSS growth of one localisation call, in a fresh process so earlier allocations do not hide it.

    glibc's fixed mmap threshold makes every large buffer a fresh mapping, so reused heap pages cannot hide one.
    """
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_rss_delta, args=(which, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    build_model(get_preset("multitalk-14b"), "meta")
    meta_14b_s = time.perf_counter() - start
    torch.manual_seed(0)
    start = time.perf_counter()
    multitalk = build_model(CONFIG, "cpu").eval()
    print(
        f"14B preset on meta: {meta_14b_s:.2f} s ({meta_14b_s / (time.perf_counter() - start):.2f}x this config on cpu)"
    )
    plain = plain_wan_twin(multitalk)  # the same base weights

    print(f"config: dim {CONFIG.dim}, {CONFIG.num_attention_heads} heads, {CONFIG.num_layers} layers, latent {LATENT}")
    print(f"threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)")
    base_inputs, calls = inputs(1), {}
    calls["plain"] = lambda: plain(
        base_inputs["hidden_states"],
        base_inputs["timestep"],
        base_inputs["encoder_hidden_states"],
        base_inputs["encoder_hidden_states_image"],
    )
    for persons in (1, 2):
        batch = inputs(persons)
        calls[persons] = lambda batch=batch: multitalk(**batch)
    # Round-robin: each round times every variant once, so load from elsewhere on the machine hits all alike.
    times = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()  # warm-up
        for _ in range(args.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    plain_s = statistics.median(times["plain"])
    print(f"plain diffusers Wan forward: {plain_s * 1000:.0f} ms")
    for persons, target in ((1, 1.10), (2, 1.20)):
        seconds = statistics.median(times[persons])
        print(
            f"MultiTalk {persons} person(s): {seconds * 1000:.0f} ms = {seconds / plain_s:.3f}x plain "
            f"(target <= {target:.2f}x)"
        )

    ours, reference = peak_extra_memory("ours"), peak_extra_memory("reference")
    print(
        f"localisation peak extra memory per block: ours {ours / 2**20:.1f} MiB, "
        f"reference materialised map {reference / 2**20:.1f} MiB ({reference / max(ours, 1):.1f}x more)"
    )


if __name__ == "__main__":
    main()
