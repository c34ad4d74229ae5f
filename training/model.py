"""The transformer as training starts it: base weights frozen, the audio branch fresh or from earlier audio weights.

A fresh audio branch gets PyTorch's default initialisation with every block's audio output projection zeroed: the
audio cross-attention then adds exactly zero, so step 0 reproduces the base image-to-video model. Only the audio
branch (adapter, audio norms, audio cross-attentions) is trainable; `check_trainable` fails the run otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from multitalk_model.checkpoints import CheckpointError, build_model, key_keeps_fp32, load_weights
from multitalk_model.components import transformer_weights
from multitalk_model.config import get_preset
from multitalk_model.transformer import MultiTalkTransformer3DModel
from training.config import ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_training_model(config: ModelConfig, device: torch.device | str, seed: int) -> MultiTalkTransformer3DModel:
    """The transformer with its base weights from config.model_dir and its audio branch fresh or loaded."""
    architecture = get_preset(config.preset)
    model = build_model(architecture, "meta")
    audio_names = set(model.audio_parameter_names())
    sources = [transformer_weights(config.model_dir)]
    if config.audio_weights:
        sources.append((Path(config.audio_weights), "original"))
    dtype = DTYPES[config.precision]
    load_weights(model, sources, dtype=dtype, device=device, strict=False)

    missing = sorted(name for name, param in model.named_parameters() if param.is_meta and name not in audio_names)
    if missing:
        raise CheckpointError(f"{sources[0][0]}: the base transformer lacks {len(missing)} keys: {', '.join(missing)}")
    if config.audio_weights:
        missing_audio = sorted(name for name, param in model.named_parameters() if param.is_meta)
        if missing_audio:
            raise CheckpointError(f"{config.audio_weights}: missing audio keys: {', '.join(missing_audio)}")
    else:
        _init_audio_branch(model, dtype, device, seed)
    for name, param in model.named_parameters():
        param.requires_grad_(name in audio_names)
    check_trainable(model)
    return model


def _init_audio_branch(
    model: MultiTalkTransformer3DModel, dtype: torch.dtype, device: torch.device | str, seed: int
) -> None:
    """A fresh audio branch from `seed` (the same on every rank) with zero output projections.

    As the reference's init_weights: Xavier-uniform linear weights, zero biases, unit norms.
    """
    modules = [model.audio_adapter] + [m for block in model.blocks for m in (block.norm_audio, block.attn_audio)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in modules:
            module.to_empty(device=device)
            for child in module.modules():
                if isinstance(child, torch.nn.Linear):
                    torch.nn.init.xavier_uniform_(child.weight)
                    torch.nn.init.zeros_(child.bias)
                elif isinstance(child, torch.nn.LayerNorm):
                    child.reset_parameters()
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn_audio.to_out.weight)
        torch.nn.init.zeros_(block.attn_audio.to_out.bias)
    audio_names = set(model.audio_parameter_names())
    for name, param in model.named_parameters():
        if name in audio_names and not key_keeps_fp32(model, name):
            param.data = param.data.to(dtype)


def check_trainable(model: MultiTalkTransformer3DModel) -> None:
    """Fails unless exactly the audio branch requires gradients: no frozen weight may ever change."""
    audio_names = set(model.audio_parameter_names())
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    wrongly_trainable = sorted(trainable - audio_names)
    wrongly_frozen = sorted(audio_names - trainable)
    if wrongly_trainable:
        raise RuntimeError(f"parameters outside the audio branch would get gradients: {', '.join(wrongly_trainable)}")
    if wrongly_frozen:
        raise RuntimeError(f"audio parameters are frozen: {', '.join(wrongly_frozen)}")


def frozen_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """[frozen tensors, 2]: each frozen tensor's sum and sum of squares in float64; an update changes them."""
    rows = []
    for param in model.parameters():
        if not param.requires_grad:
            values = getattr(param, "ds_tensor", param).detach().double()  # ZeRO-3: this rank's partition
            rows.append(torch.stack([values.sum(), values.square().sum()]))
    return torch.stack(rows)
