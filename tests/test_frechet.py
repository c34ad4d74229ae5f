"""FID / FVD: the Frechet distance against its closed form for known Gaussians and against pytorch-fid's
computation, and FVD through a random-weight TorchScript network equal to the StyleGAN-V protocol's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg
from torch.nn import functional as F

from evaluation.frechet import fid, frechet_distance, fvd, gaussian_stats, load_detector
from tests.helpers import save_random_feature_networks


def _pytorch_fid_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch_fid.fid_score.calculate_frechet_distance (mseitzer/pytorch-fid), the golden."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_frechet_distance_of_known_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.5, 2, size=6), rng.uniform(0.5, 2, size=6)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]  # same eigenvectors: the covariances commute
    sigma1, sigma2 = rotation @ np.diag(var1) @ rotation.T, rotation @ np.diag(var2) @ rotation.T

    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))

    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(closed_form, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_equals_pytorch_fid_on_general_and_singular_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) * 1.5 + 0.3
    singular_a, singular_b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))  # rank 4 covariances

    for x, y in ((a, b), (singular_a, singular_b)):
        stats_x, stats_y = gaussian_stats(x), gaussian_stats(y)
        expected = _pytorch_fid_frechet(*stats_x, *stats_y)
        assert frechet_distance(*stats_x, *stats_y) == pytest.approx(expected, rel=1e-6)


def test_sampled_gaussians_approach_the_closed_form():
    rng = np.random.default_rng(2)
    real = rng.normal(0, 1, size=(20000, 3))
    generated = rng.normal(1, 2, size=(20000, 3))

    # Per dimension: (1 - 0)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2.
    assert frechet_distance(*gaussian_stats(generated), *gaussian_stats(real)) == pytest.approx(6.0, rel=0.03)


def _styleganv_fvd(detector, real, generated):
    """common_metrics_on_video_quality fvd/styleganv/fvd.py (StyleGAN-V's frechet_video_distance.py): videos BCTHW
    in [0, 1], preprocess_single, get_feats, frechet_distance; the golden."""

    def preprocess_single(video, resolution=224):
        c, t, h, w = video.shape
        scale = resolution / min(h, w)
        target_size = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
        video = F.interpolate(video, size=target_size, mode="bilinear", align_corners=False)
        c, t, h, w = video.shape
        w_start, h_start = (w - resolution) // 2, (h - resolution) // 2
        video = video[:, :, h_start : h_start + resolution, w_start : w_start + resolution]
        return ((video - 0.5) * 2).contiguous()

    def feats(videos):
        with torch.no_grad():
            x = torch.stack([preprocess_single(video) for video in videos])
            return detector(x=x, rescale=False, resize=False, return_features=True).numpy()

    def frechet(feats_fake, feats_real):
        mu_gen, sigma_gen = feats_fake.mean(axis=0), np.cov(feats_fake, rowvar=False)
        mu_real, sigma_real = feats_real.mean(axis=0), np.cov(feats_real, rowvar=False)
        m = np.square(mu_gen - mu_real).sum()
        s = linalg.sqrtm(np.dot(sigma_gen, sigma_real))
        return float(np.real(m + np.trace(sigma_gen + sigma_real - s * 2)))

    def to_bcthw(clips):
        return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 255

    return frechet(feats(to_bcthw(generated)), feats(to_bcthw(real)))


def test_fvd_and_fid_through_random_torchscript_networks_loaded_from_paths(tmp_path):
    save_random_feature_networks(tmp_path)
    rng = np.random.default_rng(3)
    real = [rng.integers(0, 256, size=(4, 40, 56, 3), dtype=np.uint8) for _ in range(9)]
    generated = [np.clip(clip.astype(int) + 60, 0, 255).astype(np.uint8) for clip in real[:8]]
    i3d, inception = load_detector(tmp_path / "i3d.pt"), load_detector(tmp_path / "inception.pt")

    distance = fvd(i3d, real, generated)

    assert distance == pytest.approx(_styleganv_fvd(i3d, real, generated), rel=1e-5) and distance > 0
    assert fvd(i3d, real, real) == pytest.approx(0, abs=1e-6)
    frames = np.concatenate(real)
    assert fid(inception, frames, frames) == pytest.approx(0, abs=1e-6)
    assert fid(inception, frames, np.concatenate(generated)) > 0
    with pytest.raises(ValueError, match="missing.pt: no such feature network file"):
        load_detector(tmp_path / "missing.pt")
