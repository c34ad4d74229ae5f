"""The wav2vec2 audio encoder: per-video-frame features of 16 kHz speech, as the reference MultiTalk
implementation computes them (MeiGen-AI/MultiTalk `src/audio_analysis/wav2vec2.py` and `get_embedding`: the CNN
features are linearly resampled to the video frame rate before the transformer, and every transformer layer's
output is kept).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from .audio import SAMPLE_RATE, VIDEO_FPS


class Wav2VecEncoder:
    """wav2vec2 features at the video frame rate: every transformer layer's output per frame, [T, L, C]."""

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor) -> None:
        self.model = model.eval()
        self.feature_extractor = feature_extractor

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Wav2VecEncoder:
        """Load a wav2vec2 checkpoint directory (e.g. chinese-wav2vec2-base); never reaches a hub."""
        model = Wav2Vec2Model.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(path, local_files_only=True)
        return cls(model, feature_extractor)

    @torch.no_grad()
    def __call__(self, wave16k: np.ndarray, num_frames: int | None = None) -> torch.Tensor:
        """Encode 16 kHz mono audio into float32 CPU features [num_frames, layers, hidden] (default: 25 per second)."""
        if num_frames is None:
            num_frames = int(len(wave16k) / SAMPLE_RATE * VIDEO_FPS)  # the reference's expression, rounding included
        return self.encode_batch([wave16k], num_frames)[0]

    @torch.no_grad()
    def encode_batch(self, waves: Sequence[np.ndarray], num_frames: int) -> torch.Tensor:
        """Encode equally long 16 kHz mono waves in one forward: float32 CPU features [B, frames, layers, hidden]."""
        lengths = {len(wave) for wave in waves}
        if len(lengths) != 1:
            raise ValueError(f"waves of one batch must have one length, got lengths {sorted(lengths)}")
        length = lengths.pop()
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames} (audio of {length} samples)")
        receptive_field = _cnn_receptive_field(self.model.config)
        if length < receptive_field:
            raise ValueError(
                f"audio of {length} samples is shorter than wav2vec2's receptive field of {receptive_field}"
            )
        # The feature extractor normalises each waveform to zero mean and unit variance, as in pre-training.
        input_values = self.feature_extractor(
            [np.asarray(wave, dtype=np.float32) for wave in waves], sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_values
        input_values = input_values.to(self.model.device, self.model.dtype)
        return _layer_features(self.model, input_values, num_frames).float().cpu()


def audio_windows(features: torch.Tensor, window: int = 5) -> torch.Tensor:
    """For each frame t of [T, L, C] features, frames t-w//2..t+w//2 clamped to the clip: [T, window, L, C]."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    offsets = torch.arange(window, device=features.device) - window // 2
    frames = torch.arange(features.shape[0], device=features.device)
    indices = (frames[:, None] + offsets[None, :]).clamp(0, features.shape[0] - 1)
    return features[indices]


def _cnn_receptive_field(config: Wav2Vec2Config) -> int:
    """Samples the CNN needs for its first output frame (400 for the standard kernels and strides)."""
    field = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=False))):
        field = (field - 1) * stride + kernel
    return field


def _layer_features(model: Wav2Vec2Model, input_values: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, num_frames, layers, hidden]: CNN features resampled to num_frames, then each transformer layer's output."""
    cnn_features = model.feature_extractor(input_values)  # [B, conv_dim, ~50 per second]
    # As the reference: resample before the transformer, so that attention runs over video-rate frames.
    cnn_features = F.interpolate(cnn_features, size=num_frames, mode="linear", align_corners=True)
    hidden_states, _ = model.feature_projection(cnn_features.transpose(1, 2))
    # The encoder owns positional convolution, normalisation and the layers; its layers' outputs are the features
    # (the reference's hidden_states[1:], the embedding output excluded).
    layer_outputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _module, _inputs, output: layer_outputs.append(output))
        for layer in model.encoder.layers
    ]
    try:
        model.encoder(hidden_states)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(layer_outputs, dim=2)
