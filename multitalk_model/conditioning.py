"""The image-to-video condition of a clip, one definition for generation and training.

A clip of `frame_num` video frames is conditioned on its first `given_frames` frames (one reference frame for the
first clip; the last motion frames of the previous clip for every later clip of a streamed video). The transformer
sees them in two places, as the reference MultiTalk pipeline (wan/multitalk.py) builds them:

- the 20 condition channels: 4 mask channels marking the given frames, then the VAE latent of the given frames
  followed by zero (grey) frames;
- the noisy latent itself: the given frames' latent frames are overwritten by their clean latents re-noised to the
  current time ("pasted"), before the first step and after every step.

Training builds exactly these inputs for its samples, so that the weights learn what inference asks of them.
"""

from __future__ import annotations

import torch

from .sampling import add_noise

TEMPORAL_STRIDE = 4  # video frames per latent frame after the first (the Wan VAE's temporal factor)


def given_latent_frames(given_frames: int) -> int:
    """Latent frames that hold the given video frames: the first frame alone, then one per 4 frames."""
    if given_frames < 1:
        raise ValueError(f"a clip is conditioned on at least one frame, got {given_frames}")
    return 1 + (given_frames - 1) // TEMPORAL_STRIDE


def condition_mask(given_frames: int, frame_num: int, height: int, width: int) -> torch.Tensor:
    """The 4 mask channels [1, 4, T, h, w]: one on the given frames, on the latent grid of height x width."""
    mask = torch.zeros(1, frame_num, height, width)
    mask[:, :given_frames] = 1
    # The first frame stands for a whole latent frame: repeat it 4 times, then fold 4 frames per latent frame.
    mask = torch.cat([mask[:, :1].repeat(1, TEMPORAL_STRIDE, 1, 1), mask[:, 1:]], dim=1)
    return mask.view(1, -1, TEMPORAL_STRIDE, height, width).transpose(1, 2)


def condition_channels(condition_latent: torch.Tensor, given_frames: int) -> torch.Tensor:
    """[B, 4 + C, T, h, w]: the mask channels, then the latent [B, C, T, h, w] of the given frames + zero frames."""
    batch, _, latent_frames, height, width = condition_latent.shape
    frame_num = TEMPORAL_STRIDE * (latent_frames - 1) + 1
    mask = condition_mask(given_frames, frame_num, height, width).to(condition_latent)
    return torch.cat([mask.expand(batch, -1, -1, -1, -1), condition_latent], dim=1)


def paste_given_frames(
    latent: torch.Tensor,
    condition_latent: torch.Tensor,
    given_frames: int,
    t: torch.Tensor | float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """The latent with its given frames replaced by their clean latents re-noised to time t (training scale).

    `t` is one timestep, or one per sample ([B]); `noise` has the shape of the given frames' latents,
    [B, C, given_latent_frames, h, w]. Returns a new tensor.
    """
    frames = given_latent_frames(given_frames)
    clean, noise = condition_latent[:, :, :frames].to(latent), noise.to(latent)
    t = torch.as_tensor(t).flatten()
    latent = latent.clone()
    for index in range(len(latent)):
        sample_t = t[index] if len(t) > 1 else t[0]
        latent[index, :, :frames] = add_noise(clean[index], noise[index], sample_t)
    return latent


__all__ = ["condition_channels", "condition_mask", "given_latent_frames", "paste_given_frames"]
