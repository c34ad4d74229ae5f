"""Weight quantisation of the transformer's linear layers through torchao.

    quantize_transformer(model, "int8")   # weight-only int8, per-channel scales: CPU and GPU
    quantize_transformer(model, "fp8")    # float8 e4m3 weights and dynamic activations: GPUs with fp8 (sm_89+)

Only the linear layers of the blocks that MultiTalk shares with Wan are quantised; the audio branch (adapter, audio
cross-attention and its norm) and every norm, embedding and the output head stay in the model's dtype, so the part
that carries lip sync keeps its precision and the trainable parameters stay plain tensors. The quality guard in
tests/test_quantization.py holds the tiny model's int8 output within 2% (relative L2) of its float32 output.

Why `quantize_` after loading rather than diffusers' `TorchAoConfig` at loading: with diffusers 0.42.1 and
torchao 0.18, `MultiTalkTransformer3DModel.from_pretrained(transformer_dir, quantization_config=TorchAoConfig(
Int8WeightOnlyConfig(), modules_to_not_convert=[the 20 non-block and audio linears]))` does load a model in our own
layout (components.py form 1) with exactly the linears `quantizable` picks as Int8Tensor (tried on the tiny model;
it also forces the other layers to bfloat16 unless torch_dtype is given). It does not fit our loading, though:
- the released models come in forms 2 and 3 (diffusers or original-format Wan weights, keys converted, plus the
  audio weights from a second file, multitalk.safetensors), which `checkpoints.load_weights` assembles and
  `from_pretrained` cannot read;
- LoRAs (a distillation LoRA, a job's LoRAs) merge into the plain weights after loading and before quantising;
  quantised at load, they would have to merge into int8 weights.
So one path quantises every form, after the LoRAs: `quantize_` with the same filter.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .transformer import MultiTalkTransformer3DModel

Quantization = Literal["none", "int8", "fp8"]


def quantizable(module: nn.Module, name: str) -> bool:
    """A linear layer of a block outside the audio branch."""
    return isinstance(module, nn.Linear) and name.startswith("blocks.") and ".attn_audio." not in name


def quantize_transformer(model: MultiTalkTransformer3DModel, quantization: Quantization) -> None:
    """Quantises the blocks' linear weights in place ("none" leaves the model as it is)."""
    if quantization == "none":
        return
    # torchao is imported only when asked for: it loads its kernels at import.
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, quantize_

    if quantization == "int8":
        config = Int8WeightOnlyConfig()
    elif quantization == "fp8":
        device = next(model.parameters()).device
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(
                f"fp8 quantisation needs a GPU with fp8 support (sm_89 or newer), the model is on {device}"
            )
        config = Float8DynamicActivationFloat8WeightConfig()
    else:
        raise ValueError(f"quantization must be none, int8 or fp8, got {quantization!r}")
    quantize_(model, config, filter_fn=quantizable)


__all__ = ["Quantization", "quantizable", "quantize_transformer"]
