"""Stage 5b (optional): word timings from faster-whisper, each word given to the person whose speech it falls in.
Runs only when `asr.model_path` is set; models are never downloaded."""

from __future__ import annotations

import numpy as np
from faster_whisper import WhisperModel

from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import SAMPLE_FPS
from pipelines.stages.base import Stage


class AsrStage(Stage):
    """Actor: holds the Whisper model. Fills `words` of clips that have audio."""

    name = "asr"  # its CPUs and actor count come from the asr config

    def __init__(self, config: CurationConfig) -> None:
        self.language = config.asr.language
        device = "cuda" if config.asr.num_gpus > 0 else "cpu"  # only the device Ray gave the actor
        self.model = WhisperModel(config.asr.model_path, device=device, compute_type=config.asr.compute_type)

    def process(self, clip: Clip) -> None:
        if clip.audio is None:
            return
        # Greedy decoding only: Whisper's default temperature fallback samples, and a curated corpus must be
        # reproducible run to run.
        segments, _ = self.model.transcribe(clip.audio, language=self.language, word_timestamps=True, temperature=0.0)
        for segment in segments:
            for word in segment.words or []:
                clip.words.append(
                    {
                        "word": word.word,
                        "start_s": round(float(word.start), 3),
                        "end_s": round(float(word.end), 3),
                        "probability": round(float(word.probability), 4),
                        "person": self._speaker(clip, (word.start + word.end) / 2),
                    }
                )

    @staticmethod
    def _speaker(clip: Clip, time_s: float) -> int | None:
        if clip.person_masks is None:
            return None
        frame = min(int(time_s * SAMPLE_FPS), clip.num_frames - 1)
        owners = np.flatnonzero(clip.person_masks[:, frame])  # at most one: each frame is bound to one person
        return int(owners[0]) if len(owners) else None
