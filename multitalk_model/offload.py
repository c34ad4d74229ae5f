"""Offload for single small GPUs: diffusers' block-level group offloading of the transformer.

Each block is one offload group: its weights live on the CPU and are copied to the device just before the block
runs (on a CUDA side stream, the next block's copy overlapping the current block's compute) and dropped after.
The root of the transformer (patch and condition embeddings, audio adapter, output head: 1% of the 14B model) moves
to the device for good, because the pipeline calls `embed` and `finalize` directly, outside the forward that
diffusers' root hook would onload them on.
"""

from __future__ import annotations

import torch
from diffusers.hooks import apply_group_offloading
from torch import nn

from .transformer import MultiTalkTransformer3DModel


def offload_transformer_blocks(transformer: MultiTalkTransformer3DModel, device: str | torch.device) -> None:
    """Keeps the blocks on the CPU, each onloaded to `device` while it runs; the rest of the model moves there."""
    device = torch.device(device)
    blocks = transformer.blocks
    transformer.blocks = nn.ModuleList()  # the root without its blocks moves to the device
    transformer.to(device)
    transformer.blocks = blocks.to("cpu")
    # diffusers groups the ModuleList children of the module it is given: a holder that owns only the blocks.
    holder = nn.Module()
    holder.blocks = blocks
    apply_group_offloading(
        holder,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=device.type == "cuda",
    )


__all__ = ["offload_transformer_blocks"]
