"""The training objective: rectified-flow velocity loss on the generated frames, conditioned as at inference.

For a clip with normalised VAE latent x0, noise e and a timestep t in (0, 1) drawn with the configured shift, the
model sees x_t = (1 - t) x0 + t e and must predict the velocity e - x0 (the convention of multitalk_model.sampling).
It is conditioned as generation conditions a clip (multitalk_model.conditioning, the one definition of both): most
samples on their first frame, as the first clip of a video; a share (`motion_condition_ratio`) on their first
`motion_frames` frames, as every later clip of a streamed video is conditioned on the previous clip's last motion
frames, with those frames' clean latents re-noised and pasted into x_t. Either way the condition channels hold the
mask and the VAE latent of the given frames followed by grey frames, CLIP sees the last given frame, umT5 the
caption, and AI2V clips the persons' audio with their regions. The loss covers the latent frames after the given
ones, optionally weighted per timestep as DiffSynth-Studio weights Wan's flow-matching training.

The InfiniteTalk family (`family: infinitetalk`, arXiv 2508.14033) is conditioned as its sampler conditions a clip
(multitalk_model/infinitetalk.py): the condition channels give frame 0 only, the reference frame, drawn from the clip
at a sampled position; context frames, as from the previous chunk (the clip's first `motion_frames` frames for the
`motion_condition_ratio` share, else its first frame), are pasted clean into x_t and excluded from the loss.

Multi-task: I2V clips (multi-event, no speech) and AI2V clips with dropped audio see the null audio of inference
guidance, one silent stream; dropped captions (and clips without one) see the null prompt. With both dropped, the
model learns the unconditional prediction the 3-pass guidance needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from multitalk_model.conditioning import condition_channels, given_latent_frames, paste_given_frames
from training.config import ObjectiveConfig
from training.data import AI2V, ClipBatch
from training.encoders import FrozenEncoders

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class ModelInputs:
    """Everything one transformer call of training needs, on the training device."""

    latents: torch.Tensor  # x0 [B, 16, T, h, w]
    condition: torch.Tensor  # [B, 20, T, h, w]: 4 mask channels + VAE latent of the given frames and grey frames
    given_frames: list[int]  # per sample: video frames given as the condition (1, or the motion frames)
    text: torch.Tensor  # [B, text_len, text_dim]
    image: torch.Tensor  # [B, 257, image_dim]
    audio: torch.Tensor  # [B, P, F, window, layers, channels]
    audio_streams: torch.Tensor  # [B], 1 for the null audio
    region_masks: torch.Tensor  # [B, P + 1, h, w]
    clean_context: bool = False  # InfiniteTalk: the given frames are pasted clean from the clip's own latents


def sample_timesteps(batch_size: int, config: ObjectiveConfig, generator: torch.Generator) -> torch.Tensor:
    """Timesteps in (0, 1), uniform or logit-normal, then shifted: t' = s t / (1 + (s - 1) t) as at inference."""
    if config.timestep_sampling == "uniform":
        t = torch.rand(batch_size, generator=generator)
    else:
        t = torch.sigmoid(torch.randn(batch_size, generator=generator))
    shift = config.timestep_shift
    return shift * t / (1 + (shift - 1) * t)


def timestep_loss_weights(t: torch.Tensor, config: ObjectiveConfig) -> torch.Tensor:
    """Per-sample loss weights of shifted timesteps t in (0, 1); ones unless `loss_weighting` is "diffsynth".

    DiffSynth-Studio trains Wan on the 1000 timesteps of its shifted schedule, each loss weighted by a bell around
    the middle of the time range, exp(-2 (t - 1/2)^2), less its smallest value on the schedule and scaled to a mean
    of 1 over the schedule. The same function of t here, with the schedule of this run's shift.
    """
    if config.loss_weighting == "none":
        return torch.ones_like(t)
    shift = config.timestep_shift
    schedule = torch.linspace(1, 0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64)[:-1]
    schedule = shift * schedule / (1 + (shift - 1) * schedule)

    def bell(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-2 * (x - 0.5) ** 2)

    floor = bell(schedule).min()
    scale = len(schedule) / (bell(schedule) - floor).sum()
    return ((bell(t.double()) - floor) * scale).to(t.dtype)


def sample_given_frames(batch_size: int, config: ObjectiveConfig, generator: torch.Generator) -> list[int]:
    """Per sample, the video frames given as condition: `motion_frames` for a `motion_condition_ratio` share, else 1."""
    motion = torch.rand(batch_size, generator=generator) < config.motion_condition_ratio
    return [config.motion_frames if as_later_clip else 1 for as_later_clip in motion.tolist()]


