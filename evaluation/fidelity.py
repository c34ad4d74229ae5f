"""Pixel fidelity of a generated clip to its ground truth: PSNR and SSIM per frame (scikit-image), averaged over
the frames both videos have, the ground truth resized to the generated size. Unlike the face metrics they need no
face, so they score any video of a clip, the noise of a random model included."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from multitalk_model.media import read_video_frames


def pixel_fidelity(video: str | Path, ground_truth: str | Path) -> dict[str, float]:
    """{"psnr" (dB, higher is better), "ssim" (-1..1, higher is better)} of `video` against `ground_truth`."""
    frames, truth = read_video_frames(video), read_video_frames(ground_truth)
    count = min(len(frames), len(truth))
    height, width = frames.shape[1:3]
    # scikit-image's 7-pixel SSIM window, or the largest odd one a smaller frame holds.
    window = min(7, min(height, width) - (1 - min(height, width) % 2))
    psnr, ssim = [], []
    for frame, real in zip(frames[:count], truth[:count], strict=True):
        real = cv2.resize(real, (width, height), interpolation=cv2.INTER_AREA)
        psnr.append(peak_signal_noise_ratio(real, frame, data_range=255))
        ssim.append(structural_similarity(real, frame, channel_axis=2, data_range=255, win_size=window))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}
