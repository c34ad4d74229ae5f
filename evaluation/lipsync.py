"""Offline lip sync: does the mouth move with the speech? Face landmarks (evaluation.landmarks) give two mouth
signals per frame, the audio gives speech signals per frame; their correlations over offsets of a few frames give
an offset and a confidence. Needs no downloaded weights, so it is the default score everywhere.

Three pairs are correlated, each a relation of speech production:
- lip speed with loudness plus its rate of change: the lips move at each syllable's onset and end;
- lip speed with the spectral flux: every change of sound moves the lips, also inside continuous speech, where
  loudness hardly moves;
- lip opening with the level of the 1-3 kHz band (the second and third formants), over the frames with speech: the
  wider the mouth, the more energy there. This is the band whose envelope follows the mouth's area best in natural
  speech (Chandrasekaran et al., "The natural statistics of audiovisual speech", PLoS Comput Biol 2009); it
  carries fluent speech, where the first two pairs are weakest. In pauses a mouth rests open or closed as it
  likes, so they do not count.
Lip speed is log-compressed so that a head turn or a landmark jump does not outweigh the syllables. The confidence
is the mean of the three Pearson correlations at the best offset within a few frames: about 0 for another video's
audio, clearly positive for the own. On the shared talking videos it ranks the own audio above others'
(benchmarks/quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from evaluation.mfcc import mel_filterbank
from multitalk_model.audio import SAMPLE_RATE, VIDEO_FPS

SAMPLES_PER_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640 audio samples per video frame
ENVELOPE_FLOOR_DB = 45.0  # the envelope is floored this far below its loudest frame: silence is one level
SPEECH_RANGE_DB = 35.0  # frames this close to the loudest one have speech in them; quieter ones are pauses
# Mouth speeds (interocular distances per frame) are compressed as log(speed + this): about the speed landmark
# jitter gives a still mouth, so the jitter of a closed mouth is one level, and big jumps count little more.
MOUTH_SPEED_FLOOR = 0.01
# Spectra: 25 ms Hann windows every 10 ms (4 per video frame). The flux compares 24 log-mel bands, floored 60 dB
# below the peak; the formant band's level is floored as the envelope is.
SPECTRUM_WINDOW, SPECTRUM_HOP, SPECTRUM_FFT = 400, 160, 512
STEPS_PER_FRAME = SAMPLES_PER_FRAME // SPECTRUM_HOP
FLUX_BANDS, FLUX_FLOOR_DB = 24, 60.0
FORMANT_BAND_HZ = (1000.0, 3000.0)


@dataclass(frozen=True)
class SyncScore:
    """Offline sync of one face and one audio stream."""

    confidence: float  # the peak mean correlation (-1..1) of mouth and speech signals within max_offset frames
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


def _power_spectra(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[num_frames * STEPS_PER_FRAME, SPECTRUM_FFT // 2 + 1] power spectra of 25 ms windows every 10 ms, each centred
    on its step; audio shorter than the video counts as silence."""
    margin = (SPECTRUM_WINDOW - SPECTRUM_HOP) // 2
    padded = np.pad(_frame_samples(wave, num_frames), margin)
    windows = sliding_window_view(padded, SPECTRUM_WINDOW)[::SPECTRUM_HOP][: num_frames * STEPS_PER_FRAME]
    return np.square(np.abs(np.fft.rfft(windows * np.hanning(SPECTRUM_WINDOW), SPECTRUM_FFT)))


def _per_frame(values: np.ndarray) -> np.ndarray:
    """Mean of the 10 ms steps of each video frame."""
    return values.reshape(-1, STEPS_PER_FRAME).mean(axis=1)


def spectral_flux(power: np.ndarray) -> np.ndarray:
    """[frames] how fast the sound changes, from power spectra (`_power_spectra`): the mean absolute change of log-mel
    energies between 10 ms steps, averaged per video frame."""
    bands = 10 * np.log10(np.maximum(power @ mel_filterbank(FLUX_BANDS, SPECTRUM_FFT, SAMPLE_RATE).T, 1e-10))
    bands = np.maximum(bands, bands.max() - FLUX_FLOOR_DB)
    return _per_frame(np.abs(np.diff(bands, axis=0, prepend=bands[:1])).mean(axis=1))


