"""What every per-clip stage shares: rejected records pass through untouched, and an input that a stage cannot
use becomes a reject naming the stage and the error instead of failing the run."""

from __future__ import annotations

import logging
from typing import ClassVar

import av

from pipelines.record import Clip
from pipelines.schema import RejectReason

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
            try:
                self.process(clip)
            except INPUT_ERRORS as error:
                logger.warning("%s: %s rejected %s: %s", self.name, clip.source, clip.clip_id, error)
                clip.reject(self.name, RejectReason.ERROR, f"{type(error).__name__}: {error}")
        return {"clip": clip}

    def process(self, clip: Clip) -> None:
        raise NotImplementedError
