"""SyncNet sync scoring (stage 6): the MFCC front end equals python_speech_features, the model keeps the layout of
syncnet_python's released checkpoint, the offset/Sync-C/Sync-D arithmetic of SyncNetInstance.evaluate, face crops
along a track, and the stage scoring real clips with a random-weight SyncNet loaded from a file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evaluation.mfcc import mfcc
from evaluation.syncnet import CROP_SIZE, SyncNet, distance_table, face_crops, load_syncnet, offset_and_confidence
from multitalk_model.audio import load_speech
from multitalk_model.faces import MTCNNDetector
from multitalk_model.media import read_video_frames, write_video
from pipelines.config import CurationConfig, load_config
from pipelines.record import Clip
from pipelines.stages.sync import SyncStage

NUM_FRAMES = 9  # four lip windows: enough to run every step, cheap on a CPU


def test_mfcc_equals_python_speech_features_on_a_two_tone_signal():
    times = np.arange(1600) / 16000
    pcm = np.round(8000 * np.sin(2 * np.pi * 440 * times) + 4000 * np.sin(2 * np.pi * 1200 * times))
    # python_speech_features 0.6: mfcc(pcm.astype(np.int16), 16000), rows 0, 4 and 8.
    expected = [
        [20.0801, 12.479, -14.3834, -19.6994, -6.14182, -3.98145, -26.4488, -46.9468, -28.9211, 18.4411, 49.4371,
         35.1566, -1.40677],
        [20.0891, 37.9364, -22.429, -33.3192, -14.6855, 1.88507, -13.5802, -35.8033, -26.2712, 13.7018, 42.2255,
         32.1617, 2.03739],
        [19.8637, 14.8327, -14.4164, -22.3675, -8.08261, -1.83378, -20.027, -39.887, -25.8752, 15.3039, 43.0747,
         30.8945, -0.791398],
    ]  # fmt: skip

    cepstra = mfcc(pcm, 16000)

    assert cepstra.shape == (9, 13)
    np.testing.assert_allclose(cepstra[[0, 4, 8]], expected, rtol=1e-5, atol=1e-4)


def test_mfcc_has_four_frames_per_video_frame_minus_one():
    assert mfcc(np.random.default_rng(0).normal(size=81 * 640) * 3000).shape == (4 * 81 - 1, 13)


def test_syncnet_embeds_lip_and_audio_windows_into_one_space():
    model = SyncNet().eval()

    with torch.no_grad():
        lips = model.forward_lip(torch.rand(2, 3, 5, CROP_SIZE, CROP_SIZE) * 255)
        audio = model.forward_aud(torch.randn(2, 1, 13, 20))

    assert lips.shape == audio.shape == (2, 1024)


def test_syncnet_loads_a_checkpoint_saved_without_batchnorm_counters(tmp_path):
    torch.manual_seed(0)
    source = SyncNet().eval()
    # The released syncnet_v2.model predates BatchNorm's num_batches_tracked buffers.
    state = {key: value for key, value in source.state_dict().items() if not key.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "syncnet_v2.model")
    torch.save({"netcnnaud.0.weight": state["netcnnaud.0.weight"]}, tmp_path / "partial.model")

    loaded = load_syncnet(tmp_path / "syncnet_v2.model")

    mfcc_windows = torch.randn(3, 1, 13, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_aud(mfcc_windows), source.forward_aud(mfcc_windows))
    with pytest.raises(ValueError, match="partial.model: not a SyncNet state dict"):
        load_syncnet(tmp_path / "partial.model")


def test_offset_and_confidence_of_a_constructed_distance_table():
    vshift = 15
    profile = np.abs(np.arange(2 * vshift + 1) - (vshift + 4)).astype(float) + 2.0  # least at shift index 19
    table = np.tile(profile, (6, 1))
    table[0, vshift + 4] = 5.0  # one frame disagrees; the mean over frames still decides

    offset, confidence, distance = offset_and_confidence(table, vshift)

    mean = table.mean(axis=0)
    assert offset == -4
    assert distance == pytest.approx(mean[vshift + 4]) == pytest.approx(2.5)
    assert confidence == pytest.approx(np.median(mean) - mean[vshift + 4])


@pytest.mark.parametrize("lead", [3, -2, 0])
def test_offset_search_finds_a_known_shift_between_feature_streams(lead):
    lips = torch.randn(60, 32, generator=torch.Generator().manual_seed(1))
    audio = torch.roll(lips, -lead, dims=0)  # the audio of frame t - lead goes with the lips of frame t

    offset, confidence, distance = offset_and_confidence(distance_table(lips, audio, 15), 15)

    assert offset == lead
    assert confidence > 5 and distance < 1


def test_face_crops_follow_the_track_and_pad_with_grey_outside_the_frame():
    frames = np.full((3, 200, 200, 3), 40, dtype=np.uint8)
    frames[:, 60:100, 80:120] = (255, 0, 0)  # a red "face" 40 px square: half size 20
    inside = np.tile([80.0, 60.0, 120.0, 100.0], (3, 1))
    at_edge = np.tile([0.0, 60.0, 40.0, 100.0], (3, 1))

    crops = face_crops(frames, inside)
    edge_crops = face_crops(frames, at_edge)

    assert crops.shape == (3, CROP_SIZE, CROP_SIZE, 3)
    # The crop spans rows 60..116 and columns 72..128: the face fills its top 5/7, columns 1/7..6/7.
    assert tuple(crops[0, 80, 112]) == (0, 0, 255)  # BGR, as SyncNet was trained on OpenCV frames
    assert tuple(crops[0, 200, 112]) == (40, 40, 40)
    assert tuple(edge_crops[0, 112, 10]) == (110, 110, 110)  # left of the frame


@pytest.fixture(scope="module")
def conversation_clip(shared_media, tmp_path_factory) -> Clip:
    """A dual clip of the real conversation: its two face tracks, its mp4, the mix and a stream per person."""
    source = shared_media / "conversation_left_then_right.mp4"
    frames = read_video_frames(source, num_frames=NUM_FRAMES)
    faces = sorted(MTCNNDetector().detect(frames[0]), key=lambda face: face.box[0])
    audio = load_speech(source)[: NUM_FRAMES * 640]
    path = write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, 25, audio[None], 16000)
    return Clip(
        source=str(source),
        kind="dual",
        num_frames=NUM_FRAMES,
        mp4=path.read_bytes(),
        audio=audio,
        tracks=np.stack([np.tile(face.box, (NUM_FRAMES, 1)) for face in faces]),
        person_audio=np.stack([audio, np.zeros_like(audio)]),  # the left person speaks first
    )


def _sync_config(tmp_path: Path, **sync: float) -> CurationConfig:
    torch.manual_seed(0)
    torch.save(SyncNet().state_dict(), tmp_path / "syncnet.model")
    config = {"input": "in", "output": "out", "wav2vec": {"model_path": str(tmp_path)}}
    config["sync"] = {"syncnet_path": str(tmp_path / "syncnet.model"), "syncnet_batch_size": 2, **sync}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return load_config(tmp_path / "config.yaml")


def test_sync_stage_scores_each_person_with_syncnet(conversation_clip, tmp_path):
    assert len(conversation_clip.tracks) == 2
    clip = dataclasses.replace(conversation_clip)

    SyncStage(_sync_config(tmp_path, min_syncnet_confidence=0.0))({"clip": clip})

    assert not clip.rejected and clip.sync_source == "syncnet"
    assert len(clip.sync_offset) == len(clip.sync_confidence) == len(clip.sync_distance) == 2
    assert all(-15 <= offset <= 15 for offset in clip.sync_offset)
    assert all(confidence >= 0 for confidence in clip.sync_confidence)
    assert clip.scores["sync_confidence"] == min(clip.sync_confidence)
    assert clip.scores["sync_distance"] == max(clip.sync_distance) > 0


def test_sync_stage_rejects_clips_below_the_syncnet_threshold(conversation_clip, tmp_path):
    clip = dataclasses.replace(conversation_clip, kind="single", tracks=conversation_clip.tracks[:1])

    SyncStage(_sync_config(tmp_path, min_syncnet_confidence=1000.0))({"clip": clip})

    assert (clip.reject_stage, clip.reject_reason) == ("sync", "low sync")
