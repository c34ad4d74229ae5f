"""Stage 1: probe an input, hash its content, and load its audio as 16 kHz mono; unusable inputs are rejected."""

from __future__ import annotations

import numpy as np

from multitalk_model.audio import AudioError, load_speech
from multitalk_model.media import MediaError, probe_media
from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import SAMPLE_FPS, RejectReason
from pipelines.stages.base import Stage
from pipelines.storage import file_hash, local_copy


class ProbeStage(Stage):
    """Duration, frame rate and audio of a source; rejects unreadable, too short, audio-less and silent ones."""

    name = "probe"
    num_cpus = 1.0

    def __init__(self, config: CurationConfig) -> None:
        self.frame_num = config.clips.frame_num
        self.silence_dbfs = config.audio.silence_dbfs

    def process(self, clip: Clip) -> None:
        path = local_copy(clip.source)
        try:
            info = probe_media(path)
        except MediaError as error:
            clip.reject(self.name, RejectReason.UNREADABLE, str(error))
            return
        clip.source_hash = file_hash(path)
        clip.source_fps, clip.source_duration_s = info.fps, info.duration_s
        if info.duration_s * SAMPLE_FPS < self.frame_num:
            detail = f"{info.duration_s:.2f} s < one clip of {self.frame_num} frames"
            clip.reject(self.name, RejectReason.TOO_SHORT, detail)
            return
        needs_audio = clip.kind != "multi_event"  # the image-to-video task trains without audio
        if not info.has_audio:
            if needs_audio:
                clip.reject(self.name, RejectReason.NO_AUDIO_TRACK, f"{clip.source}: no audio stream")
            return
        try:
            clip.source_audio = load_speech(path)
        except AudioError as error:
            if needs_audio:
                clip.reject(self.name, RejectReason.NO_AUDIO_TRACK, str(error))
            return
        rms = float(np.sqrt(np.mean(np.square(clip.source_audio, dtype=np.float64))))
        level_dbfs = 20 * np.log10(max(rms, 1e-12))
        if needs_audio and level_dbfs < self.silence_dbfs:
            clip.reject(self.name, RejectReason.SILENT_AUDIO, f"RMS {level_dbfs:.1f} dBFS < {self.silence_dbfs} dBFS")
