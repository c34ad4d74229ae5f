"""Behaviour of the MultiTalk transformer on the tiny preset."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitalk_model.accounting import parameter_counts
from multitalk_model.audio_adapter import latent_frame_windows
from multitalk_model.checkpoints import (
    CheckpointError,
    build_model,
    export_audio_weights,
    load_original,
    load_weights,
)
from multitalk_model.config import MultiTalkConfig, get_preset
from multitalk_model.transformer import MultiTalkAudioAttention, frame_local_audio_attention
from tests.helpers import transformer_inputs

TINY = get_preset("tiny")
LATENT = (3, 8, 8)  # T, H, W: 16 tokens per latent frame


def make_inputs(persons: int, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    return transformer_inputs(LATENT, persons=persons, batch=batch, seed=seed)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY, "cpu").eval()


def test_output_has_latent_shape(tiny_model):
    inputs = make_inputs(persons=2)
    with torch.no_grad():
        out = tiny_model(**inputs).sample
    assert out.shape == (1, TINY.out_channels, *LATENT)
    assert torch.isfinite(out).all()


def test_audio_adapter_keeps_the_reference_window_rows():
    # Row r of frame f's window holds wav2vec frame f + r - 2; check which frames each latent frame keeps.
    frames, window = 9, 5
    audio = torch.arange(frames)[:, None] + torch.arange(window)[None] - window // 2
    audio = audio.float()[None, :, :, None, None]  # [1, F, W, 1, 1]
    first, later = latent_frame_windows(audio, vae_scale=4)
    assert first.flatten().tolist() == [-2, -1, 0, 1, 2]
    # Latent frame 1 covers video frames 1..4: t-2..t of frame 1, centres of 2 and 3, t..t+2 of frame 4.
    assert later[0, 0].flatten().tolist() == [-1, 0, 1, 2, 3, 4, 5, 6]
    assert later[0, 1].flatten().tolist() == [3, 4, 5, 6, 7, 8, 9, 10]


def audio_attention_output(model, inputs) -> torch.Tensor:
    captured = []
    handle = model.blocks[0].attn_audio.register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return captured[0][0]  # [tokens, dim]


def stream_influence(model, inputs, stream: int) -> torch.Tensor:
    """Per video token: how much the block-0 audio attention output moves when one stream's audio changes."""
    base = audio_attention_output(model, inputs)
    perturbed = dict(inputs, audio=inputs["audio"].clone())
    perturbed["audio"][:, stream] += 3.0 * torch.randn_like(perturbed["audio"][:, stream])
    return (audio_attention_output(model, perturbed) - base).norm(dim=-1)


def test_swapping_region_masks_swaps_which_stream_drives_which_tokens():
    torch.manual_seed(0)
    model = build_model(TINY, "cpu").eval()
    # Make the audio attention's content match uniform (constant queries and keys): what is left to decide which
    # stream a token listens to is L-RoPE, i.e. the binding.
    attn = model.blocks[0].attn_audio
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k):
            linear.weight.zero_()
            linear.bias.fill_(1.5)
    inputs = make_inputs(persons=2)
    swapped = dict(inputs, region_masks=inputs["region_masks"][:, [1, 0, 2]])

    dominance = stream_influence(model, inputs, 0) - stream_influence(model, inputs, 1)
    dominance_swapped = stream_influence(model, swapped, 0) - stream_influence(model, swapped, 1)

    # Tokens that listen mostly to stream 0 now listen mostly to stream 1, and the other way round.
    decided = dominance.abs() > 0.1 * dominance.abs().max()
    assert decided.sum() > 0.5 * decided.numel()
    flipped = torch.sign(dominance[decided]) == -torch.sign(dominance_swapped[decided])
    assert flipped.float().mean() > 0.9
    # Both streams drive some tokens: the binding splits the frame, it does not pick one stream for all.
    assert (dominance[decided] > 0).any() and (dominance[decided] < 0).any()


def test_one_person_output_is_the_same_for_any_region_masks(tiny_model):
    # One person takes no localisation and no L-RoPE: the regions cannot change what it hears, or whether it runs.
    inputs = make_inputs(persons=1)
    t, h, w = LATENT
    masks = {
        "whole frame": torch.ones(1, 2, h, w),
        "left and right": torch.stack([torch.ones(h, w).tril(), torch.ones(h, w).triu(1)])[None],
        "random": torch.randint(0, 2, (1, 2, h, w), generator=torch.Generator().manual_seed(3)).float(),
    }
    with torch.no_grad():
        without = tiny_model(**dict(inputs, region_masks=None)).sample
        for name, region_masks in masks.items():
            assert torch.equal(tiny_model(**dict(inputs, region_masks=region_masks)).sample, without), name