def drop_conditions(
    batch: ClipBatch, config: ObjectiveConfig, generator: torch.Generator
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Captions, audio and stream counts as the model sees them after the task and the dropouts.

    I2V clips and AI2V clips whose audio is dropped get one silent stream (the null audio of inference); dropped
    captions and missing ones become the null prompt.
    """
    size = len(batch)
    keep_text = torch.rand(size, generator=generator) >= config.text_dropout
    keep_audio = torch.rand(size, generator=generator) >= config.audio_dropout
    ai2v = torch.tensor([source == AI2V for source in batch.sources])
    with_audio = ai2v & keep_audio & (batch.audio_streams > 0)
    captions = [
        caption if keep and caption else config.null_prompt
        for caption, keep in zip(batch.captions, keep_text.tolist(), strict=True)
    ]
    audio = batch.audio * with_audio[:, None, None, None, None, None]
    streams = torch.where(with_audio, batch.audio_streams, torch.ones_like(batch.audio_streams))
    return captions, audio, streams


def model_inputs(
    batch: ClipBatch,
    encoders: FrozenEncoders,
    config: ObjectiveConfig,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> ModelInputs:
    """Runs the frozen encoders and builds the conditions of a batch (dropouts drawn from `generator`)."""
    if config.family == "infinitetalk":
        return infinitetalk_model_inputs(batch, encoders, config, generator, device, dtype)
    captions, audio, streams = drop_conditions(batch, config, generator)
    given_frames = sample_given_frames(len(batch), config, generator)
    video = batch.video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B, 3, F, H, W] in [-1, 1]
    latents = encoders.video(video, device)
    # The condition video as generation builds it: the given frames, then grey (zero) frames.
    given = torch.arange(video.shape[2])[None] < torch.tensor(given_frames)[:, None]  # [B, F]
    condition_latents = encoders.video(video * given[:, None, :, None, None], device)
    condition = torch.cat(
        [
            condition_channels(latent[None], frames)
            for latent, frames in zip(condition_latents, given_frames, strict=True)
        ]
    )
    last_given = batch.video[torch.arange(len(batch)), torch.tensor(given_frames) - 1]  # CLIP sees the last given
    return ModelInputs(
        latents=latents.to(dtype),
        condition=condition.to(dtype),
        given_frames=given_frames,
        text=encoders.text(captions, device).to(dtype),
        image=encoders.image(last_given, device).to(dtype),
        audio=audio.to(device, dtype),
        audio_streams=streams.to(device),
        region_masks=batch.region_masks.to(device),
    )


def velocity_loss(
    model: torch.nn.Module, inputs: ModelInputs, config: ObjectiveConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mean squared error of the predicted velocity on every latent frame after the given ones, per sample weighted
    by its timestep (see `timestep_loss_weights`), averaged over the batch."""
    latents = inputs.latents
    t = sample_timesteps(len(latents), config, generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t_latent = t.view(-1, 1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - t_latent) * latents + t_latent * noise
    if inputs.clean_context:
        noisy = _paste_context(noisy, inputs)
    else:
        noisy = _paste_given(noisy, inputs, t * NUM_TRAIN_TIMESTEPS, noise)
    prediction = model(
        hidden_states=torch.cat([noisy, inputs.condition], dim=1),
        timestep=t * NUM_TRAIN_TIMESTEPS,
        encoder_hidden_states=inputs.text,
        encoder_hidden_states_image=inputs.image,
        audio=inputs.audio,
        region_masks=inputs.region_masks,
        audio_streams=inputs.audio_streams,
        return_dict=False,
    )[0]
    target = noise - latents
    losses = torch.stack(
        [
            F.mse_loss(prediction[i, :, first:].float(), target[i, :, first:].float())
            for i, first in enumerate(map(given_latent_frames, inputs.given_frames))
        ]
    )
    return (losses * timestep_loss_weights(t.float(), config)).mean()


def _paste_given(noisy: torch.Tensor, inputs: ModelInputs, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Pastes each sample's given frames into its noisy latent as inference does (their latents re-noised to t).

    The paste noise is the sample's own, so where the clip's latent equals the condition's (the causal VAE encodes
    the given frames alike alone or in the clip) the input is the plain x_t."""
    condition_latents = inputs.condition[:, -noisy.shape[1] :]
    pasted = []
    for i, frames in enumerate(inputs.given_frames):
        given_noise = noise[i : i + 1, :, : given_latent_frames(frames)]
        pasted.append(paste_given_frames(noisy[i : i + 1], condition_latents[i : i + 1], frames, t[i], given_noise))
    return torch.cat(pasted)


def sample_reference_positions(batch: ClipBatch, given_frames: list[int], generator: torch.Generator) -> list[int]:
    """InfiniteTalk: per sample, the frame of the clip that is its reference; a first-clip sample (one given frame)
    is referenced on frame 0, as the first clip of a video is; the others at a uniformly drawn frame."""
    positions = torch.randint(0, batch.video.shape[1], (len(batch),), generator=generator).tolist()
    return [0 if frames == 1 else position for frames, position in zip(given_frames, positions, strict=True)]


def infinitetalk_model_inputs(
    batch: ClipBatch,
    encoders: FrozenEncoders,
    config: ObjectiveConfig,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> ModelInputs:
    """The InfiniteTalk conditioning of a batch: frame 0 given as the reference frame (CLIP and VAE of it, then grey
    frames), the context frames (`given_frames`) pasted clean in `velocity_loss`."""
    captions, audio, streams = drop_conditions(batch, config, generator)
    context_frames = sample_given_frames(len(batch), config, generator)
    positions = sample_reference_positions(batch, context_frames, generator)
    reference = batch.video[torch.arange(len(batch)), torch.tensor(positions)]  # [B, H, W, 3] uint8
    video = batch.video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B, 3, F, H, W] in [-1, 1]
    condition_video = torch.zeros_like(video)
    condition_video[:, :, 0] = reference.permute(0, 3, 1, 2).float() / 127.5 - 1
    condition = condition_channels(encoders.video(condition_video, device), 1)
    return ModelInputs(
        latents=encoders.video(video, device).to(dtype),
        condition=condition.to(dtype),
        given_frames=context_frames,
        text=encoders.text(captions, device).to(dtype),
        image=encoders.image(reference, device).to(dtype),
        audio=audio.to(device, dtype),
        audio_streams=streams.to(device),
        region_masks=batch.region_masks.to(device),
        clean_context=True,
    )


def _paste_context(noisy: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
    """Pastes each sample's context frames clean (the clip's own latents), as the InfiniteTalk sampler does."""
    pasted = []
    for i, frames in enumerate(inputs.given_frames):
        clean = inputs.latents[i : i + 1, :, : given_latent_frames(frames)]
        pasted.append(paste_given_frames(noisy[i : i + 1], clean, frames, 0.0, torch.zeros_like(clean)))
    return torch.cat(pasted)
