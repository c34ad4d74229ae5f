"""Offline lip sync: does the mouth move with the speech? Face landmarks (evaluation.landmarks) give a mouth signal
per frame, the audio gives speech signals per frame; their correlation over offsets of a few frames gives an offset
and a confidence. Needs no downloaded weights, so it is the default score everywhere.

The mouth signal is the speed of the lip landmarks (the lips move through every syllable, also when the mouth
stays open), log-compressed so that a head turn or a landmark jump does not outweigh the syllables. The speech
signals are loudness plus its rate of change (onsets and ends of syllables) and the spectral flux (every change of
sound, also inside continuous speech, where loudness hardly moves). The confidence is the mean of their Pearson
correlations with the mouth at the best offset within a few frames: about 0 for another video's audio, clearly
positive for the own. On the shared talking videos it ranks the own audio above others' (benchmarks/quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from evaluation.mfcc import mel_filterbank
from multitalk_model.audio import SAMPLE_RATE, VIDEO_FPS

SAMPLES_PER_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640 audio samples per video frame
ENVELOPE_FLOOR_DB = 45.0  # the envelope is floored this far below its loudest frame: silence is one level
# Mouth speeds (interocular distances per frame) are compressed as log(speed + this): about the speed landmark
# jitter gives a still mouth, so the jitter of a closed mouth is one level, and big jumps count little more.
MOUTH_SPEED_FLOOR = 0.01
# Spectral flux: 24 log-mel bands of 25 ms Hann windows every 10 ms (4 per video frame), floored 60 dB below the peak.
FLUX_BANDS, FLUX_WINDOW, FLUX_HOP, FLUX_FLOOR_DB = 24, 400, 160, 60.0


@dataclass(frozen=True)
class SyncScore:
    """Offline sync of one face and one audio stream."""

    confidence: float  # the peak mean correlation (-1..1) of mouth motion and speech within max_offset frames
    offset_frames: int  # the audio of frame t goes with the mouth of frame t + offset


def _frame_samples(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[num_frames * SAMPLES_PER_FRAME] float64 samples; audio shorter than the video counts as silence."""
    samples = np.zeros(num_frames * SAMPLES_PER_FRAME, dtype=np.float64)
    used = min(len(wave), len(samples))
    samples[:used] = wave[:used]
    return samples


def audio_envelope(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[num_frames] loudness (dB, floored `ENVELOPE_FLOOR_DB` below the loudest frame) of 16 kHz audio per frame;
    audio shorter than the video counts as silence."""
    samples = _frame_samples(wave, num_frames).reshape(num_frames, SAMPLES_PER_FRAME)
    level = 20 * np.log10(np.maximum(np.sqrt(np.mean(np.square(samples), axis=1)), 1e-6))
    return np.maximum(level, level.max() - ENVELOPE_FLOOR_DB)


def spectral_flux(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[num_frames] how fast the sound changes: the mean absolute change of log-mel energies between 10 ms steps,
    averaged per video frame (each window centred on its 10 ms step)."""
    hops_per_frame = SAMPLES_PER_FRAME // FLUX_HOP
    margin = (FLUX_WINDOW - FLUX_HOP) // 2
    padded = np.pad(_frame_samples(wave, num_frames), margin)
    windows = sliding_window_view(padded, FLUX_WINDOW)[::FLUX_HOP][: num_frames * hops_per_frame]
    power = np.square(np.abs(np.fft.rfft(windows * np.hanning(FLUX_WINDOW), 512)))
    bands = 10 * np.log10(np.maximum(power @ mel_filterbank(FLUX_BANDS, 512, SAMPLE_RATE).T, 1e-10))
    bands = np.maximum(bands, bands.max() - FLUX_FLOOR_DB)
    change = np.abs(np.diff(bands, axis=0, prepend=bands[:1])).mean(axis=1)
    return change.reshape(num_frames, hops_per_frame).mean(axis=1)


def _standardized(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def speech_signal(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[2, num_frames] what a moving mouth follows: loudness plus its rate of change (each standardized), and the
    spectral flux. Loudness alone misses the lips moving through continuous speech; its change marks each
    syllable's onset and end, the flux each change of sound."""
    envelope = audio_envelope(wave, num_frames)
    loudness = _standardized(envelope) + _standardized(np.abs(np.gradient(envelope)))
    return np.stack([loudness, spectral_flux(wave, num_frames)])


def smooth(values: np.ndarray, window: int = 3) -> np.ndarray:
    """Moving average along the last axis, same length (edges averaged over the part inside)."""
    kernel = np.ones(window)
    total = np.apply_along_axis(np.convolve, -1, values, kernel, mode="same")
    return total / np.convolve(np.ones(values.shape[-1]), kernel, mode="same")


def shifted_correlations(video: np.ndarray, audio: np.ndarray, max_shift: int) -> np.ndarray:
    """[2 * max_shift + 1] Pearson correlations of audio frame t with video frame t + shift, shift = -max..max
    (0 where either side is constant over the overlap)."""
    correlations = np.zeros(2 * max_shift + 1)
    for index, shift in enumerate(range(-max_shift, max_shift + 1)):
        a = audio[max(0, -shift) : len(audio) - max(0, shift)]
        v = video[max(0, shift) : len(video) - max(0, -shift)]
        if len(a) < 3:
            continue
        a, v = a - a.mean(), v - v.mean()
        norm = np.sqrt(np.dot(a, a) * np.dot(v, v))
        correlations[index] = np.dot(a, v) / norm if norm > 0 else 0.0
    return correlations


def sync_score(mouth: np.ndarray, speech: np.ndarray, max_offset: int = 3) -> SyncScore:
    """Offline sync of mouth motion [T] (`mouth_motion`, a speed) with speech signals [K, T] or [T]
    (`speech_signal`): the offset with the highest correlation averaged over the K signals. Ties go to the offset
    nearest zero."""
    speech = np.atleast_2d(speech)
    if len(mouth) != speech.shape[-1]:
        raise ValueError(f"sync_score: {len(mouth)} mouth frames but {speech.shape[-1]} audio frames")
    if np.any(mouth < 0):
        raise ValueError("sync_score: mouth motion is a speed, it cannot be negative")
    video = smooth(np.log(mouth + MOUTH_SPEED_FLOOR))
    correlations = np.mean([shifted_correlations(video, smooth(signal), max_offset) for signal in speech], axis=0)
    nearest_first = sorted(range(len(correlations)), key=lambda index: abs(index - max_offset))
    best = max(nearest_first, key=lambda index: correlations[index])
    return SyncScore(confidence=float(correlations[best]), offset_frames=best - max_offset)
