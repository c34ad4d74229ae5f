"""A memory plan from shapes: what one device of a K-device replica holds, for every combination of the options.

    python -m multitalk_model.plan_memory --gpus 4 --gpu-memory 24GiB [--resolution 480p] [--model multitalk-14b]

Weights come from the models built on the meta device (no memory, no download): the transformer (accounting.py),
umT5-XXL, CLIP ViT-H/14, the Wan VAE and wav2vec2-base at their published shapes. Activations are estimated from
the tensors one block keeps alive at its widest point for the batch of guidance passes; the VAE decode from its
widest feature map. Options:

- sharding: FSDP2 over the K devices (serving/sharding.py): the blocks and umT5 hold 1/K each, plus two gathered
  blocks (the running one and the next, prefetched); not with quantization (FSDP2 cannot split torchao's tensors);
- quantization: int8 / fp8 linear weights of the blocks (the audio branch and norms stay in the model dtype);
- offload: diffusers' block-level group offloading: only the root and two blocks of the transformer on the device;
  umT5 and the other encoders come to the device only while they encode, before the blocks run, so they do not
  add to the sampling peak;
- parallel: sequence parallel (each device 1/K of the tokens) or guidance parallel (each device 1/K of the passes);
- text encoder on the CPU: umT5 encodes the prompts on the CPU, its weights never on the device (with offload it
  already leaves the device before the blocks run, so the option is listed without offload only).

The figures are estimates for planning (what fits in which fleet), not measurements; a margin is kept for the CUDA
context, the allocator's fragmentation and the kernels' workspaces.
"""

from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import nn

from .accounting import video_tokens
from .config import MultiTalkConfig, get_preset
from .quantization import Quantization
from .transformer import MultiTalkTransformer3DModel

Offload = Literal["none", "group"]
Parallel = Literal["sequence", "guidance"]

