"""Stage 5: bind speech to faces. Each voiced frame goes to the face whose mouth moves most (when it moves more
than a still face does); each person's audio stream is the mix gated to their frames, with a binding confidence."""

from __future__ import annotations

import numpy as np

from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import AUDIO_RATE, SAMPLE_FPS, RejectReason
from pipelines.stages.base import Stage


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average along the last axis, same length (edges averaged over the part inside)."""
    kernel = np.ones(window)
    total = np.apply_along_axis(np.convolve, -1, values, kernel, mode="same")
    count = np.convolve(np.ones(values.shape[-1]), kernel, mode="same")
    return total / count


def bind_speech(motion: np.ndarray, voiced: np.ndarray, still_motion: float) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the person speech is bound to (-1: nobody) and the margin of that choice (0..1).

    `motion` [P, T] is smoothed mouth motion. The winner of a voiced frame must beat every other face and a still
    face's motion; the margin is (winner - runner-up) / (winner + runner-up), the runner-up counting at least as
    still.
    """
    num_persons, num_frames = motion.shape
    order = np.argsort(-motion, axis=0)
    best = motion[order[0], np.arange(num_frames)]
    runner_up = motion[order[1], np.arange(num_frames)] if num_persons > 1 else np.zeros(num_frames)
    runner_up = np.maximum(runner_up, still_motion)
    bound = voiced & (best > still_motion)
    owner = np.where(bound, order[0], -1)
    margin = np.where(bound, (best - runner_up) / (best + runner_up), 0.0)
    return owner, margin


class SpeakerStage(Stage):
    """Fills `person_masks`, `person_audio` and `binding_confidence`; rejects single/dual clips whose persons do not
    all speak clearly. multi_event clips keep their faces without audio streams."""

    name = "speakers"
    num_cpus = 0.5  # light signal work: shares a core

    def __init__(self, config: CurationConfig) -> None:
        self.config = config.speakers

    def process(self, clip: Clip) -> None:
        if clip.kind == "multi_event":
            return
        motion = smooth(clip.mouth_motion, self.config.smooth_frames)
        owner, margin = bind_speech(motion, clip.voiced, self.config.still_motion)
        num_persons = len(motion)
        clip.person_masks = owner[None] == np.arange(num_persons)[:, None]
        speaking_s = clip.person_masks.sum(axis=1) / SAMPLE_FPS
        clip.binding_confidence = [float(margin[mask].mean()) if mask.any() else 0.0 for mask in clip.person_masks]
        clip.scores["binding_confidence"] = min(clip.binding_confidence)
        for person in range(num_persons):
            if speaking_s[person] < self.config.min_speaking_s:
                detail = f"person {person}: {speaking_s[person]:.2f} s of speech bound to the face"
                clip.reject(self.name, RejectReason.SPEAKER_NOT_BOUND, detail)
                return
            if clip.binding_confidence[person] < self.config.min_binding_confidence:
                detail = f"person {person}: binding confidence {clip.binding_confidence[person]:.2f}"
                clip.reject(self.name, RejectReason.SPEAKER_NOT_BOUND, detail)
                return
        gates = np.repeat(clip.person_masks, AUDIO_RATE // SAMPLE_FPS, axis=1)
        clip.person_audio = (clip.audio[None] * gates).astype(np.float32)
