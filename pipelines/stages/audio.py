"""Stage 4: the clip's loudness and voice activity at 25 fps (Silero VAD, shipped inside faster-whisper)."""

from __future__ import annotations

import numpy as np
import pyloudnorm
from faster_whisper.vad import VadOptions, get_speech_timestamps

from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import AUDIO_RATE, SAMPLE_FPS, RejectReason
from pipelines.stages.base import Stage

_SAMPLES_PER_FRAME = AUDIO_RATE // SAMPLE_FPS


def voice_activity(wave: np.ndarray, num_frames: int, threshold: float) -> np.ndarray:
    """[num_frames] bool: video frames whose audio lies mostly inside a Silero VAD speech segment."""
    options = VadOptions(threshold=threshold, min_silence_duration_ms=200, speech_pad_ms=30)
    speech = np.zeros(num_frames * _SAMPLES_PER_FRAME, dtype=bool)
    for segment in get_speech_timestamps(wave, options):
        speech[segment["start"] : segment["end"]] = True
    return speech.reshape(num_frames, _SAMPLES_PER_FRAME).mean(axis=1) > 0.5


class AudioStage(Stage):
    """Fills `voiced` and the loudness and speech scores; single and dual clips without speech are rejected."""

    name = "audio"
    num_cpus = 0.5  # light signal work: shares a core

    def __init__(self, config: CurationConfig) -> None:
        self.config = config.audio

    def process(self, clip: Clip) -> None:
        if clip.audio is None:  # only multi_event clips get here without audio
            return
        meter = pyloudnorm.Meter(AUDIO_RATE)
        loudness = meter.integrated_loudness(clip.audio.astype(np.float64))
        clip.voiced = voice_activity(clip.audio, clip.num_frames, self.config.vad_threshold)
        speech_s = float(clip.voiced.sum()) / SAMPLE_FPS
        clip.scores.update(loudness_lufs=float(loudness) if np.isfinite(loudness) else None, speech_s=speech_s)
        if clip.kind != "multi_event" and speech_s < self.config.min_speech_s:
            clip.reject(self.name, RejectReason.NO_SPEECH, f"{speech_s:.2f} s of voice activity")
