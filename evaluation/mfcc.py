"""MFCCs as python_speech_features 0.6 computes them with its defaults (`mfcc(signal, 16000)`), the audio input of
SyncNet (joonson/syncnet_python feeds it 13 cepstra at 100 frames per second, 20 frames per 5-frame video window).

Written with numpy/scipy instead of depending on python_speech_features: the same pre-emphasis, framing with zero
padding of the last frame, 512-point power spectrum, 26 triangular mel filters on floored FFT bins, orthonormal
DCT-II, lifter 22, and the first cepstrum replaced by the log frame energy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.fft import dct

_EPS = np.finfo(float).eps  # what python_speech_features puts in place of zero energies before the log


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray | float:
    return 2595 * np.log10(1 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700 * (10 ** (mel / 2595.0) - 1)


def mel_filterbank(num_filters: int, nfft: int, sample_rate: int) -> np.ndarray:
    """[num_filters, nfft // 2 + 1] triangular filters evenly spaced in mels from 0 Hz to Nyquist."""
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), num_filters + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mel_points) / sample_rate)
    fft_bins = np.arange(nfft // 2 + 1)
    filters = np.zeros((num_filters, nfft // 2 + 1))
    for j in range(num_filters):
        low, centre, high = bins[j], bins[j + 1], bins[j + 2]
        rising = (fft_bins >= low) & (fft_bins < centre)
        falling = (fft_bins >= centre) & (fft_bins < high)
        filters[j, rising] = (fft_bins[rising] - low) / (centre - low)
        filters[j, falling] = (high - fft_bins[falling]) / (high - centre)
    return filters


def mfcc(
    signal: np.ndarray,
    sample_rate: int = 16000,
    frame_s: float = 0.025,
    step_s: float = 0.01,
    num_cepstra: int = 13,
    num_filters: int = 26,
    nfft: int = 512,
    preemphasis: float = 0.97,
    lifter: int = 22,
) -> np.ndarray:
    """[frames, num_cepstra] MFCCs of a mono signal, equal to python_speech_features.mfcc with these arguments."""
    signal = np.asarray(signal, dtype=np.float64)
    if signal.ndim != 1 or len(signal) == 0:
        raise ValueError(f"signal: expected a non-empty mono array, got shape {signal.shape}")
    emphasised = np.append(signal[0], signal[1:] - preemphasis * signal[:-1])
    # Rounded half up, as python_speech_features does (400 and 160 samples at 16 kHz).
    frame_len, step = math.floor(frame_s * sample_rate + 0.5), math.floor(step_s * sample_rate + 0.5)
    num_frames = 1 if len(signal) <= frame_len else 1 + math.ceil((len(signal) - frame_len) / step)
    padded = np.zeros((num_frames - 1) * step + frame_len)
    padded[: len(emphasised)] = emphasised
    frames = padded[np.arange(frame_len)[None, :] + step * np.arange(num_frames)[:, None]]
    power = np.square(np.abs(np.fft.rfft(frames, nfft))) / nfft
    energy = power.sum(axis=1)
    energy = np.where(energy == 0, _EPS, energy)
    filtered = power @ mel_filterbank(num_filters, nfft, sample_rate).T
    filtered = np.where(filtered == 0, _EPS, filtered)
    cepstra = dct(np.log(filtered), type=2, axis=1, norm="ortho")[:, :num_cepstra]
    cepstra *= 1 + (lifter / 2.0) * np.sin(np.pi * np.arange(num_cepstra) / lifter)
    cepstra[:, 0] = np.log(energy)
    return cepstra
