"""Speech-like audio the project synthesises itself, for the demo and the tests (no recordings ship with the code).

A source-filter model: a jittered glottal pulse train shaped by three vowel formants and led by a short noise
consonant, cut into syllables of about a quarter second (the ~4 Hz syllable rhythm of speech), grouped into words
separated by short pauses.
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

# First three formants of five vowels (a, i, u, e, o) of an adult male voice (Peterson & Barney, 1952).
_VOWEL_FORMANTS_HZ = (
    (730.0, 1090.0, 2440.0),
    (270.0, 2290.0, 3010.0),
    (300.0, 870.0, 2240.0),
    (530.0, 1840.0, 2480.0),
    (570.0, 840.0, 2410.0),
)
_FORMANT_BANDWIDTHS_HZ = (90.0, 110.0, 170.0)
_PEAK = 0.5


def synthesize_speech(
    duration_s: float, sample_rate: int = 16000, seed: int = 0, pitch_hz: float = 120.0
) -> np.ndarray:
    """Deterministic speech-like mono float32 audio of `duration_s` seconds, peak 0.5."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    rng = np.random.default_rng(seed)
    num_samples = round(duration_s * sample_rate)
    pieces = [np.zeros(int(rng.uniform(0.05, 0.15) * sample_rate))]  # a breath before the first word
    length = len(pieces[0])
    while length < num_samples:
        for _ in range(int(rng.integers(1, 5))):  # syllables per word
            pieces.append(_syllable(int(rng.uniform(0.18, 0.32) * sample_rate), sample_rate, pitch_hz, rng))
            length += len(pieces[-1])
        pieces.append(np.zeros(int(rng.uniform(0.08, 0.3) * sample_rate)))  # pause between words
        length += len(pieces[-1])
    wave = np.concatenate(pieces)[:num_samples]
    peak = np.abs(wave).max()
    return (wave * (_PEAK / peak) if peak > 0 else wave).astype(np.float32)


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int) -> None:
    """Write mono [samples] or multi-channel [channels, samples] float audio as 16-bit PCM WAV."""
    sf.write(os.fspath(path), np.asarray(wave).T, sample_rate, subtype="PCM_16", format="WAV")


def _syllable(num_samples: int, sample_rate: int, pitch_hz: float, rng: np.random.Generator) -> np.ndarray:
    """One syllable: a noise consonant, then a gliding, jittered pulse train through one vowel's formants."""
    # Intonation: each syllable starts near the speaker's pitch and glides by up to +-15 %.
    start_hz = pitch_hz * rng.uniform(0.9, 1.1)
    end_hz = start_hz * rng.uniform(0.85, 1.15)
    pulses = np.zeros(num_samples)
    position = 0.0
    while position < num_samples:
        pulses[int(position)] = 1.0
        f0 = start_hz + (end_hz - start_hz) * position / num_samples
        position += sample_rate / f0 * (1.0 + 0.01 * rng.standard_normal())  # ~1 % period jitter
    # Glottal source spectrum tilt: a one-pole low-pass turns clicks into rounded pulses.
    voiced = lfilter([1.0], [1.0, -0.9], pulses)
    vowel_formants_hz = _VOWEL_FORMANTS_HZ[rng.integers(len(_VOWEL_FORMANTS_HZ))]
    for formant_hz, bandwidth_hz in zip(vowel_formants_hz, _FORMANT_BANDWIDTHS_HZ, strict=False):
        radius = np.exp(-np.pi * bandwidth_hz / sample_rate)
        angle = 2.0 * np.pi * formant_hz / sample_rate
        voiced = lfilter([1.0 - radius], [1.0, -2.0 * radius * np.cos(angle), radius**2], voiced)
    envelope = np.sin(np.pi * np.arange(num_samples) / num_samples) ** 2
    syllable = voiced * envelope
    syllable *= rng.uniform(0.6, 1.0) / np.abs(syllable).max()
    # A consonant onset: a short burst of high-passed noise. Without it, voice activity detectors (Silero) miss
    # whole words of bare vowels.
    burst = min(int(rng.uniform(0.03, 0.06) * sample_rate), num_samples)
    syllable[:burst] += 0.15 * np.diff(rng.standard_normal(burst + 1)) * np.hanning(burst)
    return syllable
