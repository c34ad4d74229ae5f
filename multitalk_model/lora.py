"""Merging the released few-step LoRAs (FusionX, lightx2v) into the transformer's weights, as wan/wan_lora.py does.

The files name original-format Wan modules under `diffusion_model.`:
    <module>.lora_down.weight + <module>.lora_up.weight   W += scale * up @ down (no alpha or rank normalisation)
    <module>.diff                                        W += scale * diff
    <module>.diff_b                                      b += scale * diff_b
Module names go through the checkpoint key converter; a fused original module (the audio kv_linear) splits its
delta over our two projections. Deltas are computed in float32 and added in the parameter's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoints import convert_original_key
from .transformer import MultiTalkTransformer3DModel

_PREFIX = "diffusion_model."
_DOWN, _UP = ".lora_down.weight", ".lora_up.weight"
# The reference reads no `.alpha` entries (it never normalises by alpha / rank), so they are skipped here too.
_IGNORED_SUFFIXES = (".alpha",)


def merge_lora(
    model: MultiTalkTransformer3DModel, lora_state: dict[str, torch.Tensor] | str | Path, scale: float = 1.0
) -> list[str]:
    """Adds a LoRA's deltas to the model's weights in place; returns the names of our modules it changed."""
    source = str(lora_state) if isinstance(lora_state, (str, Path)) else "LoRA state dict"
    state = load_file(str(lora_state)) if isinstance(lora_state, (str, Path)) else lora_state
    deltas, problems = _original_deltas(state, scale)
    params = dict(model.named_parameters())
    updates: list[tuple[str, torch.Tensor]] = []
    for original_key, delta in deltas.items():
        targets = convert_original_key(original_key)
        if not targets or any(target not in params for target, _ in targets):
            problems.append(f"{original_key}: no such module in the MultiTalk transformer")
            continue
        for target, chunk in targets:
            part = delta if chunk is None else delta.chunk(len(targets), dim=0)[chunk]
            if part.shape != params[target].shape:
                problems.append(f"{original_key}: delta {tuple(part.shape)} vs {target} {tuple(params[target].shape)}")
                continue
            updates.append((target, part))
    if problems:  # nothing is merged unless everything fits
        raise ValueError(f"{source} does not fit the model:\n" + "\n".join(problems))
    with torch.no_grad():
        for target, delta in updates:
            params[target].add_(delta.to(device=params[target].device, dtype=params[target].dtype))
    return sorted({target.rpartition(".")[0] for target, _ in updates})


def _original_deltas(state: dict[str, torch.Tensor], scale: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """{original parameter key: scaled float32 delta} and the entries that cannot be read."""
    deltas: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in state.items():
        if key.endswith(_IGNORED_SUFFIXES) or key.endswith(_UP):
            continue  # up halves are read with their down half
        if not key.startswith(_PREFIX):
            problems.append(f"{key}: not a {_PREFIX}* LoRA key")
            continue
        name = key[len(_PREFIX) :]
        if key.endswith(_DOWN):
            up_key = key[: -len(_DOWN)] + _UP
            if up_key not in state:
                problems.append(f"{key}: no matching {up_key}")
                continue
            delta = state[up_key].float() @ tensor.float()
            original_key = name[: -len(_DOWN)] + ".weight"
        elif key.endswith(".diff_b"):
            delta, original_key = tensor.float(), name[: -len(".diff_b")] + ".bias"
        elif key.endswith(".diff"):
            delta, original_key = tensor.float(), name[: -len(".diff")] + ".weight"
        else:
            problems.append(f"{key}: unknown LoRA entry (lora_down/lora_up.weight, diff, diff_b)")
            continue
        deltas[original_key] = delta * scale
    for key in state:  # an up half whose down half is missing
        if key.endswith(_UP) and key[: -len(_UP)] + _DOWN not in state:
            problems.append(f"{key}: no matching lora_down.weight")
    return deltas, problems


__all__ = ["merge_lora"]
