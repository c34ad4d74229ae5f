"""Stage 6: audio-visual sync per person: the best correlation between the person's audio energy and their mouth
motion over a range of offsets (the binding signal of stage 5; a SyncNet replaces it when its weights exist)."""

from __future__ import annotations

import numpy as np

from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import AUDIO_RATE, SAMPLE_FPS, RejectReason
from pipelines.stages.base import Stage


def sync_score(energy: np.ndarray, motion: np.ndarray, max_offset: int) -> tuple[float, int]:
    """(best Pearson correlation, its offset): the audio of frame t matches the mouth at frame t + offset."""
    best, best_offset = -1.0, 0
    for offset in range(-max_offset, max_offset + 1):
        audio = energy[max(0, -offset) : len(energy) - max(0, offset)]
        video = motion[max(0, offset) : len(motion) - max(0, -offset)]
        if len(audio) < 3 or audio.std() == 0 or video.std() == 0:
            continue
        correlation = float(np.corrcoef(audio, video)[0, 1])
        # Ties (a flat correlation curve) go to the smallest offset.
        if correlation > best + 1e-9 or (abs(correlation - best) <= 1e-9 and abs(offset) < abs(best_offset)):
            best, best_offset = correlation, offset
    return best, best_offset


class SyncStage(Stage):
    """Fills `sync_confidence` and `sync_offset` per person; rejects single/dual clips below the threshold."""

    name = "sync"
    num_cpus = 0.5  # light signal work: shares a core

    def __init__(self, config: CurationConfig) -> None:
        self.config = config.sync

    def process(self, clip: Clip) -> None:
        if clip.kind == "multi_event":
            return
        frames = clip.person_audio.reshape(len(clip.person_audio), clip.num_frames, AUDIO_RATE // SAMPLE_FPS)
        energy = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=2))
        scores = [
            sync_score(energy[p], clip.mouth_motion[p], self.config.max_offset_frames) for p in range(len(energy))
        ]
        clip.sync_confidence = [score for score, _ in scores]
        clip.sync_offset = [offset for _, offset in scores]
        clip.scores.update(sync_confidence=min(clip.sync_confidence), sync_offset=float(np.mean(clip.sync_offset)))
        if min(clip.sync_confidence) < self.config.min_confidence:
            clip.reject(self.name, RejectReason.LOW_SYNC, f"sync scores {[round(s, 2) for s in clip.sync_confidence]}")
