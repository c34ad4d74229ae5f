"""FID and FVD: the Frechet distance between Gaussians fitted to features of real and generated frames (FID) or
clips (FVD). Feature networks are TorchScript files at configured paths, never downloaded:

- FID: an Inception TorchScript called as `detector(images, return_features=True)` on uint8 [N, 3, H, W] images
  (StyleGAN2-ADA's `inception-2015-12-05.pt`, the TF-FID Inception whose pool features pytorch-fid reproduces);
- FVD: the StyleGAN-V protocol (also cd-fvd's `styleganv` mode and common_metrics_on_video_quality): the I3D
  TorchScript `i3d_torchscript.pt`, clips scaled so the shorter side is 224 (bilinear), centre-cropped to
  224 x 224, mapped to [-1, 1], called as `detector(x, rescale=False, resize=False, return_features=True)`.

The distance itself is pytorch-fid's `calculate_frechet_distance`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch.nn import functional as F

FVD_RESOLUTION = 224
FVD_CLIP_FRAMES = 16  # StyleGAN-V (and cd-fvd) score 16-frame clips


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased) of features [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features: expected [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid computes it: a near-singular
    product gets `eps` on the diagonals, and a negligible imaginary part of the square root is dropped."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: shapes {mu1.shape}/{sigma1.shape} and {mu2.shape}/{sigma2.shape} differ")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript feature network (Inception for FID, I3D for FVD) from a configured path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such feature network file (FID/FVD weights are never downloaded)")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as error:
        raise ValueError(f"{path}: not a TorchScript feature network ({error})") from error


def video_clips(frames: np.ndarray, length: int = FVD_CLIP_FRAMES) -> list[np.ndarray]:
    """The consecutive, non-overlapping clips of `length` frames of a video [T, H, W, 3] (a shorter rest is left
    out): one video's samples for FVD."""
    return [frames[first : first + length] for first in range(0, len(frames) - length + 1, length)]


def fvd_clip(clip: np.ndarray) -> torch.Tensor:
    """A uint8 clip [T, H, W, 3] as the StyleGAN-V I3D takes it: float [3, T, 224, 224] in [-1, 1]."""
    video = torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).float() / 255  # [3, T, H, W]
    height, width = video.shape[2:]
    scale = FVD_RESOLUTION / min(height, width)
    size = (FVD_RESOLUTION, math.ceil(width * scale)) if height < width else (math.ceil(height * scale), FVD_RESOLUTION)
    video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)
    top, left = (video.shape[2] - FVD_RESOLUTION) // 2, (video.shape[3] - FVD_RESOLUTION) // 2
    video = video[:, :, top : top + FVD_RESOLUTION, left : left + FVD_RESOLUTION]
    return ((video - 0.5) * 2).contiguous()


@torch.no_grad()
def video_features(detector: torch.jit.ScriptModule, clips: list[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """[N, D] I3D features of uint8 clips [T, H, W, 3] (all of one length)."""
    device = next(iter(detector.parameters()), torch.empty(0)).device
    features = []
    for first in range(0, len(clips), batch_size):
        batch = torch.stack([fvd_clip(clip) for clip in clips[first : first + batch_size]]).to(device)
        features.append(detector(batch, rescale=False, resize=False, return_features=True).cpu().double().numpy())
    return np.concatenate(features)


@torch.no_grad()
def image_features(detector: torch.jit.ScriptModule, frames: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """[N, D] Inception features of uint8 frames [N, H, W, 3]."""
    device = next(iter(detector.parameters()), torch.empty(0)).device
    features = []
    for first in range(0, len(frames), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(frames[first : first + batch_size])).permute(0, 3, 1, 2)
        features.append(detector(batch.to(device), return_features=True).cpu().double().numpy())
    return np.concatenate(features)


def fid(detector: torch.jit.ScriptModule, real_frames: np.ndarray, generated_frames: np.ndarray) -> float:
    """FID of generated frames against real frames (uint8 [N, H, W, 3] each)."""
    real = gaussian_stats(image_features(detector, real_frames))
    generated = gaussian_stats(image_features(detector, generated_frames))
    return frechet_distance(*generated, *real)


def fvd(detector: torch.jit.ScriptModule, real_clips: list[np.ndarray], generated_clips: list[np.ndarray]) -> float:
    """FVD (StyleGAN-V protocol) of generated clips against real clips (uint8 [T, H, W, 3] each)."""
    real = gaussian_stats(video_features(detector, real_clips))
    generated = gaussian_stats(video_features(detector, generated_clips))
    return frechet_distance(*generated, *real)
