"""Curation's sync filter on real media, with no weights configured (the landmark score of evaluation.lipsync):
talking videos with their own audio pass, the same videos with another video's audio are rejected as out of
sync, and a dual clip whose person streams are swapped fails the binding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from evaluation.landmarks import detect_tracks
from multitalk_model.audio import load_speech
from multitalk_model.media import read_video_frames, write_video
from pipelines.config import load_config
from pipelines.record import Clip
from pipelines.stages.sync import SyncStage

NUM_FRAMES = 81  # one curation clip


def _clip(video: Path, audio: np.ndarray, kind: str = "single", start_s: float = 0.0, **fields) -> Clip:
    frames = read_video_frames(video, start_s=start_s, num_frames=NUM_FRAMES)
    audio = audio[: NUM_FRAMES * 640]
    mp4 = write_video(Path(fields.pop("scratch")) / f"{video.stem}.mp4", frames, 25, audio[None], 16000)
    tracks = detect_tracks(frames, 2 if kind == "dual" else 1)
    return Clip(
        source=str(video), kind=kind, num_frames=NUM_FRAMES, mp4=mp4.read_bytes(), audio=audio, tracks=tracks, **fields
    )


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> SyncStage:
    folder = tmp_path_factory.mktemp("config")
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"input": "in", "output": "out", "wav2vec": {"model_path": "."}})
    )
    return SyncStage(load_config(folder / "config.yaml"))


@pytest.mark.parametrize(
    ("video", "other_audio"),
    [("talking_man_30fps.mp4", "dubbing_speech_16k.wav"), ("talking_woman_25fps.mp4", "talking_man_30fps.mp4")],
)
def test_own_audio_passes_and_another_videos_audio_is_rejected(shared_media, stage, tmp_path, video, other_audio):
    own = _clip(shared_media / video, load_speech(shared_media / video), scratch=tmp_path)
    swapped = _clip(shared_media / video, load_speech(shared_media / other_audio), scratch=tmp_path)

    stage({"clip": own})
    stage({"clip": swapped})

    assert not own.rejected and own.sync_source == "landmarks", own.reject_detail
    assert (swapped.reject_stage, swapped.reject_reason) == ("sync", "low sync")
    assert own.scores["sync_confidence"] > swapped.scores["sync_confidence"]


def test_dual_clip_binds_each_stream_to_its_person(shared_media, stage, tmp_path):
    video = shared_media / "conversation_left_then_right.mp4"
    start_s = 3.5
    wave = load_speech(video)[int(start_s * 16000) :][: NUM_FRAMES * 640]
    turn = int((5.04 - start_s) * 16000)
    left, right = wave.copy(), wave.copy()
    left[turn:], right[:turn] = 0, 0
    in_order = _clip(video, wave, "dual", start_s, scratch=tmp_path, person_audio=np.stack([left, right]))
    swapped = _clip(video, wave, "dual", start_s, scratch=tmp_path, person_audio=np.stack([right, left]))

    stage({"clip": in_order})
    stage({"clip": swapped})

    assert not in_order.rejected and in_order.scores["binding_accuracy"] == 1.0, in_order.reject_detail
    assert swapped.reject_reason == "speaker not bound" and swapped.scores["binding_accuracy"] == 0.0
