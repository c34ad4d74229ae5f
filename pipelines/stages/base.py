"""What every per-clip stage shares: rejected records pass through untouched, and an input that a stage cannot
use becomes a reject naming the stage and the error instead of failing the run."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import av
import numpy as np

from evaluation.landmarks import landmarks_68, mouth_signals
from multitalk_model.media import read_video_frames
from pipelines.record import Clip
from pipelines.schema import SAMPLE_FPS, RejectReason
from platform_common.pause import pause_point

logger = logging.getLogger(__name__)

# Errors that bad media raise (MediaError and AudioError are ValueErrors; decord raises RuntimeError subclasses).
# Anything else is a bug and fails the run.
INPUT_ERRORS = (ValueError, OSError, RuntimeError, av.FFmpegError)


class Stage:
    """A step on one record: `process` fills fields of the clip or rejects it."""

    name: ClassVar[str]
    num_cpus: ClassVar[float] = 1.0  # Ray resources of one task (or actor) of the stage

    def __call__(self, row: dict) -> dict:
        clip: Clip = row["clip"]
        if not clip.rejected:
            started = time.perf_counter()
            try:
                self.process(clip)
            except INPUT_ERRORS as error:
                logger.warning("%s: %s rejected %s: %s", self.name, clip.source, clip.clip_id, error)
                clip.reject(self.name, RejectReason.ERROR, f"{type(error).__name__}: {error}")
            add_stage_time(clip, self.name, time.perf_counter() - started)
            pause_point(f"curation-after-{self.name}")
        return {"clip": clip}

    def process(self, clip: Clip) -> None:
        raise NotImplementedError


def add_stage_time(clip: Clip, stage: str, seconds: float) -> None:
    """Count worker seconds spent on a record by a stage (the report's per-stage time)."""
    clip.stage_seconds[stage] = clip.stage_seconds.get(stage, 0.0) + seconds


def clip_frames(clip: Clip, start_frame: int = 0, num_frames: int | None = None) -> np.ndarray:
    """RGB frames [T, H, W, 3] decoded from the clip's mp4: what training will see, at clip resolution."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "clip.mp4"
        path.write_bytes(clip.mp4)
        count = clip.num_frames - start_frame if num_frames is None else num_frames
        return read_video_frames(path, SAMPLE_FPS, start_frame / SAMPLE_FPS, count)


def lip_motion(clip: Clip) -> np.ndarray:
    """[P, 2, T] each person's lip speed and opening (dlib landmarks, `evaluation.landmarks.mouth_signals`) on the
    clip's frames: fitted once, by the first stage that asks (speakers), and kept on the clip for the next (sync)."""
    if clip.lip_motion is None:
        clip.lip_motion = mouth_signals(landmarks_68(clip_frames(clip), clip.tracks))
    return clip.lip_motion
