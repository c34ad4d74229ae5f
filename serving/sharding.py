"""FSDP2 weight sharding inside a device group: each of the K ranks holds ~1/K of the big weights.

    mesh = init_device_mesh("cuda", (K,))          # "cpu" with gloo works the same way
    shard_weights(pipeline.components, mesh)        # then, if wanted, apply_sequence_parallel / _guidance_parallel

`torch.distributed.fsdp.fully_shard` is applied per transformer block and per umT5 block (and to the umT5 root,
which holds the 256k x 4096 token embedding): each keeps 1/K of every weight, all-gathers the block's weights just
before it runs and frees them right after (`reshard_after_forward=True`), so a rank's peak holds its shards plus
one block. It is orthogonal to `serving.parallel`: every rank runs every block (on its chunk of the tokens or its
share of the guidance passes), so the all-gathers line up across ranks. This is the reference's `--dit_fsdp
--t5_fsdp` with Ulysses.

The transformer's own root (patch and condition embeddings, audio adapter, output head: 1% of the 14B model) stays
whole on every rank: the pipeline calls `embed` and `finalize` directly (the step-cache seam), outside the forward
hooks FSDP gathers on.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import UMT5EncoderModel

from multitalk_model.components import MultiTalkComponents
from multitalk_model.transformer import MultiTalkTransformer3DModel


def shard_weights(components: MultiTalkComponents, mesh: DeviceMesh, text_encoder: bool = True) -> None:
    """Shards the transformer blocks and (unless `text_encoder` is False: one kept whole on the CPU) the text encoder
    over `mesh` in place; shards move to the mesh's device."""
    shard_transformer(components.transformer, mesh)
    if text_encoder:
        shard_text_encoder(components.text_encoder, mesh)


def shard_transformer(transformer: MultiTalkTransformer3DModel, mesh: DeviceMesh) -> None:
    """One FSDP2 unit per block; the root's few weights stay whole (see the module docstring)."""
    quantised = [(name, param) for name, param in transformer.blocks.named_parameters() if _is_quantised(param)]
    if quantised:
        name, param = quantised[0]
        # torchao 0.18's Int8Tensor implements neither aten.split (FSDP2 chunks a weight into shards with it:
        # "Int8Tensor dispatch: attempting to run unimplemented operator/function: func=aten.split.Tensor") nor
        # the DTensor it would have to become when quantised after sharding ("'Int8Tensor' object has no
        # attribute '_local_tensor'"); tests/test_sharding_options.py holds both to it.
        raise ValueError(
            f"FSDP2 cannot shard torchao-quantised weights (blocks.{name}: {type(param.data).__name__}): "
            "quantization and shard_weights do not combine"
        )
    # Inference only. FSDP2 wants one dtype across the trainable parameters of a unit, and a bf16 model keeps its
    # norms, time embedding and modulation in fp32 (checkpoints.key_keeps_fp32): frozen, the mix is allowed.
    transformer.requires_grad_(False)
    for block in transformer.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)


def shard_text_encoder(text_encoder: UMT5EncoderModel, mesh: DeviceMesh) -> None:
    """One FSDP2 unit per umT5 block and one for the rest (the token embedding, the final norm)."""
    for block in text_encoder.encoder.block:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(text_encoder, mesh=mesh, reshard_after_forward=True)


def _is_quantised(param: torch.Tensor) -> bool:
    """A torchao tensor subclass (int8 / fp8 weights) rather than a plain tensor."""
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    return type(data).__module__.startswith("torchao")


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: the local shard of a sharded one, all of a whole one."""
    total = 0
    for param in module.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


__all__ = ["local_parameter_bytes", "shard_text_encoder", "shard_transformer", "shard_weights"]
