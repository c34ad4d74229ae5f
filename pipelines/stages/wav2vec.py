"""Stage 7: wav2vec2 features of every person's stream, batched across clips: float16 [P, T, 12, C] per clip."""

from __future__ import annotations

import time

import numpy as np
import torch

from multitalk_model.audio import loudness_normalize
from multitalk_model.wav2vec import Wav2VecEncoder
from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.stages.base import add_stage_time


class Wav2VecStage:
    """Actor (map_batches over the `clip` column): holds the encoder, on a GPU when the actor is given one."""

    name = "wav2vec"

    def __init__(self, config: CurationConfig) -> None:
        on_gpu = config.wav2vec.num_gpus > 0 and torch.cuda.is_available()
        self.encoder = Wav2VecEncoder.from_pretrained(
            config.wav2vec.model_path,
            device="cuda" if on_gpu else "cpu",
            dtype=torch.float16 if on_gpu else torch.float32,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips: list[Clip] = [clip for clip in batch["clip"] if not clip.rejected and clip.person_audio is not None]
        # Clips of one run share frame_num, so all their streams have one length and go through in one forward.
        by_length: dict[int, list[Clip]] = {}
        for clip in clips:
            by_length.setdefault(clip.num_frames, []).append(clip)
        for num_frames, group in by_length.items():
            started = time.perf_counter()
            # As at generation: each stream at -23 LUFS before wav2vec2.
            waves = [loudness_normalize(stream) for clip in group for stream in clip.person_audio]
            features = self.encoder.encode_batch(waves, num_frames).to(torch.float16).numpy()
            first = 0
            for clip in group:
                clip.wav2vec = features[first : first + len(clip.person_audio)]
                first += len(clip.person_audio)
            for clip in group:
                add_stage_time(clip, self.name, (time.perf_counter() - started) / len(group))
        return batch
