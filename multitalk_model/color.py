"""Colour correction of generated clips against the reference image (the reference's match_and_blend_colors).

Long videos drift in colour clip after clip; each decoded clip is pulled back to the original condition image
by transferring, frame by frame, the per-channel mean and standard deviation in Lab space, then blended with the
uncorrected frame by `strength`.
"""

from __future__ import annotations

import warnings

import numpy as np
from skimage import color


def match_colors(frames: np.ndarray, reference: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Frames `[T, H, W, 3]` uint8 with each frame's Lab statistics moved to the reference image's `[H', W', 3]`."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if reference.ndim != 3 or reference.shape[-1] != 3 or reference.dtype != np.uint8:
        raise ValueError(f"reference must be a uint8 [H, W, 3] image, got {reference.dtype} {reference.shape}")
    if strength == 0.0:
        return frames

    reference_lab = color.rgb2lab(reference / 255.0)
    reference_mean = reference_lab.mean(axis=(0, 1))
    reference_std = reference_lab.std(axis=(0, 1))
    corrected = np.empty_like(frames)
    for index, frame in enumerate(frames):
        source = frame / 255.0
        lab = color.rgb2lab(source)
        mean, std = lab.mean(axis=(0, 1)), lab.std(axis=(0, 1))
        # A flat channel has no spread to rescale: it takes the reference mean, as in the reference.
        flat = std == 0
        scale = np.divide(reference_std, std, out=np.zeros_like(std), where=~flat)
        lab = (lab - mean) * scale + reference_mean
        with warnings.catch_warnings():  # out-of-gamut Lab values are expected here, and clipped on purpose
            warnings.simplefilter("ignore", UserWarning)
            matched = np.clip(color.lab2rgb(lab), 0.0, 1.0)
        blended = (1 - strength) * source + strength * matched
        corrected[index] = np.clip(np.rint(blended * 255.0), 0, 255)
    return corrected


__all__ = ["match_colors"]
