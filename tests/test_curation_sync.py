"""Curation's sync filter and speaker binding on real media, with no weights configured (the landmark score of
evaluation.lipsync, the binding matrix of evaluation.binding): talking videos with their own audio pass, the same
videos with another video's audio are rejected as out of sync (at the calibrated threshold most swapped clips are,
not all: benchmarks/quality.py prints the shares), the speech of a conversation goes to the person whose lips
follow it, and a dual clip whose person streams are swapped fails the binding."""

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
from pipelines.stages.audio import AudioStage
from pipelines.stages.speakers import SpeakerStage
from pipelines.stages.sync import SyncStage

NUM_FRAMES = 81  # one curation clip
TURN_S = 5.04  # conversation_left_then_right.mp4: the left person speaks before, the right one after


def _clip(video: Path, audio: np.ndarray, kind: str = "single", start_s: float = 0.0, **fields) -> Clip:
    frames = read_video_frames(video, start_s=start_s, num_frames=NUM_FRAMES)
    audio = audio[: NUM_FRAMES * 640]
    mp4 = write_video(Path(fields.pop("scratch")) / f"{video.stem}.mp4", frames, 25, audio[None], 16000)
    tracks = detect_tracks(frames, 2 if kind == "dual" else 1)
    return Clip(
        source=str(video), kind=kind, num_frames=NUM_FRAMES, mp4=mp4.read_bytes(), audio=audio, tracks=tracks, **fields
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("config")
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"input": "in", "output": "out", "wav2vec": {"model_path": "."}})
    )
    return load_config(folder / "config.yaml")


@pytest.fixture(scope="module")
def stage(config) -> SyncStage:
    return SyncStage(config)


@pytest.mark.parametrize(
    ("video", "other_audio"),
    [
        ("talking_man_30fps.mp4", "dubbing_speech_16k.wav"),
        ("talking_woman_25fps.mp4", "talking_man_30fps.mp4"),
        ("talking_man_25fps.mp4", "one_person_studio.wav"),
    ],
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


def _energy_fraction(wave: np.ndarray, start_s: float, window_s: tuple[float, float]) -> float:
    """Share of a stream's energy that lies inside a window of source time."""
    times = start_s + np.arange(len(wave)) / 16000
    inside = (times >= window_s[0]) & (times < window_s[1])
    return float(np.sum(wave[inside] ** 2) / np.sum(wave**2))


@pytest.mark.parametrize("start_s", [3.24, 4.0])
def test_conversation_speech_goes_to_the_person_whose_lips_follow_it(shared_media, config, tmp_path, start_s):
    video = shared_media / "conversation_left_then_right.mp4"
    clip = _clip(video, load_speech(video)[round(start_s * 16000) :], "dual", start_s, scratch=tmp_path)

    for stage in (AudioStage(config), SpeakerStage(config)):
        stage({"clip": clip})

    assert not clip.rejected, clip.reject_detail
    left, right = clip.person_audio
    assert _energy_fraction(left, start_s, (0.0, TURN_S)) >= 0.9
    assert _energy_fraction(right, start_s, (TURN_S, 10.04)) >= 0.9
    assert min(clip.binding_confidence) >= config.speakers.min_binding_confidence


def test_conversation_window_with_one_speaker_binds_nothing_to_the_still_face(shared_media, config, tmp_path):
    video = shared_media / "conversation_left_then_right.mp4"
    clip = _clip(video, load_speech(video), "dual", scratch=tmp_path)  # [0, 3.24) s: only the left person speaks

    for stage in (AudioStage(config), SpeakerStage(config)):
        stage({"clip": clip})

    assert (clip.reject_stage, clip.reject_reason) == ("speakers", "speaker not bound")
    assert clip.person_masks[0].sum() > 0 and clip.person_masks[1].sum() == 0