def formant_level(power: np.ndarray) -> np.ndarray:
    """[frames] level (dB, floored `ENVELOPE_FLOOR_DB` below its loudest frame) of the `FORMANT_BAND_HZ` band, from
    power spectra (`_power_spectra`): where the second and third formants lie, it rises as the mouth opens."""
    frequencies = np.fft.rfftfreq(SPECTRUM_FFT, 1 / SAMPLE_RATE)
    in_band = (frequencies >= FORMANT_BAND_HZ[0]) & (frequencies < FORMANT_BAND_HZ[1])
    level = 10 * np.log10(np.maximum(_per_frame(power[:, in_band].sum(axis=1)), 1e-10))
    return np.maximum(level, level.max() - ENVELOPE_FLOOR_DB)


def _standardized(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def speech_signal(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[4, num_frames] what a moving mouth follows: loudness plus its rate of change (each standardized), the
    spectral flux, the formant band's level, and whether the frame has speech (1) or is a pause (0). Loudness alone
    misses the lips moving through continuous speech; its change marks each syllable's onset and end, the flux
    each change of sound, the formant level how open the mouth is."""
    envelope = audio_envelope(wave, num_frames)
    loudness = _standardized(envelope) + _standardized(np.abs(np.gradient(envelope)))
    power = _power_spectra(wave, num_frames)
    has_speech = envelope > envelope.max() - SPEECH_RANGE_DB
    return np.stack([loudness, spectral_flux(power), formant_level(power), has_speech])


def smooth(values: np.ndarray, window: int = 3) -> np.ndarray:
    """Moving average along the last axis, same length (edges averaged over the part inside)."""
    kernel = np.ones(window)
    total = np.apply_along_axis(np.convolve, -1, values, kernel, mode="same")
    return total / np.convolve(np.ones(values.shape[-1]), kernel, mode="same")


def shifted_correlations(
    video: np.ndarray, audio: np.ndarray, max_shift: int, counted: np.ndarray | None = None
) -> np.ndarray:
    """[2 * max_shift + 1] Pearson correlations of audio frame t with video frame t + shift, shift = -max..max
    (0 where either side is constant over the overlap), over the audio frames `counted` (all by default)."""
    counted = np.ones(len(audio), dtype=bool) if counted is None else counted.astype(bool)
    correlations = np.zeros(2 * max_shift + 1)
    for index, shift in enumerate(range(-max_shift, max_shift + 1)):
        kept = counted[max(0, -shift) : len(audio) - max(0, shift)]
        a = audio[max(0, -shift) : len(audio) - max(0, shift)][kept]
        v = video[max(0, shift) : len(video) - max(0, -shift)][kept]
        if len(a) < 3:
            continue
        a, v = a - a.mean(), v - v.mean()
        norm = np.sqrt(np.dot(a, a) * np.dot(v, v))
        correlations[index] = np.dot(a, v) / norm if norm > 0 else 0.0
    return correlations


def sync_score(mouth: np.ndarray, speech: np.ndarray, max_offset: int = 3) -> SyncScore:
    """Offline sync of mouth signals [2, T] (`evaluation.landmarks.mouth_signals`: lip speed, lip opening) with
    speech signals [4, T] (`speech_signal`): the offset with the highest correlation averaged over the three pairs
    (speed with loudness, speed with flux, opening with the formant level where there is speech). Ties go to the
    offset nearest zero."""
    if mouth.shape[:-1] != (2,) or speech.shape[:-1] != (4,):
        raise ValueError(
            f"sync_score: mouth signals [2, T] and speech signals [4, T] expected, got {mouth.shape} and {speech.shape}"
        )
    if mouth.shape[-1] != speech.shape[-1]:
        raise ValueError(f"sync_score: {mouth.shape[-1]} mouth frames but {speech.shape[-1]} audio frames")
    if np.any(mouth < 0):
        raise ValueError("sync_score: lip speed and opening cannot be negative")
    speed, opening = smooth(np.log(mouth[0] + MOUTH_SPEED_FLOOR)), smooth(mouth[1])
    loudness, flux, formant = smooth(speech[:3])
    correlations = (
        shifted_correlations(speed, loudness, max_offset)
        + shifted_correlations(speed, flux, max_offset)
        + shifted_correlations(opening, formant, max_offset, counted=speech[3])
    ) / 3
    nearest_first = sorted(range(len(correlations)), key=lambda index: abs(index - max_offset))
    best = max(nearest_first, key=lambda index: correlations[index])
    return SyncScore(confidence=float(correlations[best]), offset_frames=best - max_offset)
