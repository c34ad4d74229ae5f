"""A prompt schedule: each streaming clip is conditioned on the prompt in force at its first frame."""

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generation import MultiTalkPipeline, plan_clips
from multitalk_model.jobs import GenerationJob

# Streaming clips of 5 frames with 1 motion frame: clips start at frames 0, 4, 8, 12 (0, 0.16, 0.32, 0.48 s).
STREAMING = {"mode": "streaming", "frame_num": 5, "motion_frames": 1, "steps": 2, "resolution": [32, 32], "seed": 3}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> MultiTalkPipeline:
    return MultiTalkPipeline.from_model_dir(build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    image, audio = root / "face.png", root / "speech.wav"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    write_wav(audio, synthesize_speech(0.6), 16000)  # 15 frames: clips at 0, 4, 8 and 12
    return str(image), str(audio)


def _frames(pipeline: MultiTalkPipeline, inputs: tuple[str, str], prompt) -> np.ndarray:
    image, audio = inputs
    job = GenerationJob(image=image, persons=[{"audio": audio}], prompt=prompt, **STREAMING)
    frames, _ = pipeline.sample(pipeline.prepare(job))
    return frames


def test_each_clip_follows_the_prompt_in_force_at_its_start(pipeline, inputs):
    assert plan_clips(15, 5, 1, streaming=True) == [0, 4, 8, 12]
    constant = _frames(pipeline, inputs, "a calm talk")
    # "a laugh" takes over at 0.3 s: the clips starting at 0.32 s (frame 8) and 0.48 s follow it.
    scheduled = _frames(
        pipeline, inputs, [{"start_s": 0, "prompt": "a calm talk"}, {"start_s": 0.3, "prompt": "a laugh"}]
    )
    # A switch after the last clip's start changes nothing.
    too_late = _frames(
        pipeline, inputs, [{"start_s": 0, "prompt": "a calm talk"}, {"start_s": 0.5, "prompt": "a laugh"}]
    )

    np.testing.assert_array_equal(scheduled[:9], constant[:9])  # clips 1 and 2 (frames 0-8) as with one prompt
    assert np.abs(scheduled[9:].astype(int) - constant[9:]).max() > 0  # clip 3 on: the new prompt
    np.testing.assert_array_equal(too_late, constant)


def test_a_schedule_must_start_at_zero_and_increase(inputs):
    image, audio = inputs
    for schedule, message in [
        ([], "must start with an entry at start_s 0"),
        ([{"start_s": 1, "prompt": "late"}], "must start with an entry at start_s 0"),
        ([{"start_s": 0, "prompt": "a"}, {"start_s": 0, "prompt": "b"}], "start_s must increase"),
        ([{"start_s": 0, "prompt": "a", "mood": "x"}], "Extra inputs are not permitted"),
    ]:
        with pytest.raises(ValidationError, match=message):
            GenerationJob(image=image, persons=[{"audio": audio}], prompt=schedule)
    job = GenerationJob(
        image=image, persons=[{"audio": audio}], prompt=[{"start_s": 0, "prompt": "a"}, {"start_s": 2, "prompt": "b"}]
    )
    assert [job.prompt_at(s) for s in (0, 1.99, 2, 9)] == ["a", "a", "b", "b"]
