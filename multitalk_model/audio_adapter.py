"""The audio adapter: per-frame wav2vec windows -> audio context tokens per latent frame.

The first video frame (its own latent frame) keeps its whole window; each later latent frame covers
`vae_scale` video frames and keeps 8 window rows (for vae_scale 4 and window 5): rows t-2..t of its first frame,
the centre row of each middle frame and rows t..t+2 of its last frame. Two MLPs read those, a shared MLP maps
both to `tokens` x `audio_dim` per latent frame.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def latent_frame_windows(audio: torch.Tensor, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, F, W, L, C] windows per video frame -> (first frame [N, 1, W, L, C], later [N, T-1, W', L, C])."""
    num_frames, window = audio.shape[1], audio.shape[2]
    if (num_frames - 1) % vae_scale:
        raise ValueError(f"audio covers {num_frames} video frames; expected {vae_scale}n+1")
    middle = window // 2
    later = audio[:, 1:].unflatten(1, (-1, vae_scale))  # [N, T-1, vae_scale, W, L, C]
    rows = [later[:, :, 0, : middle + 1]]  # first frame: the window up to its centre
    rows += [later[:, :, i, middle : middle + 1] for i in range(1, vae_scale - 1)]  # middle frames: centre only
    rows += [later[:, :, -1, middle:]]  # last frame: the window from its centre
    return audio[:, :1], torch.cat(rows, dim=2)


class AudioAdapter(nn.Module):
    def __init__(
        self,
        window: int,
        layers: int,
        channels: int,
        intermediate_dim: int,
        audio_dim: int,
        tokens: int,
        vae_scale: int,
        norm_output: bool,
    ) -> None:
        super().__init__()
        self.vae_scale = vae_scale
        self.tokens = tokens
        self.audio_dim = audio_dim
        later_rows = window + vae_scale - 1  # (middle + 1) + (vae_scale - 2) + (middle + 1)
        self.first_frame_proj = nn.Linear(window * layers * channels, intermediate_dim)
        self.latent_frame_proj = nn.Linear(later_rows * layers * channels, intermediate_dim)
        self.hidden_proj = nn.Linear(intermediate_dim, intermediate_dim)
        self.token_proj = nn.Linear(intermediate_dim, tokens * audio_dim)
        self.norm = nn.LayerNorm(audio_dim) if norm_output else nn.Identity()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[N, F, W, L, C] per-frame windows of N streams -> [N, T, tokens, audio_dim], T = (F - 1) / vae_scale + 1."""
        first, later = latent_frame_windows(audio, self.vae_scale)
        first = torch.relu(self.first_frame_proj(first.flatten(2)))
        later = torch.relu(self.latent_frame_proj(later.flatten(2)))
        hidden = torch.relu(self.hidden_proj(torch.cat([first, later], dim=1)))
        tokens = self.token_proj(hidden).unflatten(-1, (self.tokens, self.audio_dim))
        return self.norm(tokens)
