"""The audio front end: load speech, bring it to 16 kHz mono at -23 LUFS, lay out the persons' tracks, and encode
it with wav2vec2 into per-video-frame features, as the reference MultiTalk implementation does.

Reference: MeiGen-AI/MultiTalk `generate_multitalk.py` (loudness_norm, audio_prepare_multi, get_embedding) and
`src/audio_analysis/wav2vec2.py` (the CNN features are linearly resampled to the video frame rate before the
transformer, and every transformer layer's output is kept).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import av
import numpy as np
import pyloudnorm
import soundfile as sf
import torch
import torch.nn.functional as F
from scipy.signal import resample_poly

if TYPE_CHECKING:
    # transformers is imported where a model is built: decoding audio (every curation worker does) does not pay the
    # seconds it takes to import.
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

SAMPLE_RATE = 16000  # wav2vec2's input rate
VIDEO_FPS = 25  # the rate of the generated video, and so of the audio features


class AudioError(ValueError):
    """An audio input that cannot be used; the message names the file and the problem."""


def load_audio_track(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The original audio of an audio file or of a video's first audio stream: float32 [channels, samples], rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        samples = data.T
    except sf.SoundFileError:
        # libsndfile reads neither video containers nor codecs such as AAC; ffmpeg (through PyAV) reads them all.
        samples, rate = _decode_with_pyav(path)
    if samples.shape[1] == 0:
        raise AudioError(f"{path}: empty audio")
    return np.ascontiguousarray(samples), rate


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Downmix [channels, samples] (or [samples]) by the mean and resample to 16 kHz: float32 [samples]."""
    mono = np.atleast_2d(samples).mean(axis=0, dtype=np.float64)
    if rate != SAMPLE_RATE:
        # Polyphase filtering with the exact rational factor (44100 -> 16000 is 160/441): no drift, good anti-aliasing.
        divisor = math.gcd(SAMPLE_RATE, rate)
        mono = resample_poly(mono, SAMPLE_RATE // divisor, rate // divisor)
    return mono.astype(np.float32)


def load_speech(path: str | os.PathLike) -> np.ndarray:
    """A file's audio as wav2vec2 takes it: float32 mono at 16 kHz."""
    return to_mono_16k(*load_audio_track(path))


def loudness_normalize(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, target_lufs: float = -23.0) -> np.ndarray:
    """Scale mono audio to `target_lufs` integrated loudness (ITU-R BS.1770); silence passes through unchanged."""
    meter = pyloudnorm.Meter(sample_rate)
    # BS.1770 gating measures 400 ms blocks: shorter audio has no integrated loudness to normalise (the meter
    # raises), so it passes through like silence does.
    if wave.shape[-1] < meter.block_size * sample_rate:
        return wave
    loudness = meter.integrated_loudness(wave)
    # Silence measures -inf; the reference also leaves anything beyond +-100 LUFS alone.
    if not np.isfinite(loudness) or abs(loudness) > 100:
        return wave
    with warnings.catch_warnings():
        # pyloudnorm warns when samples exceed [-1, 1]; the audio stays float until it is encoded, so none are lost.
        warnings.simplefilter("ignore", UserWarning)
        normalized = pyloudnorm.normalize.loudness(wave, loudness, target_lufs)
    return normalized.astype(np.float32)


def compose_persons(tracks: Sequence[np.ndarray], mode: Literal["add", "para"]) -> list[np.ndarray]:
    """Lay out the persons' [..., samples] tracks on one equal-length timeline: in turn ("add") or at once ("para")."""
    if not tracks:
        raise ValueError("compose_persons needs at least one track")
    leading_shapes = {track.shape[:-1] for track in tracks}
    if len(leading_shapes) > 1:
        raise ValueError(f"tracks must share their channel layout, got shapes {[track.shape for track in tracks]}")
    lengths = [track.shape[-1] for track in tracks]
    if mode == "add":
        # Person i speaks after persons 0..i-1 and is silent while any other person speaks.
        starts = np.cumsum([0, *lengths[:-1]])
        total = sum(lengths)
    elif mode == "para":
        starts = np.zeros(len(tracks), dtype=int)
        total = max(lengths)
    else:
        raise ValueError(f"mode must be 'add' or 'para', got {mode!r}")
    composed = []
    for track, start in zip(tracks, starts):
        padded = np.zeros((*track.shape[:-1], total), dtype=track.dtype)
        padded[..., start : start + track.shape[-1]] = track
        composed.append(padded)
    return composed


def mix_tracks(tracks: Sequence[np.ndarray]) -> np.ndarray:
    """The sum of equally shaped tracks (the audio heard in the video)."""
    if len({track.shape for track in tracks}) != 1:
        raise ValueError(f"tracks to mix must have one shape, got {[track.shape for track in tracks]}")
    return np.sum(tracks, axis=0)


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
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

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
        """Encode equally long 16 kHz mono waves in one forward: float32 CPU features [B, num_frames, layers, hidden]."""
        lengths = {len(wave) for wave in waves}
        if len(lengths) != 1:
            raise ValueError(f"waves of one batch must have one length, got lengths {sorted(lengths)}")
        length = lengths.pop()
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames} (audio of {length} samples)")
        receptive_field = _cnn_receptive_field(self.model.config)
        if length < receptive_field:
            raise ValueError(f"audio of {length} samples is shorter than wav2vec2's receptive field of {receptive_field}")
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


def build_tiny_wav2vec2(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random wav2vec2 (12 layers of width 32, the standard ~50 Hz CNN) and its feature extractor."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,  # kernels and strides stay the standard ones: 320 samples per frame, 400-sample field
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="group",  # as chinese-wav2vec2-base
        do_stable_layer_norm=False,
        mask_time_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2Model(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(out_dir)
    return out_dir


def _decode_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any container ffmpeg reads into float32 [channels, samples]."""
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.audio:
                raise AudioError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            # Decoders emit their native sample format (s16, fltp, ...): convert to planar float at the same rate.
            resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
            chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
    except av.FFmpegError as error:
        raise AudioError(f"{path}: unreadable audio ({error.strerror})") from error
    if not chunks:
        return np.zeros((stream.channels, 0), dtype=np.float32), stream.rate
    return np.concatenate(chunks, axis=1), stream.rate


def _cnn_receptive_field(config: Wav2Vec2Config) -> int:
    """Samples the CNN needs for its first output frame (400 for the standard kernels and strides)."""
    field = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
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