def test_folded_audio_projections_equal_the_plain_audio_attention_and_its_gradients():
    """One person takes the folded path (heads x audio tokens < dim); zero labels make label RoPE the identity and
    force the plain path, so both must agree, masked keys and weight gradients included."""
    torch.manual_seed(0)
    attn = MultiTalkAudioAttention(dim=64, audio_dim=24, heads=4)
    hidden = torch.randn(2, 3 * 10, 64)  # 3 latent frames of 10 tokens
    audio = torch.randn(2, 3, 8, 24)  # 8 audio tokens per frame: 4 x 8 < 64
    key_mask = torch.ones(2, 8, dtype=torch.bool)
    key_mask[1, 5:] = False  # the second sample has fewer streams: padded keys
    zero_query_labels, zero_key_labels = torch.zeros(2, 30), torch.zeros(2, 8)

    outputs, gradients = [], []
    for labels in ((None, None), (zero_query_labels, zero_key_labels)):
        attn.zero_grad()
        out = frame_local_audio_attention(attn, hidden, audio, *labels, key_mask=key_mask)
        out.square().sum().backward()
        outputs.append(out.detach())
        gradients.append({name: param.grad.clone() for name, param in attn.named_parameters()})

    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-4)


def test_mixed_stream_counts_in_one_batch_equal_separate_forwards(tiny_model):
    # The guidance passes: two streams (cond) and one silent stream (null audio) share one forward.
    two = make_inputs(persons=2, seed=1)
    one = make_inputs(persons=1, seed=1)
    one["audio"] = torch.zeros_like(one["audio"])
    batch = {key: torch.cat([two[key], two[key]]) for key in two}
    batch["audio"] = torch.cat([two["audio"], torch.cat([one["audio"], torch.zeros_like(one["audio"])], 1)])
    with torch.no_grad():
        out_batch = tiny_model(**batch, audio_streams=torch.tensor([2, 1])).sample
        out_two = tiny_model(**two).sample
        one_alone = dict(two, audio=one["audio"], region_masks=None)
        out_one = tiny_model(**one_alone).sample
    torch.testing.assert_close(out_batch[0], out_two[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_batch[1], out_one[0], rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_model(TINY, "cpu")
    inputs = make_inputs(persons=2)

    def audio_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        if checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        model(**inputs).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = audio_grads(False), audio_grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any(".attn_audio." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


def test_14b_preset_builds_on_meta_without_memory():
    model = build_model(get_preset("multitalk-14b"), "meta")
    assert all(p.is_meta for p in model.parameters())
    counts = parameter_counts(get_preset("multitalk-14b"))
    assert counts.audio == pytest.approx(2.49e9, rel=0.01)
    assert counts.frozen == pytest.approx(16.4e9, rel=0.01)  # Wan2.1-I2V "14B" with its image cross-attention


def test_exported_audio_weights_load_back_through_the_original_converter(tiny_model, tmp_path):
    exported = export_audio_weights(tiny_model, tmp_path / "multitalk.safetensors")
    keys = load_file(str(exported)).keys()
    assert all(k.startswith("audio_proj.") or ".audio_cross_attn." in k or ".norm_x." in k for k in keys)
    assert "blocks.0.audio_cross_attn.kv_linear.weight" in keys

    # Base weights in diffusers format + the exported official audio file -> the same model.
    base = {k: v for k, v in tiny_model.state_dict().items() if k not in tiny_model.audio_parameter_names()}
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    reloaded = build_model(TINY, "meta")
    load_weights(reloaded, [(tmp_path / "base.safetensors", "diffusers"), (exported, "original")])
    inputs = make_inputs(persons=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).sample, tiny_model(**inputs).sample)


def test_checkpoint_errors_list_unknown_missing_and_misshaped_keys(tiny_model, tmp_path):
    exported = load_file(str(export_audio_weights(tiny_model, tmp_path / "audio.safetensors")))
    exported["blocks.0.audio_cross_attn.q_linear.weight"] = torch.zeros(3, 3)
    exported["blocks.0.mystery.weight"] = torch.zeros(1)
    del exported["audio_proj.norm.bias"]
    save_file(exported, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_original(TINY, [tmp_path / "broken.safetensors"])
    message = str(error.value)
    assert "blocks.0.mystery.weight" in message
    assert "blocks.0.attn_audio.to_q.weight: checkpoint (3, 3)" in message
    assert "audio_adapter.norm.bias" in message  # missing, with every base key too
    assert "missing keys" in message and "unknown keys" in message and "mis-shaped keys" in message


def test_config_round_trips_through_the_reference_format():
    config = get_preset("multitalk-14b")
    assert MultiTalkConfig.from_reference(config.to_reference()) == config
    with pytest.raises(ValueError, match="window_size"):
        MultiTalkConfig.from_reference({**config.to_reference(), "window_size": [8, 8]})
