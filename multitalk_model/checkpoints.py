"""Weights in and out: original-format Wan2.1 + MultiTalk/InfiniteTalk checkpoints, and diffusers-format Wan.

One explicit key converter maps the original names (the released Wan2.1-I2V shards plus `multitalk.safetensors`)
onto this package's modules; its inverse exports the audio weights back to the official format. Loading goes
shard by shard onto a model built on the meta device, so a 14B checkpoint is never held twice in memory, and
every unknown, missing or mis-shaped key is reported at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MultiTalkConfig
from .transformer import MultiTalkTransformer3DModel

# Original name -> ours. Patterns are anchored; `{n}` is the block index. kv_linear maps to two of our keys
# (it is the fused [key; value] projection), handled by FUSED_KV below.
_BLOCK_RULES: list[tuple[str, str]] = [
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),  # the original's norm3 is the cross-attention norm, diffusers' norm2
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("modulation", "scale_shift_table"),
    ("norm_x", "norm_audio"),
    ("audio_cross_attn.q_linear", "attn_audio.to_q"),
    ("audio_cross_attn.proj", "attn_audio.to_out"),
]
_TOP_RULES: list[tuple[str, str]] = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.head", "proj_out"),
    ("audio_proj.proj1", "audio_adapter.first_frame_proj"),
    ("audio_proj.proj1_vf", "audio_adapter.latent_frame_proj"),
    ("audio_proj.proj2", "audio_adapter.hidden_proj"),
    ("audio_proj.proj3", "audio_adapter.token_proj"),
    ("audio_proj.norm", "audio_adapter.norm"),
]
_WHOLE_KEYS = {"head.modulation": "scale_shift_table"}
FUSED_KV = ("audio_cross_attn.kv_linear", ("attn_audio.to_k", "attn_audio.to_v"))
# Prefixes some original checkpoints carry (ComfyUI / single-file exports).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$|^blocks\.(\d+)\.(modulation)$")
_TOP_KEY = re.compile(r"^(.+)\.(weight|bias)$")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists every unknown, missing and mis-shaped key."""


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def convert_original_key(key: str) -> list[tuple[str, int | None]]:
    """Our key(s) for one original-format key, with the chunk index when a fused tensor splits (else None).

    Returns [] for a key the converter does not know.
    """
    key = _strip_prefix(key)
    if key in _WHOLE_KEYS:
        return [(_WHOLE_KEYS[key], None)]
    match = _BLOCK_KEY.match(key)
    if match:
        if match.group(5):  # blocks.N.modulation
            return [(f"blocks.{match.group(4)}.scale_shift_table", None)]
        index, module, param = match.group(1), match.group(2), match.group(3)
        if module == FUSED_KV[0]:
            return [(f"blocks.{index}.{target}.{param}", chunk) for chunk, target in enumerate(FUSED_KV[1])]
        for original, ours in _BLOCK_RULES:
            if module == original:
                return [(f"blocks.{index}.{ours}.{param}", None)]
        return []
    match = _TOP_KEY.match(key)
    if match:
        for original, ours in _TOP_RULES:
            if match.group(1) == original:
                return [(f"{ours}.{match.group(2)}", None)]
    return []


