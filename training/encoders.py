"""The frozen encoders on the training worker: umT5 (captions), CLIP (first frame) and the Wan VAE (video).

They load from the model directory as generation loads them (multitalk_model.components) and encode through the
same functions, so training sees exactly the conditions inference computes. They run without gradients on the
worker's device; the transformer itself is the one being trained and is not loaded here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from multitalk_model.components import MultiTalkComponents, encode_image, encode_prompt, vae_encode
from multitalk_model.config import MultiTalkConfig
from multitalk_model.transformer import MultiTalkTransformer3DModel


class FrozenEncoders:
    def __init__(self, components: MultiTalkComponents) -> None:
        self.components = components

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        transformer: MultiTalkTransformer3DModel,
        architecture: MultiTalkConfig,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> FrozenEncoders:
        """The encoders of a model directory; the VAE and CLIP in float32 and umT5 in `dtype`, as generation."""
        model_dir = Path(model_dir)
        vae = AutoencoderKLWan.from_pretrained(model_dir / "vae", torch_dtype=torch.float32, local_files_only=True)
        text_encoder = UMT5EncoderModel.from_pretrained(model_dir / "text_encoder", dtype=dtype, local_files_only=True)
        image_encoder = CLIPVisionModel.from_pretrained(
            model_dir / "image_encoder", dtype=torch.float32, local_files_only=True
        )
        for module in (vae, text_encoder, image_encoder):
            module.requires_grad_(False).eval().to(device)
        components = MultiTalkComponents(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=AutoTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True),
            image_encoder=image_encoder,
            image_processor=CLIPImageProcessor.from_pretrained(model_dir / "image_processor", local_files_only=True),
            # Training reads wav2vec features from the shards and never samples: neither part is loaded.
            audio_encoder=None,
            scheduler=None,
            config=architecture,
        )
        return cls(components)

    @torch.no_grad()
    def text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """umT5 states [B, text_len, text_dim], zero past each caption's tokens."""
        return encode_prompt(self.components, captions, device)

    @torch.no_grad()
    def image(self, frames: torch.Tensor, device: torch.device) -> torch.Tensor:
        """CLIP states [B, 257, image_dim] of uint8 frames [B, H, W, 3]."""
        return torch.cat([encode_image(self.components, np.ascontiguousarray(frame.numpy())) for frame in frames]).to(
            device
        )

    @torch.no_grad()
    def video(self, video: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised VAE latents [B, 16, T, h, w] of a video [B, 3, F, H, W] in [-1, 1]."""
        return vae_encode(self.components, video).to(device)