GiB = 2**30
# The CUDA context, NCCL buffers, the allocator's fragmentation and attention workspaces.
RESERVED_BYTES = int(1.5 * GiB)
RESERVED_FRACTION = 0.08
# The largest bucket of each size family (640x640 and 960x960 have the most pixels) at 81 frames.
RESOLUTIONS = {"480p": (81, 640, 640), "720p": (81, 960, 960)}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Published shapes of the encoders the 14B model runs with (parameters counted on the meta device).
_UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
_CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16)
_VAE_PARAMS = 126_900_000  # AutoencoderKLWan (Wan2.1), float32
_WAV2VEC2_BASE_PARAMS = 94_400_000  # float32
_VAE_WIDEST_CHANNELS = 384  # the decoder's widest stage runs at full resolution with 96 channels, 4x fewer pixels x 384


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '24 GiB', '512MiB' -> bytes (GB = 1e9, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a memory size like 24GiB or 80GB")
    number, unit = float(match[1]), match[2].upper()
    power = "KMGT".index(unit[0]) + 1
    return int(number * (1024**power if "I" in unit else 1000**power))


@dataclass(frozen=True)
class Options:
    sharding: bool = False
    quantization: Quantization = "none"
    offload: Offload = "none"
    parallel: Parallel = "sequence"
    text_encoder_on_cpu: bool = False

    def describe(self) -> str:
        return (
            f"{'fsdp' if self.sharding else 'replicated'}, {self.quantization}, offload {self.offload}, "
            f"{self.parallel} parallel" + (", umT5 on cpu" if self.text_encoder_on_cpu else "")
        )


@dataclass(frozen=True)
class DevicePlan:
    options: Options
    weights: int  # bytes of weights resident on one device
    activations: int  # peak bytes of activations on one device
    capacity: int  # the device's memory less the reserve

    @property
    def peak(self) -> int:
        return self.weights + self.activations

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


@dataclass(frozen=True)
class _TransformerWeights:
    root: int  # parameters outside the blocks
    block_quantizable: int  # per block: the linear weights outside the audio branch
    block_other: int  # per block: the rest (audio branch, norms, biases, modulation)
    blocks: int


@cache
def _transformer_weights(config: MultiTalkConfig) -> _TransformerWeights:
    with torch.device("meta"):
        model = MultiTalkTransformer3DModel.from_multitalk_config(config)
    block = model.blocks[0]
    quantizable = sum(
        module.weight.numel()
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and not name.startswith("attn_audio")
    )
    block_total = sum(p.numel() for p in block.parameters())
    root = sum(p.numel() for p in model.parameters()) - block_total * len(model.blocks)
    return _TransformerWeights(root, quantizable, block_total - quantizable, len(model.blocks))


@cache
def _encoder_params() -> tuple[int, int]:
    """(umT5-XXL encoder, CLIP ViT-H/14 vision tower) parameter counts."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        umt5 = UMT5EncoderModel(UMT5Config(**_UMT5_XXL))
        clip = CLIPVisionModel(CLIPVisionConfig(**_CLIP_VIT_H, image_size=224, patch_size=14))
    return sum(p.numel() for p in umt5.parameters()), sum(p.numel() for p in clip.parameters())


def plan(
    options: Options,
    gpus: int,
    gpu_memory: int,
    config: MultiTalkConfig,
    resolution: str = "480p",
    passes: int = 3,
    dtype: str = "bfloat16",
) -> DevicePlan:
    """One device's weights and peak activations for a K-device replica generating `resolution` clips."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {sorted(RESOLUTIONS)}, got {resolution!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    if options.sharding and options.quantization != "none":
        raise ValueError(f"{options.describe()}: FSDP2 cannot shard torchao's quantised weights (serving/sharding.py)")
    width = _BYTES[dtype]
    weight_width = {"none": width, "int8": 1, "fp8": 1}[options.quantization]
    tw = _transformer_weights(config)
    block = tw.block_quantizable * weight_width + tw.block_other * width
    shards = gpus if options.sharding else 1
    umt5, clip = _encoder_params()

    if options.offload == "group":  # the root and two blocks (running + prefetched); umT5 visits before them
        transformer = tw.root * width + 2 * block
        text_encoder = 0
    else:
        gathered = 2 * block if options.sharding and gpus > 1 else 0
        transformer = tw.root * width + tw.blocks * block // shards + gathered
        text_encoder = 0 if options.text_encoder_on_cpu else umt5 * width // shards
    others = (clip + _VAE_PARAMS + _WAV2VEC2_BASE_PARAMS) * 4  # float32, as the reference runs them
    weights = transformer + text_encoder + others

    frames, height, width_px = RESOLUTIONS[resolution]
    latent = ((frames - 1) // config.vae_scale + 1, height // 8, width_px // 8)
    tokens = video_tokens(config, latent)
    batch = passes
    if gpus > 1 and options.parallel == "sequence":
        tokens = -(-tokens // gpus)
    elif gpus > 1:
        batch = -(-passes // gpus)
    # One block at its widest: the fp32 residual and its fp32 norm, q/k/v and the attention output (model dtype),
    # the FFN's hidden layer before and after the activation, the block's output; the video tokens also feed
    # the audio attention's L-RoPE labels (small).
    per_token = 2 * config.dim * 4 + 5 * config.dim * width + 2 * config.ffn_dim * width
    context = (config.text_len + 257) * config.dim * width * 3  # encoder states and their keys/values
    blocks_peak = batch * (tokens * per_token + context)
    vae_peak = 4 * _VAE_WIDEST_CHANNELS * height * width_px * 4  # a few float32 maps of the widest stage
    activations = max(blocks_peak, vae_peak)
    capacity = int(gpu_memory * (1 - RESERVED_FRACTION)) - RESERVED_BYTES
    return DevicePlan(options, weights, activations, capacity)


def all_options(gpus: int, quantizations: tuple[Quantization, ...] = ("none", "int8", "fp8")) -> list[Options]:
    """Every combination worth listing for K devices (sharding and parallel modes only when K > 1)."""
    shardings = (False, True) if gpus > 1 else (False,)
    parallels: tuple[Parallel, ...] = ("sequence", "guidance") if gpus > 1 else ("sequence",)
    return [
        Options(sharding, quantization, offload, parallel, text_encoder_on_cpu)
        for sharding, quantization, offload, parallel, text_encoder_on_cpu in itertools.product(
            shardings, quantizations, ("none", "group"), parallels, (False, True)
        )
        # Offloading a shard of the blocks gains nothing; offload already takes umT5 off the device for sampling;
        # FSDP2 cannot shard torchao's quantised weights (serving/sharding.py).
        if not (sharding and offload == "group")
        and not (offload == "group" and text_encoder_on_cpu)
        and not (sharding and quantization != "none")
    ]


def format_plans(plans: list[DevicePlan]) -> str:
    rows = [f"{'option':<64} {'weights':>9} {'activ.':>9} {'peak':>9}  fits in {plans[0].capacity / GiB:.1f} GiB"]
    for entry in plans:
        gib = lambda n: f"{n / GiB:8.1f}G"  # noqa: E731 - one column's format
        verdict = "yes" if entry.fits else "no"
        rows.append(
            f"{entry.options.describe():<64} {gib(entry.weights)} {gib(entry.activations)} {gib(entry.peak)}  {verdict}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Memory plan per device for a K-device generator replica.")
    parser.add_argument("--gpus", type=int, required=True, help="devices per replica (K)")
    parser.add_argument("--gpu-memory", required=True, type=parse_bytes, help="memory of one device, e.g. 24GiB")
    parser.add_argument("--resolution", default="480p", choices=sorted(RESOLUTIONS))
    parser.add_argument("--model", default="multitalk-14b", help="model preset (multitalk_model.config)")
    parser.add_argument("--passes", type=int, default=3, help="guidance passes per step (2 with text guidance 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_BYTES))
    args = parser.parse_args(argv)
    config = get_preset(args.model)
    plans = [
        plan(options, args.gpus, args.gpu_memory, config, args.resolution, args.passes, args.dtype)
        for options in all_options(args.gpus)
    ]
    print(f"{args.model} on {args.gpus} x {args.gpu_memory / GiB:.1f} GiB, {args.resolution}, {args.passes} passes")
    print(format_plans(plans))
    fitting = [entry for entry in plans if entry.fits]
    print(f"{len(fitting)} of {len(plans)} combinations fit")


if __name__ == "__main__":
    main()
