"""Offline lip sync: does the mouth move with the speech? Face landmarks (evaluation.landmarks) give a mouth signal
per frame, the audio gives its loudness envelope per frame; their correlation over offsets of a few frames gives
an offset and a confidence. Needs no downloaded weights, so it is the default score everywhere.

The mouth signal is the speed of the lip landmarks (the lips move through every syllable, also when the mouth
stays open); the speech signal is loudness plus its rate of change. The confidence is their best Pearson
correlation within a few frames' offset: about 0 for another video's audio, clearly positive for the own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multitalk_model.audio import SAMPLE_RATE, VIDEO_FPS

SAMPLES_PER_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640 audio samples per video frame
ENVELOPE_FLOOR_DB = 45.0  # the envelope is floored this far below its loudest frame: silence is one level


@dataclass(frozen=True)
class SyncScore:
    """Offline sync of one face and one audio stream."""

    confidence: float  # the peak correlation (-1..1) of mouth motion and speech within max_offset frames
    offset_frames: int  # the audio of frame t goes with the mouth of frame t + offset


def audio_envelope(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[num_frames] loudness (dB, floored `ENVELOPE_FLOOR_DB` below the loudest frame) of 16 kHz audio per frame;
    audio shorter than the video counts as silence."""
    samples = np.zeros(num_frames * SAMPLES_PER_FRAME, dtype=np.float64)
    used = min(len(wave), len(samples))
    samples[:used] = wave[:used]
    rms = np.sqrt(np.mean(np.square(samples.reshape(num_frames, SAMPLES_PER_FRAME)), axis=1))
    level = 20 * np.log10(np.maximum(rms, 1e-6))
    return np.maximum(level, level.max() - ENVELOPE_FLOOR_DB)


def _standardized(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def speech_signal(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[num_frames] what a moving mouth follows: loudness plus its rate of change, each standardized. Loudness
    alone misses the lips moving through continuous speech; its change marks every syllable's onset and end."""
    envelope = audio_envelope(wave, num_frames)
    return _standardized(envelope) + _standardized(np.abs(np.gradient(envelope)))


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
    """Offline sync of mouth motion [T] (`mouth_motion`) with a speech signal [T] (`speech_signal`). Ties go to
    the offset nearest zero."""
    if len(mouth) != len(speech):
        raise ValueError(f"sync_score: {len(mouth)} mouth frames but {len(speech)} audio frames")
    correlations = shifted_correlations(smooth(mouth), smooth(speech), max_offset)
    nearest_first = sorted(range(len(correlations)), key=lambda index: abs(index - max_offset))
    best = max(nearest_first, key=lambda index: correlations[index])
    return SyncScore(confidence=float(correlations[best]), offset_frames=best - max_offset)
