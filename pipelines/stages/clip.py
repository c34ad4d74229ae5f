"""Stage 2b: decode a window at 25 fps, bring it to its resolution bucket, and encode the clip's mp4 with its audio."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np

from multitalk_model.media import read_video_frames, write_video
from multitalk_model.regions import resize_and_center_crop, target_size
from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import AUDIO_RATE, SAMPLE_FPS
from pipelines.stages.base import Stage
from pipelines.storage import local_copy


class ClipStage(Stage):
    """Fills `mp4`, `width`, `height` and the downscaled frames the face stage detects on."""

    name = "clip"
    num_cpus = 1.0

    def __init__(self, config: CurationConfig) -> None:
        self.resolution = config.clips.resolution
        self.crf = config.clips.crf
        self.detect_max_side = config.faces.detect_max_side

    def process(self, clip: Clip) -> None:
        frames = read_video_frames(local_copy(clip.source), SAMPLE_FPS, clip.start_s, clip.num_frames)
        size_hw = target_size(*frames.shape[1:3], self.resolution)
        frames = np.stack([resize_and_center_crop(frame, size_hw) for frame in frames])
        clip.height, clip.width = size_hw
        clip.detect_scale = max(size_hw) / self.detect_max_side
        detect_hw = (round(size_hw[1] / clip.detect_scale), round(size_hw[0] / clip.detect_scale))
        clip.detect_frames = np.stack([cv2.resize(frame, detect_hw, interpolation=cv2.INTER_AREA) for frame in frames])
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / f"{clip.clip_id}.mp4"
            audio = clip.audio[None] if clip.audio is not None else None
            write_video(path, frames, SAMPLE_FPS, audio=audio, audio_rate=AUDIO_RATE, crf=self.crf)
            clip.mp4 = path.read_bytes()
