"""Stage 5: bind speech to faces with evaluation.binding's persons x streams matrix. The speech around each voiced
frame (the mix gated to the `window_frames` centred on it) is a stream of its own; the frame goes to the person
whose lip landmarks follow that stream best, when they follow it at all (a still face scores 0). Each person's
audio stream is the mix gated to their frames, with a binding confidence."""

from __future__ import annotations

import numpy as np

from evaluation.binding import binding_matrix
from evaluation.lipsync import SAMPLES_PER_FRAME, smooth, speech_signal
from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import AUDIO_RATE, SAMPLE_FPS, RejectReason
from pipelines.stages.base import Stage, lip_motion


def bind_speech(
    lips: np.ndarray, wave: np.ndarray, voiced: np.ndarray, window_frames: int, max_offset: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the person speech is bound to (-1: nobody) and the margin of that choice (0..1).

    `lips` [P, 2, T] is each person's lip speed and opening (`evaluation.landmarks.mouth_signals`), `wave` the
    clip's 16 kHz mix.
    The winner of a voiced frame must follow the speech around it better than every other face and than a still
    face (confidence 0), and move its lips most around it; the margin is its confidence minus the runner-up's, the
    runner-up counting at least as still.
    """
    num_persons, _, num_frames = lips.shape
    owner, margin = np.full(num_frames, -1), np.zeros(num_frames)
    frames = np.flatnonzero(voiced)
    if len(frames) == 0:
        return owner, margin
    streams = []
    for frame in frames:
        first, last = max(0, frame - window_frames // 2), min(num_frames, frame + window_frames // 2 + 1)
        gate = slice(first * SAMPLES_PER_FRAME, last * SAMPLES_PER_FRAME)
        stream = np.zeros(num_frames * SAMPLES_PER_FRAME, dtype=np.float32)
        stream[gate] = wave[gate]
        streams.append(speech_signal(stream, num_frames))
    matrix = binding_matrix(lips, np.stack(streams), max_offset)  # [P, voiced frames]
    ranked = np.sort(matrix, axis=0)
    best = ranked[-1]
    runner_up = np.maximum(ranked[-2] if num_persons > 1 else 0.0, 0.0)
    winner = matrix.argmax(axis=0)
    # Landmark jitter lets a still face correlate a little with any speech: the winner must also be the face whose
    # lips move most around the frame.
    most_moving = smooth(lips[:, 0], window_frames)[:, frames].argmax(axis=0)
    bound = (best > 0) & (winner == most_moving)
    owner[frames] = np.where(bound, winner, -1)
    margin[frames] = np.where(bound, best - runner_up, 0.0)
    return owner, margin


class SpeakerStage(Stage):
    """Fills `person_masks`, `person_audio` and `binding_confidence`; rejects single/dual clips whose persons do not
    all speak clearly. multi_event clips keep their faces without audio streams."""

    name = "speakers"
    num_cpus = 1.0  # decoding the clip and fitting landmarks (kept for the sync stage): a core

    def __init__(self, config: CurationConfig) -> None:
        self.config = config.speakers
        self.max_offset = config.sync.max_offset_frames

    def process(self, clip: Clip) -> None:
        if clip.kind == "multi_event":
            return
        owner, margin = bind_speech(
            lip_motion(clip), clip.audio, clip.voiced, self.config.window_frames, self.max_offset
        )
        num_persons = len(clip.tracks)
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
