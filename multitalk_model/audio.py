"""The audio front end: load speech and bring it to 16 kHz mono at -23 LUFS, and lay out the persons' tracks, as
the reference MultiTalk implementation does (its `loudness_norm` and `audio_prepare_multi` in
`generate_multitalk.py`). The wav2vec2 encoder is in `wav2vec.py`: decoding audio does not import torch.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import av
import numpy as np
import pyloudnorm
import soundfile as sf
from scipy.signal import resample_poly

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
    for track, start in zip(tracks, starts, strict=False):
        padded = np.zeros((*track.shape[:-1], total), dtype=track.dtype)
        padded[..., start : start + track.shape[-1]] = track
        composed.append(padded)
    return composed


def mix_tracks(tracks: Sequence[np.ndarray]) -> np.ndarray:
    """The sum of equally shaped tracks (the audio heard in the video)."""
    if len({track.shape for track in tracks}) != 1:
        raise ValueError(f"tracks to mix must have one shape, got {[track.shape for track in tracks]}")
    return np.sum(tracks, axis=0)


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
