"""The training objective: rectified-flow velocity loss on the generated frames, conditioned as at inference.

For a clip with normalised VAE latent x0, noise e and a timestep t in (0, 1) drawn with the configured shift, the
model sees x_t = (1 - t) x0 + t e and must predict the velocity e - x0 (the convention of multitalk_model.sampling).
It is conditioned as generation conditions it: the first frame through the 4 mask channels and the VAE latent of
the first frame followed by grey frames, CLIP of the first frame, umT5 of the caption, and for AI2V clips the
persons' audio with their regions. The loss covers the latent frames after the first: the first is the given one.

Multi-task: I2V clips (multi-event, no speech) and AI2V clips with dropped audio see the null audio of inference
guidance, one silent stream; dropped captions (and clips without one) see the null prompt. With both dropped, the
model learns the unconditional prediction the 3-pass guidance needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.config import ObjectiveConfig
from training.data import AI2V, ClipBatch
from training.encoders import FrozenEncoders

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class ModelInputs:
    """Everything one transformer call of training needs, on the training device."""

    latents: torch.Tensor  # x0 [B, 16, T, h, w]
    condition: torch.Tensor  # [B, 20, T, h, w]: 4 mask channels + VAE latent of the first frame and grey frames
    text: torch.Tensor  # [B, text_len, text_dim]
    image: torch.Tensor  # [B, 257, image_dim]
    audio: torch.Tensor  # [B, P, F, window, layers, channels]
    audio_streams: torch.Tensor  # [B], 1 for the null audio
    region_masks: torch.Tensor  # [B, P + 1, h, w]


def sample_timesteps(batch_size: int, config: ObjectiveConfig, generator: torch.Generator) -> torch.Tensor:
    """Timesteps in (0, 1), uniform or logit-normal, then shifted: t' = s t / (1 + (s - 1) t) as at inference."""
    if config.timestep_sampling == "uniform":
        t = torch.rand(batch_size, generator=generator)
    else:
        t = torch.sigmoid(torch.randn(batch_size, generator=generator))
    shift = config.timestep_shift
    return shift * t / (1 + (shift - 1) * t)


def first_frame_mask(latent_frames: int, height: int, width: int) -> torch.Tensor:
    """The I2V condition's 4 mask channels [4, T, h, w]: one on the first latent frame (the given frame).

    Inference (multitalk_model.generation) marks the given video frame, repeats the first frame 4 times and folds 4
    video frames per latent frame: with one given frame, that is all four channels on latent frame 0.
    """
    mask = torch.zeros(4, latent_frames, height, width)
    mask[:, 0] = 1
    return mask


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
    captions, audio, streams = drop_conditions(batch, config, generator)
    video = batch.video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B, 3, F, H, W] in [-1, 1]
    latents = encoders.video(video, device)
    # The condition video as generation builds it: the given first frame, then grey (zero) frames.
    condition_video = F.pad(video[:, :, :1], (0, 0, 0, 0, 0, video.shape[2] - 1))
    condition_latents = encoders.video(condition_video, device)
    mask = first_frame_mask(*latents.shape[2:]).to(device)[None].expand(len(batch), -1, -1, -1, -1)
    return ModelInputs(
        latents=latents.to(dtype),
        condition=torch.cat([mask, condition_latents], dim=1).to(dtype),
        text=encoders.text(captions, device).to(dtype),
        image=encoders.image(batch.video[:, 0], device).to(dtype),
        audio=audio.to(device, dtype),
        audio_streams=streams.to(device),
        region_masks=batch.region_masks.to(device),
    )


def velocity_loss(
    model: torch.nn.Module, inputs: ModelInputs, config: ObjectiveConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mean squared error of the predicted velocity on every latent frame after the first."""
    latents = inputs.latents
    t = sample_timesteps(len(latents), config, generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t_latent = t.view(-1, 1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - t_latent) * latents + t_latent * noise
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
    return F.mse_loss(prediction[:, :, 1:].float(), target[:, :, 1:].float())