def convert_original_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original-format tensors -> (our tensors, unknown original keys)."""
    converted, unknown = {}, []
    for key, tensor in state.items():
        targets = convert_original_key(key)
        if not targets:
            unknown.append(key)
        for target, chunk in targets:
            converted[target] = tensor if chunk is None else tensor.chunk(2, dim=0)[chunk]
    return converted, unknown


def original_key(our_key: str) -> tuple[str, int | None]:
    """Inverse of convert_original_key for one of our keys: (original key, chunk index)."""
    match = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", our_key)
    if match:
        index, module, param = match.groups()
        if module in FUSED_KV[1]:
            return f"blocks.{index}.{FUSED_KV[0]}.{param}", FUSED_KV[1].index(module)
        for original, ours in _BLOCK_RULES:
            if module == ours:
                return f"blocks.{index}.{original}.{param}", None
    match = re.match(r"^blocks\.(\d+)\.scale_shift_table$", our_key)
    if match:
        return f"blocks.{match.group(1)}.modulation", None
    for original, ours in _WHOLE_KEYS.items():
        if our_key == ours:
            return original, None
    match = _TOP_KEY.match(our_key)
    if match:
        for original, ours in _TOP_RULES:
            if match.group(1) == ours:
                return f"{original}.{match.group(2)}", None
    raise KeyError(f"{our_key} has no original-format name")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: a file, a `*.safetensors.index.json`, or a directory of shards."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        return [path.parent / name for name in sorted(set(weight_map.values()))]
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
    raise FileNotFoundError(f"{path}: no safetensors checkpoint (a file, an index.json or a folder of shards)")


def _iter_tensors(files: Iterable[Path], prefix: str = "") -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """One shard at a time: (file, {key without prefix: tensor}) for the keys that start with prefix."""
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            yield file, {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}


def load_weights(
    model: MultiTalkTransformer3DModel,
    sources: Iterable[tuple[str | Path, str]],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
) -> MultiTalkTransformer3DModel:
    """Loads checkpoints into `model` (typically built on the meta device), shard by shard.

    sources: (path, format) pairs, format "original" (Wan2.1 original names and/or multitalk.safetensors /
    infinitetalk.safetensors) or "diffusers" (a diffusers-format Wan2.1-I2V `transformer` folder or file: its base
    keys are ours). With strict, every parameter must be loaded exactly once with the right shape. Rotary tables
    still on the meta device are built on `device`: they are buffers no checkpoint holds.
    """
    expected = {name: param for name, param in model.named_parameters()}
    loaded: set[str] = set()
    unknown: list[str] = []
    mismatched: list[str] = []
    for path, key_format in sources:
        if key_format not in ("original", "diffusers"):
            raise ValueError(f"unknown checkpoint format {key_format!r} (original | diffusers)")
        for file, shard in _iter_tensors(checkpoint_files(path)):
            if key_format == "original":
                shard, shard_unknown = convert_original_state_dict(shard)
                unknown += [f"{file.name}: {key}" for key in shard_unknown]
            else:  # diffusers' own loader skips these too (unused q-norm of the image tokens)
                ignored = model._keys_to_ignore_on_load_unexpected or []
                shard = {k: v for k, v in shard.items() if not any(pattern in k for pattern in ignored)}
            for key in list(shard):
                if key not in expected:
                    unknown.append(f"{file.name}: {key}")
                    del shard[key]
                elif shard[key].shape != expected[key].shape:
                    mismatched.append(
                        f"{key}: checkpoint {tuple(shard[key].shape)} vs model {tuple(expected[key].shape)}"
                    )
                    del shard[key]
            _assign(model, shard, dtype, device)
            loaded.update(shard)
            del shard
    missing = sorted(set(expected) - loaded)
    problems = []
    if unknown:
        problems.append(f"unknown keys ({len(unknown)}): " + ", ".join(unknown))
    if mismatched:
        problems.append(f"mis-shaped keys ({len(mismatched)}): " + ", ".join(mismatched))
    if missing and strict:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if problems:
        raise CheckpointError("checkpoint does not fit the MultiTalk transformer:\n" + "\n".join(problems))
    if any(buffer.is_meta for buffer in model.rope.buffers()):
        build_rotary_tables(model, device)
    return model


def build_rotary_tables(model: MultiTalkTransformer3DModel, device: torch.device | str) -> None:
    """Computes the rotary tables on `device`: buffers made at construction, which no checkpoint holds and which a
    model built on the meta device (or given storage by `to_empty`) lacks."""
    config = model.architecture
    with torch.device(device):
        model.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)


def _assign(model: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, device) -> None:
    """Puts tensors into the model's parameters, replacing meta tensors in place of copying into them."""
    for key, tensor in tensors.items():
        module_name, _, param_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, param_name)
        target_dtype = dtype if dtype is not None and old.dtype.is_floating_point else old.dtype
        if key_keeps_fp32(model, key):
            target_dtype = torch.float32
        value = tensor.to(device=device, dtype=target_dtype)
        setattr(module, param_name, torch.nn.Parameter(value, requires_grad=old.requires_grad))


def key_keeps_fp32(model: torch.nn.Module, key: str) -> bool:
    """Whether the model keeps this parameter in fp32 whatever the load dtype (norms, time embedding, modulation)."""
    return any(part in key.split(".") for part in getattr(model, "_keep_in_fp32_modules", []))


def build_model(config: MultiTalkConfig, device: torch.device | str = "meta") -> MultiTalkTransformer3DModel:
    """The transformer with no weights (meta) or random weights (a real device)."""
    with torch.device(device):
        return MultiTalkTransformer3DModel.from_multitalk_config(config)


def load_original(
    config: MultiTalkConfig,
    checkpoints: Iterable[str | Path],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> MultiTalkTransformer3DModel:
    """Builds the model on the meta device and loads original-format checkpoints (Wan2.1 shards + multitalk)."""
    return load_weights(build_model(config, "meta"), [(path, "original") for path in checkpoints], dtype, device)


def audio_state_dict(model: MultiTalkTransformer3DModel) -> dict[str, torch.Tensor]:
    """The trainable audio weights under their official names (multitalk.safetensors), kv fused again."""
    params = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor | None] | torch.Tensor] = {}
    for name in model.audio_parameter_names():
        original, chunk = original_key(name)
        tensor = params[name].detach().cpu().contiguous()
        if chunk is None:
            out[original] = tensor
        else:
            out.setdefault(original, [None, None])[chunk] = tensor
    return {key: torch.cat(value) if isinstance(value, list) else value for key, value in out.items()}


def export_audio_weights(model: MultiTalkTransformer3DModel, path: str | Path) -> Path:
    """Writes the audio weights as an official-format multitalk.safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(audio_state_dict(model), str(path), metadata={"format": "pt"})
    return path
