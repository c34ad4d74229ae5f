"""A job's finished clips, kept with the job in the storage, so that a retry on any replica resumes after the last.

A long streaming job that is interrupted (its replica or its node died) is not started over: its retry encodes the
clips an earlier attempt finished and generates only the rest, with the same video as an uninterrupted run
(multitalk_model.generation.ClipStore). Each finished clip is two files under jobs/<id>/clips/: its new frames,
then its state (the motion frames the next clip is conditioned on and the noise generator's state). A clip counts
as finished once its state is there. The storage is the one every node sees (a shared directory or an object
store), so the retry finds them wherever it runs. They go once the job has ended.
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch

from multitalk_model.generation import ClipState
from platform_common.pause import pause_point

from .storage import Storage, job_file

_STATE = re.compile(r"^(\d{5})\.state\.npz$")


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # lossless: the resumed video equals an uninterrupted run's
    return buffer.getvalue()


class JobClips:
    """The finished clips of one job in the storage (a multitalk_model.generation.ClipStore)."""

    def __init__(self, storage: Storage, job_id: str) -> None:
        self.storage = storage
        self.folder = job_file(job_id, "clips")

    def _key(self, clip: int, part: str) -> str:
        return f"{self.folder}/{clip:05d}.{part}.npz"

    def last(self) -> ClipState | None:
        finished = [int(match[1]) for name in self.storage.names(self.folder) if (match := _STATE.match(name))]
        if not finished:
            return None
        with np.load(io.BytesIO(self.storage.read_bytes(self._key(max(finished), "state")))) as stored:
            clip, clips, computed, skipped = (int(value) for value in stored["counters"])
            noise_state = torch.from_numpy(stored["noise_state"])
            return ClipState(clip, clips, stored["motion"], noise_state, computed, skipped)

    def frames(self, clip: int) -> np.ndarray:
        with np.load(io.BytesIO(self.storage.read_bytes(self._key(clip, "frames")))) as stored:
            return stored["frames"]

    def save(self, state: ClipState, frames: np.ndarray) -> None:
        self.storage.write_bytes(self._key(state.clip, "frames"), _npz(frames=frames))
        counters = np.array([state.clip, state.clips, state.cache_computed, state.cache_skipped])
        self.storage.write_bytes(
            self._key(state.clip, "state"),
            _npz(motion=state.motion, noise_state=state.noise_state.numpy(), counters=counters),
        )
        pause_point("generator-clip-finished")

    def clear(self) -> None:
        """Removes the stored clips (the job has ended: its video is stored, or it will not be retried)."""
        self.storage.delete(self.folder)
