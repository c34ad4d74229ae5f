"""Training conditions a clip as inference does (one definition, multitalk_model.conditioning), checked against
computations written from the reference code: the condition mask and motion-frame paste of MeiGen-AI/MultiTalk
wan/multitalk.py, and the per-timestep loss weights of modelscope/DiffSynth-Studio's FlowMatchScheduler ("Wan").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multitalk_model.components import load_components, vae_encode
from multitalk_model.conditioning import condition_channels, condition_mask, given_latent_frames, paste_given_frames
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from training.config import ObjectiveConfig, TrainingConfig
from training.data import AI2V, ClipBatch
from training.encoders import FrozenEncoders
from training.objective import (
    NUM_TRAIN_TIMESTEPS,
    model_inputs,
    sample_given_frames,
    sample_timesteps,
    timestep_loss_weights,
    velocity_loss,
)

TINY = get_preset("tiny")


def reference_mask(motion_frames: int, frame_num: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """wan/multitalk.py, `generate`: the msk of a clip conditioned on `cur_motion_frames_num` frames."""
    msk = torch.ones(1, frame_num, lat_h, lat_w)
    msk[:, motion_frames:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)


def reference_paste(latent: torch.Tensor, y: torch.Tensor, motion_frames: int, t: torch.Tensor, noise: torch.Tensor):
    """wan/multitalk.py: latent_motion_frames = y[:, :, :1 + (n - 1) // 4][0], re-noised by the scheduler's
    add_noise ((1 - t / 1000) x + t / 1000 noise) and written over latent[:, :T_m] (latent is C T H W there)."""
    latent_motion_frames = y[:, :, : int(1 + (motion_frames - 1) // 4)][0]
    timesteps = t.float() / 1000
    add_latent = (1 - timesteps) * latent_motion_frames + timesteps * noise
    latent = latent.clone()
    _, t_m, _, _ = add_latent.shape
    latent[:, :t_m] = add_latent
    return latent


def diffsynth_wan_training_weights(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffSynth-Studio FlowMatchScheduler("Wan").set_timesteps(1000, training=True, shift=shift): its timesteps and
    linear_timesteps_weights (set_timesteps_wan, then set_training_weight)."""
    sigmas = torch.linspace(1.0, 0.0, 1000 + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    x = sigmas * 1000
    y = torch.exp(-2 * ((x - 1000 / 2) / 1000) ** 2)
    y_shifted = y - y.min()
    return timesteps, y_shifted * (1000 / y_shifted.sum())


@pytest.mark.parametrize("given", [1, 5, 9, 25])
def test_condition_mask_is_the_reference_mask(given):
    frame_num, lat_h, lat_w = 33, 3, 5
    expected = reference_mask(given, frame_num, lat_h, lat_w)
    assert torch.equal(condition_mask(given, frame_num, lat_h, lat_w), expected)
    latent = torch.randn(2, 16, 9, lat_h, lat_w)
    channels = condition_channels(latent, given)
    assert torch.equal(channels[:, :4], expected.expand(2, -1, -1, -1, -1))
    assert torch.equal(channels[:, 4:], latent)


@pytest.mark.parametrize("given", [1, 25])
def test_paste_of_the_given_frames_is_the_reference_motion_injection(given):
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 9, 3, 5, generator=gen)
    y = torch.randn(1, 16, 9, 3, 5, generator=gen)
    noise = torch.randn(1, 16, given_latent_frames(given), 3, 5, generator=gen)
    t = torch.tensor([637.5])

    pasted = paste_given_frames(latent, y, given, t, noise)

    torch.testing.assert_close(pasted[0], reference_paste(latent[0], y, given, t, noise[0]), rtol=0, atol=1e-6)
    assert torch.equal(pasted[:, :, given_latent_frames(given) :], latent[:, :, given_latent_frames(given) :])


def test_per_sample_timesteps_paste_each_sample_at_its_own_time():
    gen = torch.Generator().manual_seed(1)
    latent, y = torch.randn(2, 16, 5, 2, 2, generator=gen), torch.randn(2, 16, 5, 2, 2, generator=gen)
    noise = torch.randn(2, 16, 2, 2, 2, generator=gen)
    t = torch.tensor([100.0, 900.0])

    pasted = paste_given_frames(latent, y, 5, t, noise)

    for i in range(2):
        expected = reference_paste(latent[i], y[i : i + 1], 5, t[i], noise[i])
        torch.testing.assert_close(pasted[i], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [5.0, 7.0])
def test_diffsynth_loss_weights_equal_its_scheduler_on_its_timesteps(shift):
    timesteps, weights = diffsynth_wan_training_weights(shift)
    config = ObjectiveConfig(timestep_shift=shift, loss_weighting="diffsynth")
    picks = torch.tensor([0, 1, 250, 500, 731, 999])

    ours = timestep_loss_weights(timesteps[picks] / NUM_TRAIN_TIMESTEPS, config)

    torch.testing.assert_close(ours, weights[picks], rtol=1e-4, atol=1e-6)
    assert torch.equal(timestep_loss_weights(torch.rand(4), ObjectiveConfig()), torch.ones(4))


def test_motion_conditioned_share_follows_the_config():
    config = ObjectiveConfig(motion_condition_ratio=0.3, motion_frames=9)
    given = sample_given_frames(2000, config, torch.Generator().manual_seed(0))
    assert set(given) == {1, 9}
    assert 0.25 < given.count(9) / len(given) < 0.35
    assert set(sample_given_frames(50, ObjectiveConfig(motion_condition_ratio=0), torch.Generator())) == {1}


def test_motion_frames_must_fit_in_the_training_clip():
    with pytest.raises(ValueError, match="objective.motion_frames 25 must be fewer than data.num_frames 17"):
        TrainingConfig.model_validate({"data": {"num_frames": 17}, "cluster": {"num_workers": 1}})
    with pytest.raises(ValueError, match="4n \\+ 1"):
        ObjectiveConfig(motion_frames=6)


# ------------------------------------------------------------------- the model inputs of a training sample


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


def _batch(frames: int = 9) -> ClipBatch:
    gen = torch.Generator().manual_seed(3)
    return ClipBatch(
        keys=["a", "b"],
        epochs=[0, 0],
        sources=[AI2V, AI2V],
        stream=0,
        video=torch.randint(0, 256, (2, frames, 32, 48, 3), generator=gen, dtype=torch.uint8),
        audio=torch.randn(2, 1, frames, TINY.audio_window, TINY.audio_layers, TINY.audio_channels, generator=gen),
        audio_streams=torch.tensor([1, 1]),
        region_masks=torch.ones(2, 2, 4, 6),
        captions=["a caption", "another"],
    )


def test_a_motion_conditioned_sample_gets_the_inputs_inference_gives_a_later_clip(tiny_model_dir):
    components = load_components(tiny_model_dir)
    encoders = FrozenEncoders(components)
    config = ObjectiveConfig(motion_condition_ratio=0.5, motion_frames=5, text_dropout=0, audio_dropout=0)
    batch = _batch()
    generator = torch.Generator().manual_seed(0)
    given = sample_given_frames(2, config, torch.Generator().manual_seed(0))
    assert sorted(given) == [1, 5]  # this seed gives one sample of each kind

    inputs = model_inputs(batch, encoders, config, generator, torch.device("cpu"), torch.float32)

    assert inputs.given_frames == given
    for i, frames in enumerate(given):
        # The reference's procedure for a clip conditioned on `frames` frames: zero padding after them, VAE, msk.
        pixels = batch.video[i].permute(3, 0, 1, 2).float() / 127.5 - 1
        padded = torch.cat([pixels[:, :frames], torch.zeros_like(pixels[:, frames:])], dim=1)
        y = vae_encode(components, padded[None])
        expected = torch.cat([reference_mask(frames, 9, *y.shape[3:]), y], dim=1)
        torch.testing.assert_close(inputs.condition[i : i + 1], expected, rtol=1e-5, atol=1e-5)
        # CLIP sees the last given frame, as the reference's clip.visual(cond_image[:, :, -1:]).
        clip = encoders.image(batch.video[i, frames - 1 : frames], torch.device("cpu"))
        torch.testing.assert_close(inputs.image[i : i + 1], clip)


def test_the_loss_is_on_the_generated_frames_of_the_pasted_input_weighted_by_timestep(tiny_model_dir):
    components = load_components(tiny_model_dir)
    model = components.transformer.eval()
    config = ObjectiveConfig(motion_condition_ratio=1.0, motion_frames=5, loss_weighting="diffsynth")
    inputs = model_inputs(_batch(), FrozenEncoders(components), config, torch.Generator(), "cpu", torch.float32)
    given = given_latent_frames(5)

    with torch.no_grad():
        loss = velocity_loss(model, inputs, config, torch.Generator().manual_seed(5))

        # The same draws, then the reference's procedure: x_t, the motion latents re-noised and pasted, the
        # velocity error on the frames after them, DiffSynth's weight of each sample's timestep.
        gen = torch.Generator().manual_seed(5)
        t = sample_timesteps(2, config, gen)
        latents = inputs.latents
        noise = torch.randn(latents.shape, generator=gen)
        expected = []
        for i in range(2):
            x_t = (1 - t[i]) * latents[i] + t[i] * noise[i]
            x_t = reference_paste(x_t, inputs.condition[i : i + 1, 4:], 5, t[i] * 1000, noise[i, :, :given])
            prediction = model(
                hidden_states=torch.cat([x_t, inputs.condition[i]])[None],
                timestep=t[i : i + 1] * 1000,
                encoder_hidden_states=inputs.text[i : i + 1],
                encoder_hidden_states_image=inputs.image[i : i + 1],
                audio=inputs.audio[i : i + 1],
                region_masks=inputs.region_masks[i : i + 1],
                audio_streams=inputs.audio_streams[i : i + 1],
                return_dict=False,
            )[0][0]
            error = ((prediction - (noise[i] - latents[i]))[:, given:] ** 2).mean()
            timesteps, weights = diffsynth_wan_training_weights(config.timestep_shift)
            weight = weights[torch.argmin((timesteps - t[i] * 1000).abs())]  # its training_weight(timestep)
            expected.append(error * weight)

    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=2e-3, atol=1e-6)
