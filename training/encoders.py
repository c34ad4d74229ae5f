"""The frozen encoders on the training worker: umT5 (captions), CLIP (first frame) and the Wan VAE (video).

They load from the model directory through generation's loader (`multitalk_model.components.load_encoders`) and
encode through the same functions, so training sees exactly the conditions inference computes. They run without
gradients on the worker's device; the transformer itself is the one being trained and is not loaded here, nor are
wav2vec2 (training reads its features from the shards) and the scheduler (training never samples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from multitalk_model.components import ConditionEncoders, encode_image, encode_prompt, load_encoders, vae_encode
from multitalk_model.config import MultiTalkConfig


class FrozenEncoders:
    def __init__(self, encoders: ConditionEncoders) -> None:
        self.encoders = encoders

    @classmethod
    def load(
        cls, model_dir: str | Path, architecture: MultiTalkConfig, device: torch.device | str, dtype: torch.dtype
    ) -> FrozenEncoders:
        """The encoders of a model directory; the VAE and CLIP in float32 and umT5 in `dtype`, as generation."""
        return cls(load_encoders(model_dir, device, dtype, architecture.text_len))

    @torch.no_grad()
    def text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """umT5 states [B, text_len, text_dim], zero past each caption's tokens."""
        return encode_prompt(self.encoders, captions, device)

    @torch.no_grad()
    def image(self, frames: torch.Tensor, device: torch.device) -> torch.Tensor:
        """CLIP states [B, 257, image_dim] of uint8 frames [B, H, W, 3]."""
        return torch.cat([encode_image(self.encoders, np.ascontiguousarray(frame.numpy())) for frame in frames]).to(
            device
        )

    @torch.no_grad()
    def video(self, video: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised VAE latents [B, 16, T, h, w] of a video [B, 3, F, H, W] in [-1, 1]."""
        return vae_encode(self.encoders, video).to(device)
