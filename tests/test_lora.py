"""Merging released-format LoRAs (original Wan module names) into the transformer."""

import pytest
import torch
from safetensors.torch import save_file

from multitalk_model.checkpoints import build_model
from multitalk_model.config import get_preset
from multitalk_model.lora import merge_lora

TINY = get_preset("tiny")


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY, "cpu")


def low_rank(out_features: int, in_features: int, rank: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, rank, generator=gen), torch.randn(rank, in_features, generator=gen)


def test_merging_a_lora_file_adds_scale_times_up_down(tiny_model, tmp_path):
    dim, audio_dim = TINY.dim, TINY.audio_dim
    q_up, q_down = low_rank(dim, dim, seed=1)
    kv_up, kv_down = low_rank(2 * dim, audio_dim, seed=2)  # the fused audio key/value projection
    lora = {
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": q_up,
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": q_down,
        "diffusion_model.blocks.1.audio_cross_attn.kv_linear.lora_up.weight": kv_up,
        "diffusion_model.blocks.1.audio_cross_attn.kv_linear.lora_down.weight": kv_down,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(8.0),  # ignored, as by the reference
    }
    save_file(lora, str(tmp_path / "lora.safetensors"))
    params = dict(tiny_model.named_parameters())
    before = {name: params[name].detach().clone() for name in params}

    merged = merge_lora(tiny_model, tmp_path / "lora.safetensors", scale=1.2)

    assert merged == ["blocks.0.attn1.to_q", "blocks.1.attn_audio.to_k", "blocks.1.attn_audio.to_v"]
    kv_delta = 1.2 * kv_up @ kv_down
    expected = {
        "blocks.0.attn1.to_q.weight": before["blocks.0.attn1.to_q.weight"] + 1.2 * q_up @ q_down,
        "blocks.1.attn_audio.to_k.weight": before["blocks.1.attn_audio.to_k.weight"] + kv_delta[:dim],
        "blocks.1.attn_audio.to_v.weight": before["blocks.1.attn_audio.to_v.weight"] + kv_delta[dim:],
    }
    for name, param in params.items():
        torch.testing.assert_close(param.detach(), expected.get(name, before[name]))


def test_diff_and_diff_b_add_full_deltas(tiny_model):
    norm_delta = torch.linspace(-1, 1, TINY.dim)
    head_delta = torch.arange(TINY.out_channels * 4, dtype=torch.float32)  # 16 channels x 1x2x2 patch
    before_norm = tiny_model.blocks[1].norm2.weight.detach().clone()
    before_head = tiny_model.proj_out.bias.detach().clone()
    merged = merge_lora(
        tiny_model,
        {"diffusion_model.blocks.1.norm3.diff": norm_delta, "diffusion_model.head.head.diff_b": head_delta},
        scale=0.5,
    )
    assert merged == ["blocks.1.norm2", "proj_out"]  # the original norm3 is our norm2
    torch.testing.assert_close(tiny_model.blocks[1].norm2.weight.detach(), before_norm + 0.5 * norm_delta)
    torch.testing.assert_close(tiny_model.proj_out.bias.detach(), before_head + 0.5 * head_delta)


def test_unknown_modules_are_listed_and_nothing_is_merged(tiny_model):
    up, down = low_rank(TINY.dim, TINY.dim)
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    lora = {
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
        "diffusion_model.blocks.0.mystery.lora_up.weight": up,
        "diffusion_model.blocks.0.mystery.lora_down.weight": down,
        "diffusion_model.blocks.7.self_attn.k.diff_b": torch.zeros(TINY.dim),  # the tiny model has 2 blocks
    }
    with pytest.raises(ValueError) as error:
        merge_lora(tiny_model, lora)
    assert "blocks.0.mystery.weight" in str(error.value)
    assert "blocks.7.self_attn.k.bias" in str(error.value)
    for name, param in tiny_model.named_parameters():
        assert torch.equal(param, before[name])
