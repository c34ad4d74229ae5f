"""Parameter and FLOP accounting for a MultiTalk configuration, from shapes alone.

Parameter counts come from the model built on the meta device (no memory); forward FLOPs from the matmul shapes
(2 FLOPs per multiply-accumulate; norms, softmax and element-wise work are left out, as MFU conventions do).
Training MFU uses 3x the forward FLOPs of the parts that need input gradients (see `training_flops`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MultiTalkConfig
from .transformer import MultiTalkTransformer3DModel

CLIP_TOKENS = 257


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    audio: int  # what MultiTalk trains: the adapter and every block's audio norm + cross-attention

    @property
    def frozen(self) -> int:
        return self.total - self.audio


def parameter_counts(config: MultiTalkConfig) -> ParameterCounts:
    with torch.device("meta"):
        model = MultiTalkTransformer3DModel.from_multitalk_config(config)
    audio_names = set(model.audio_parameter_names())
    total = audio = 0
    for name, param in model.named_parameters():
        total += param.numel()
        audio += param.numel() if name in audio_names else 0
    return ParameterCounts(total=total, audio=audio)


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one transformer call for one sample, by part."""

    embeddings: int
    self_attention: int
    localisation: int
    cross_attention: int
    audio: int
    ffn: int
    head: int

    @property
    def total(self) -> int:
        return (
            self.embeddings
            + self.self_attention
            + self.localisation
            + self.cross_attention
            + self.audio
            + self.ffn
            + self.head
        )


def video_tokens(config: MultiTalkConfig, latent_shape: tuple[int, int, int]) -> int:
    """Tokens of a [T, H, W] latent after patching."""
    return math.prod(size // patch for size, patch in zip(latent_shape, config.patch_size, strict=False))


def forward_flops(config: MultiTalkConfig, latent_shape: tuple[int, int, int], num_persons: int) -> ForwardFlops:
    """FLOPs of one forward pass on a [T, H, W] latent (one sample; multiply by the batch)."""
    d, layers = config.dim, config.num_layers
    frames = latent_shape[0] // config.patch_size[0]
    tokens = video_tokens(config, latent_shape)
    ref_tokens = tokens // frames
    patch = math.prod(config.patch_size)
    audio_tokens = frames * num_persons * config.audio_tokens
    mm = lambda rows, inner, cols: 2 * rows * inner * cols  # noqa: E731 - one matmul's FLOPs

    adapter_in = config.audio_layers * config.audio_channels
    later_rows = config.audio_window + config.vae_scale - 1
    adapter = num_persons * (
        mm(1, config.audio_window * adapter_in, config.audio_intermediate_dim)
        + mm(frames - 1, later_rows * adapter_in, config.audio_intermediate_dim)
        + mm(frames, config.audio_intermediate_dim, config.audio_intermediate_dim)
        + mm(frames, config.audio_intermediate_dim, config.audio_tokens * config.audio_dim)
    )
    embeddings = (
        mm(tokens, config.in_channels * patch, d)
        + mm(config.text_len, config.text_dim, d)
        + mm(config.text_len, d, d)
        + mm(CLIP_TOKENS, config.image_dim, config.image_dim)
        + mm(CLIP_TOKENS, config.image_dim, d)
        + mm(1, config.freq_dim, d)
        + mm(1, d, d)
        + mm(1, d, 6 * d)
        + adapter
    )
    self_attention = layers * (4 * mm(tokens, d, d) + 2 * mm(tokens, d, tokens))
    localisation = 0
    if num_persons > 1:
        localisation = layers * (
            mm(tokens, d, ref_tokens) + mm(tokens, ref_tokens, num_persons + 1) * config.num_attention_heads
        )
    context = config.text_len + CLIP_TOKENS
    cross_attention = layers * (2 * mm(tokens, d, d) + 2 * mm(context, d, d) + 2 * mm(tokens, d, context))
    audio = layers * (
        2 * mm(tokens, d, d)
        + 2 * mm(audio_tokens, config.audio_dim, d)
        + 2 * mm(tokens, d, num_persons * config.audio_tokens)
    )
    ffn = layers * 2 * mm(tokens, d, config.ffn_dim)
    head = mm(tokens, d, config.out_channels * patch)
    return ForwardFlops(embeddings, self_attention, localisation, cross_attention, audio, ffn, head)


def training_flops(config: MultiTalkConfig, latent_shape: tuple[int, int, int], num_persons: int) -> int:
    """FLOPs of one training step per sample with only the audio branch trainable.

    Forward once; backward needs input gradients through every block after the first audio layer (about 2x the
    forward of the blocks) but weight gradients only for the audio parameters (about 1x the audio part).
    """
    fwd = forward_flops(config, latent_shape, num_persons)
    blocks = fwd.self_attention + fwd.cross_attention + fwd.audio + fwd.ffn + fwd.localisation
    return fwd.total + 2 * blocks + fwd.audio
