"""Identity and LMD through `score_video`: a video against its own first frame and itself, and against another
person's face."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evaluation.score import ScoreInputError, score_video
from multitalk_model.audio import load_speech
from multitalk_model.media import read_video_frames, write_video

NUM_FRAMES = 10


def test_identity_and_lmd_of_a_video_against_its_own_face_and_another_persons(shared_media, tmp_path):
    source = shared_media / "talking_woman_25fps.mp4"
    frames = read_video_frames(source, num_frames=NUM_FRAMES)
    video = write_video(tmp_path / "cut.mp4", frames, 25, load_speech(source)[None, : NUM_FRAMES * 640], 16000)
    Image.fromarray(frames[0]).save(tmp_path / "self.png")
    Image.fromarray(read_video_frames(shared_media / "talking_man_25fps.mp4", num_frames=1)[0]).save(
        tmp_path / "man.png"
    )
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(tmp_path / "blank.png")

    own = score_video(video, reference_image=tmp_path / "self.png", ground_truth=video)
    other = score_video(video, reference_image=tmp_path / "man.png")

    person = own["identity"]["persons"][0]
    assert person["similarity"] > 0.9 and len(person["per_frame"]) == 8 and abs(person["drift"]) < 0.1
    assert other["identity"]["similarity"] < own["identity"]["similarity"] - 0.1
    assert own["lmd"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ScoreInputError, match="blank.png: 0 face"):
        score_video(video, reference_image=tmp_path / "blank.png")
