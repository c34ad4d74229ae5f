"""`default_kind: auto`: a folder input needs no kind per video; the faces stage makes a clip with one face track
single and one with two dual, records why, and rejects other counts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import yaml

from multitalk_model.media import read_video_frames
from pipelines.config import load_config
from pipelines.record import Clip
from pipelines.stages.faces import FaceStage
from pipelines.storage import list_inputs

NUM_FRAMES = 17


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> FaceStage:
    folder = tmp_path_factory.mktemp("config")
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"input": "in", "output": "out", "wav2vec": {"model_path": "."}})
    )
    config = load_config(folder / "config.yaml")
    assert config.default_kind == "auto"
    return FaceStage(config)


def _auto_clip(frames: np.ndarray) -> Clip:
    scale = max(frames.shape[1:3]) / 320
    size = (round(frames.shape[2] / scale), round(frames.shape[1] / scale))
    detect = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in frames])
    return Clip(source="video.mp4", kind="auto", num_frames=len(frames), detect_frames=detect, detect_scale=scale)


@pytest.mark.parametrize(
    ("video", "kind", "reason"),
    [("talking_woman_25fps.mp4", "single", "auto: 1 face track"),
     ("conversation_left_then_right.mp4", "dual", "auto: 2 face tracks")],
)  # fmt: skip
def test_auto_decides_the_kind_from_the_face_tracks(shared_media, stage, video, kind, reason):
    clip = _auto_clip(read_video_frames(shared_media / video, num_frames=NUM_FRAMES))

    stage({"clip": clip})

    assert not clip.rejected, clip.reject_detail
    assert (clip.kind, clip.kind_reason) == (kind, reason)
    assert len(clip.tracks) == {"single": 1, "dual": 2}[kind]


def test_auto_rejects_a_clip_without_faces(stage):
    clip = _auto_clip(np.full((NUM_FRAMES, 240, 320, 3), 90, dtype=np.uint8))

    stage({"clip": clip})

    assert (clip.reject_reason, clip.reject_detail) == (
        "face count",
        "auto: 0 face tracks, neither single (1) nor dual (2)",
    )


def test_a_folder_lists_its_videos_as_auto_by_default(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")

    assert list_inputs(str(tmp_path), "auto") == [{"source": str(tmp_path / "a.mp4"), "kind": "auto", "caption": None}]
