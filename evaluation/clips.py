"""One clip of an evaluation: generate it from its first frame, audio and caption under the protocol, and score a
video against the clip's audio, reference frame and ground truth with the quality metrics. The Ray evaluation job
(evaluate.py) and training's periodic evaluation both go through these functions."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from evaluation.fidelity import pixel_fidelity
from evaluation.score import ScoreInputError, score_video
from evaluation.testset import TestClip
from multitalk_model.checkpoints import load_weights
from multitalk_model.config import check_clip_frames
from multitalk_model.generation import MultiTalkPipeline
from multitalk_model.jobs import GenerationJob
from platform_common.config import ConfigSection


class Protocol(ConfigSection):
    """The generation settings every model is evaluated under (recorded with the results)."""

    steps: int = Field(default=40, ge=1, description="sampling steps")
    text_guidance: float = Field(default=5.0, ge=0, description="text guidance scale")
    audio_guidance: float = Field(default=4.0, ge=0, description="audio guidance scale")
    shift: float | None = Field(default=None, gt=0, description="timestep shift (default: 7 at 480p, 11 at 720p)")
    size: Literal["480p", "720p"] = Field(default="480p", description="area bucket of the generated video")
    resolution: tuple[int, int] | None = Field(
        default=None, description="explicit [height, width] (multiples of 16) instead of the size bucket"
    )
    frame_num: int = Field(default=81, ge=5, description="frames generated per clip (4n + 1)")
    seed: int = Field(default=42, ge=0, description="seed of the initial noise, the same for every clip and model")
    prompt: str = Field(default="", description="prompt of clips without a caption")

    _frames_are_4n_plus_1 = field_validator("frame_num")(check_clip_frames)


class ModelSpec(ConfigSection):
    """One model under evaluation."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$", description="its name in the results (a folder name)")
    model_dir: str = Field(description="model directory (multitalk_model.components layout)")
    audio_weights: str | None = Field(
        default=None, description="official-format audio weights replacing the directory's (e.g. a training export)"
    )


def load_pipeline(model: ModelSpec, device: str | torch.device, dtype: torch.dtype) -> MultiTalkPipeline:
    """The model's generation pipeline, its audio branch replaced by `audio_weights` when the spec names a file."""
    pipeline = MultiTalkPipeline.from_model_dir(model.model_dir, device=device, dtype=dtype)
    if model.audio_weights:
        # Not strict: the file holds the audio branch only; unknown or mis-shaped keys still fail.
        load_weights(pipeline.components.transformer, [(model.audio_weights, "original")], dtype, device, strict=False)
    return pipeline


def generation_job(clip: TestClip, protocol: Protocol) -> GenerationJob:
    """The clip as a generation job: its first frame, one audio stream per person (simultaneous: each stream is
    already on the clip's timeline), its boxes and caption, under the protocol."""
    boxes = clip.boxes or [None] * clip.n_person
    settings = protocol.model_dump(exclude={"prompt"})
    return GenerationJob(
        image=clip.reference_image,
        persons=[{"audio": audio, "box": box} for audio, box in zip(clip.audio, boxes, strict=True)],
        prompt=clip.caption or protocol.prompt,
        audio_type="para",
        mode="clip",
        motion_frames=1,  # one clip: no later clip is conditioned on its last frames
        **settings,
    )


def generate_clip(pipeline: MultiTalkPipeline, clip: TestClip, protocol: Protocol, out_path: str | Path) -> float:
    """Generate the clip into out_path (written whole or not at all); returns the seconds it took."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.stem}.partial{out_path.suffix}")
    started = time.perf_counter()
    pipeline.generate(generation_job(clip, protocol), partial)
    os.replace(partial, out_path)  # a killed run leaves no half-written video under the real name
    return time.perf_counter() - started


# What score_video reports about the video rather than about its quality.
_DESCRIPTIVE = {"video", "num_frames", "num_persons"}


def flatten_scores(scores: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested score dict as dotted names (sync.confidence, binding.accuracy, ...); matrices,
    assignments, per-stream lists, labels and the video's description are left out: not one metric per clip."""
    flat: dict[str, float] = {}
    for key, value in scores.items():
        name = f"{prefix}{key}"
        if not prefix and key in _DESCRIPTIVE:
            continue
        if isinstance(value, dict):
            flat.update(flatten_scores(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def score_clip(
    video: str | Path, clip: TestClip, syncnet_weights: str | None = None
) -> tuple[dict[str, float], str | None, float]:
    """The metrics of a video of the clip (flattened), why the face metrics could not be computed (None when they
    were), and the seconds it all took. Pixel fidelity needs only the ground truth; the quality package's metrics
    need the faces, which a random model's noise does not show."""
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    if clip.ground_truth:
        metrics.update(flatten_scores({"fidelity": pixel_fidelity(video, clip.ground_truth)}))
    problem = None
    try:
        scores = score_video(
            str(video),
            audio=clip.audio,
            reference_image=clip.reference_image,
            ground_truth=clip.ground_truth,
            syncnet_weights=syncnet_weights,
        )
        metrics.update(flatten_scores(scores))
    except ScoreInputError as error:
        problem = str(error)
    return metrics, problem, time.perf_counter() - started
