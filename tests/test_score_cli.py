"""`python -m evaluation.score`: the JSON contract (FID / FVD / LMD against a ground truth included), binding of the
real conversation's two halves to its two persons, and clear errors (exit code 2, the file named) for unreadable
inputs and videos without a face."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from evaluation.frechet import fid, fvd, load_detector, video_clips
from evaluation.score import ScoreInputError, score_video
from multitalk_model.audio import load_speech
from multitalk_model.media import read_video_frames, write_video
from tests.helpers import save_random_feature_networks

ROOT = Path(__file__).resolve().parents[1]
TURN_S = 5.04  # conversation_left_then_right.mp4: the left person speaks before, the right one after
START_S, NUM_FRAMES = 3.84, 60  # 1.2 s of each person's turn


@pytest.fixture(scope="module")
def conversation(shared_media, tmp_path_factory) -> dict[str, Path]:
    """A 2.4 s cut of the real conversation around its turn, and its audio split at the turn into two streams."""
    folder = tmp_path_factory.mktemp("conversation")
    source = shared_media / "conversation_left_then_right.mp4"
    frames = read_video_frames(source, start_s=START_S, num_frames=NUM_FRAMES)
    wave = load_speech(source)[round(START_S * 16000) : round(START_S * 16000) + NUM_FRAMES * 640]
    turn = round((TURN_S - START_S) * 16000)
    left, right = wave.copy(), wave.copy()
    left[turn:], right[:turn] = 0, 0
    sf.write(folder / "left.wav", left, 16000)
    sf.write(folder / "right.wav", right, 16000)
    write_video(folder / "cut.mp4", frames, 25, wave[None], 16000)
    return {"video": folder / "cut.mp4", "left": folder / "left.wav", "right": folder / "right.wav"}


def test_each_half_of_the_conversation_binds_to_its_speaker(conversation):
    scores = score_video(conversation["video"], [conversation["left"], conversation["right"]])
    swapped = score_video(conversation["video"], [conversation["right"], conversation["left"]])

    assert scores["binding"]["assignment"] == [0, 1] and scores["binding"]["accuracy"] == 1.0
    assert swapped["binding"]["assignment"] == [1, 0] and swapped["binding"]["accuracy"] == 0.0
    matrix = np.array(scores["binding"]["matrix"])
    assert matrix.shape == (2, 2) and np.trace(matrix) > np.trace(matrix[::-1])
    assert [entry["person"] for entry in scores["sync"]["per_stream"]] == [0, 1]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "evaluation.score", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_the_command_prints_one_json_object_on_its_last_line(conversation):
    result = _run_cli("--video", str(conversation["video"]), "--audio", str(conversation["left"]),
                      str(conversation["right"]), "--json")  # fmt: skip

    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["sync"]["source"] == "landmarks"
    assert isinstance(scores["sync"]["confidence"], float) and isinstance(scores["sync"]["offset_frames"], int)
    assert scores["binding"]["assignment"] == [0, 1]


def test_unreadable_inputs_and_faceless_videos_exit_2_naming_the_file(conversation, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    faceless = write_video(
        tmp_path / "faceless.mp4",
        np.full((10, 64, 64, 3), 128, dtype=np.uint8),
        25,
        np.zeros((1, 6400), dtype=np.float32),
        16000,
    )

    unreadable = _run_cli("--video", str(broken), "--json")
    missing_audio = _run_cli("--video", str(conversation["video"]), "--audio", str(tmp_path / "none.wav"))

    assert unreadable.returncode == 2 and str(broken) in unreadable.stderr
    assert missing_audio.returncode == 2 and "none.wav" in missing_audio.stderr
    with pytest.raises(ScoreInputError, match="faceless.mp4: no frame shows"):
        score_video(faceless)


def test_the_command_adds_fid_fvd_and_lmd_against_a_ground_truth_with_configured_weights(conversation, tmp_path):
    save_random_feature_networks(tmp_path)
    frames = read_video_frames(conversation["video"])
    truth = write_video(tmp_path / "truth.mp4", np.clip(frames.astype(int) + 40, 0, 255).astype(np.uint8), 25)

    result = _run_cli("--video", str(conversation["video"]), "--ground-truth", str(truth), "--inception-weights",
                      str(tmp_path / "inception.pt"), "--i3d-weights", str(tmp_path / "i3d.pt"), "--json")  # fmt: skip

    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    truth_frames = read_video_frames(truth)
    inception, i3d = load_detector(tmp_path / "inception.pt"), load_detector(tmp_path / "i3d.pt")
    assert scores["fid"] == pytest.approx(fid(inception, truth_frames, frames), rel=1e-6) and scores["fid"] > 0
    expected_fvd = fvd(i3d, video_clips(truth_frames), video_clips(frames))
    assert scores["fvd"] == pytest.approx(expected_fvd, rel=1e-6) and scores["fvd"] > 0
    assert 0 <= scores["lmd"] < 5  # the same mouths, a little brighter: a few percent of the eye distance at most
    without_truth = _run_cli("--video", str(conversation["video"]), "--i3d-weights", str(tmp_path / "i3d.pt"))
    assert without_truth.returncode == 2 and "--ground-truth" in without_truth.stderr
