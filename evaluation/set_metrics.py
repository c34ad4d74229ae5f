"""Set-level metrics of an evaluation: FID and FVD of each system's videos against the test set's ground truth.

They compare distributions, so a system gets one number each (no per-clip row, no bootstrap interval), computed
with evaluation/frechet.py's feature networks (TorchScript files at configured paths) and Frechet distance. Every
video counts with its first `clip_frames` frames (FVD takes clips of one length: the shortest video of the run sets
it); the ground-truth set is every test clip's, the same for every system. They are recomputed from the videos on
every run (feature extraction only; nothing is generated again).
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from evaluation.frechet import frechet_distance, gaussian_stats, image_features, load_detector, video_features
from multitalk_model.media import probe_media, read_video_frames

# Each metric and the config field (of the evaluation's `metrics` section) naming its feature network.
NETWORK_FIELDS = {"fid": "inception_path", "fvd": "i3d_path"}


def feature_stats(
    videos: list[str], clip_frames: int, networks: dict[str, str], device: str = "cpu"
) -> dict[str, tuple[np.ndarray, np.ndarray] | str]:
    """Per metric, the Gaussian (mean, covariance) of the videos' features: Inception features of every frame
    (FID), I3D features of every clip (FVD); or why it cannot be fitted (too few samples)."""
    detectors = {metric: load_detector(path, device) for metric, path in networks.items()}
    features: dict[str, list[np.ndarray]] = {metric: [] for metric in networks}
    for video in videos:
        frames = read_video_frames(video, num_frames=clip_frames)
        if "fid" in detectors:
            features["fid"].append(image_features(detectors["fid"], frames))
        if "fvd" in detectors:
            features["fvd"].append(video_features(detectors["fvd"], [frames]))
    stats: dict[str, tuple[np.ndarray, np.ndarray] | str] = {}
    for metric, rows in features.items():
        try:
            stats[metric] = gaussian_stats(np.concatenate(rows))
        except ValueError:
            stats[metric] = f"needs features of 2 or more {'clips' if metric == 'fvd' else 'frames'}"
    return stats


@ray.remote
def _feature_stats_task(videos: list[str], clip_frames: int, networks: dict[str, str], on_gpu: bool) -> dict:
    return feature_stats(videos, clip_frames, networks, "cuda" if on_gpu and torch.cuda.is_available() else "cpu")


def set_metrics(
    ground_truths: list[str],
    system_videos: dict[str, list[str]],
    networks: dict[str, str | None],
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> dict:
    """FID and FVD of each system's videos against the ground truths, feature sets extracted as parallel Ray tasks.
    Returns {clip_frames, ground_truth_clips, fid: {weights, values: {system: float}, missing: {system: why}},
    fvd: ...}; a metric whose network is not configured, or a system without videos, says so under `missing`."""
    configured = {metric: path for metric, path in networks.items() if path}
    result: dict = {
        metric: {"weights": networks.get(metric), "values": {}, "missing": {}} for metric in NETWORK_FIELDS
    }  # fmt: skip
    for metric, field in NETWORK_FIELDS.items():
        if metric not in configured:
            why = f"not configured (metrics.{field} names no feature network)"
            result[metric]["missing"] = dict.fromkeys(system_videos, why)
    for system, videos in system_videos.items():
        for metric in configured:
            if not ground_truths:
                result[metric]["missing"][system] = "no ground truth (videos scored without a test set)"
            elif not videos:
                result[metric]["missing"][system] = "no scored video of a clip with ground truth"
    systems = {system: videos for system, videos in system_videos.items() if videos}
    everything = [*ground_truths, *(video for videos in systems.values() for video in videos)]
    result["ground_truth_clips"] = len(ground_truths)
    result["clip_frames"] = min((probe_media(video).num_frames for video in everything), default=None)
    if not configured or not ground_truths or not systems:
        return result
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    names = ["ground truth", *systems]
    tasks = [ground_truths, *systems.values()]
    refs = [
        _feature_stats_task.options(**options).remote(videos, result["clip_frames"], configured, num_gpus > 0)
        for videos in tasks
    ]
    stats = dict(zip(names, ray.get(refs), strict=True))
    real = stats.pop("ground truth")
    for system, fitted in stats.items():
        for metric in configured:
            if isinstance(real[metric], str):
                result[metric]["missing"][system] = f"ground truth: {real[metric]}"
            elif isinstance(fitted[metric], str):
                result[metric]["missing"][system] = fitted[metric]
            else:
                result[metric]["values"][system] = frechet_distance(*fitted[metric], *real[metric])
    return result
