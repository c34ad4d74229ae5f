"""Generation end to end with the tiny model directory: real media in, mp4 with sound out."""

import json
from pathlib import Path

import numpy as np
import pytest

from multitalk_model.audio import load_audio_track
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generate import main as generate_main
from multitalk_model.generation import GenerationCancelled, GenerationError, MultiTalkPipeline, plan_clips
from multitalk_model.jobs import GenerationJob, from_official_json
from multitalk_model.media import probe_media

FAST = {"steps": 2, "frame_num": 17, "motion_frames": 5, "resolution": (64, 112), "seed": 7}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pipeline(model_dir) -> MultiTalkPipeline:
    return MultiTalkPipeline.from_model_dir(model_dir)


def audio_seconds(path: str) -> float:
    samples, rate = load_audio_track(path)
    return samples.shape[1] / rate


def car_job(media: Path, **fields) -> GenerationJob:
    persons = [
        {"audio": str(media / "two_people_car_person1.WAV")},
        {"audio": str(media / "two_people_car_person2.WAV")},
    ]
    return GenerationJob.model_validate(
        {
            "image": str(media / "two_people_car.png"),
            "persons": persons,
            "prompt": "two people talk in a car",
            **FAST,
            **fields,
        }
    )


def test_two_person_add_job_gives_25fps_mp4_as_long_as_the_composed_audio(pipeline, shared_media, tmp_path):
    job = car_job(shared_media, mode="streaming", audio_type="add")
    result = pipeline.generate(job, tmp_path / "car.mp4", preview_path=tmp_path / "regions.png")

    info = probe_media(result.path)
    composed_s = sum(audio_seconds(p.audio) for p in job.persons)  # 1.8 s + 3.1 s, in turn
    assert info.fps == 25
    assert info.has_audio and info.audio_codec == "aac"
    assert info.audio_rate == 44100 and info.audio_channels == 2  # the original mix, not a 16 kHz mono downmix
    assert abs(info.num_frames / 25 - composed_s) <= 1 / 25
    assert abs(info.duration_s - composed_s) <= 1 / 25 + 0.03  # the AAC stream may run past by a frame of audio
    assert result.clips > 1 and (tmp_path / "regions.png").is_file()


def test_official_json_gives_the_same_regions_as_our_schema(pipeline, shared_media):
    official = json.loads((shared_media / "two_people_car.official.json").read_text())
    official["cond_image"] = str(shared_media / "two_people_car.png")
    official["cond_audio"] = {
        "person1": str(shared_media / "two_people_car_person1.WAV"),
        "person2": str(shared_media / "two_people_car_person2.WAV"),
    }
    from_official = pipeline.prepare(from_official_json(official, shared_media).model_copy(update=FAST))
    ours = car_job(
        shared_media,
        persons=[
            {"audio": str(shared_media / "two_people_car_person1.WAV"), "box": [120, 160, 1080, 1280]},
            {"audio": str(shared_media / "two_people_car_person2.WAV"), "box": [1320, 160, 2280, 1280]},
        ],
    )
    from_ours = pipeline.prepare(ours)
    assert from_official.boxes == from_ours.boxes
    np.testing.assert_array_equal(from_official.masks, from_ours.masks)
    # Person 1 is the man on the left: its region lies in the left half of the crop.
    columns = np.nonzero(from_ours.masks[0].any(axis=0))[0]
    assert columns.max() < from_ours.masks.shape[2] / 2


def test_streaming_covers_the_whole_audio_and_clip_mode_one_clip(pipeline, shared_media, tmp_path):
    job = GenerationJob.model_validate(
        {
            "image": str(shared_media / "one_person_studio.png"),
            "persons": [{"audio": str(shared_media / "one_person_studio.wav")}],
            **FAST,
            "steps": 1,
            "frame_num": 33,
            "mode": "streaming",
            "color_correction": 0.0,
        }
    )
    streaming = pipeline.generate(job, tmp_path / "long.mp4")
    audio_s = audio_seconds(job.persons[0].audio)  # 10.7 s
    assert abs(streaming.duration_s - audio_s) <= 1 / 25
    assert probe_media(streaming.path).num_frames == streaming.num_frames == int(audio_s * 25)

    clip = pipeline.generate(job.model_copy(update={"mode": "clip"}), tmp_path / "clip.mp4")
    assert clip.clips == 1 and clip.num_frames == job.frame_num


def test_clip_plan_advances_by_frame_num_minus_motion_frames():
    assert plan_clips(267, 81, 25, streaming=True) == [0, 56, 112, 168, 224]
    assert plan_clips(267, 81, 25, streaming=False) == [0]
    assert plan_clips(50, 81, 25, streaming=True) == [0]


def test_same_seed_same_video_and_progress_reports_every_step(pipeline, shared_media):
    job = car_job(shared_media)
    seen = []
    first, _ = pipeline.sample(pipeline.prepare(job), progress=seen.append)
    second, _ = pipeline.sample(pipeline.prepare(job))
    np.testing.assert_array_equal(first, second)
    assert [(p.clip, p.step) for p in seen] == [(1, 1), (1, 2)] and seen[-1].percent == 100.0


def test_cancellation_takes_effect_between_steps(pipeline, shared_media):
    calls = []
    with pytest.raises(GenerationCancelled, match="step 2"):
        pipeline.sample(pipeline.prepare(car_job(shared_media)), cancelled=lambda: calls.append(1) or len(calls) > 1)


def test_audio_shorter_than_one_clip_is_padded_not_rejected(pipeline, shared_media):
    audio = str(shared_media / "two_people_car_person1.WAV")
    job = car_job(shared_media, frame_num=49, persons=[{"audio": audio}])
    prepared = pipeline.prepare(job)  # 1.8 s of audio for a 1.96 s clip
    frames, _ = pipeline.sample(prepared)
    assert len(frames) == prepared.num_frames == int(audio_seconds(audio) * 25) < job.frame_num


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([2000, 100, 2700, 900], "persons.0.box: .*outside"),
        ([0, 0, 2560, 1440], "persons.0.box: .*covers the whole"),
    ],
)
def test_bad_boxes_are_rejected_naming_the_field(pipeline, shared_media, box, message):
    persons = [
        {"audio": str(shared_media / "two_people_car_person1.WAV"), "box": box},
        {"audio": str(shared_media / "two_people_car_person2.WAV"), "box": [1320, 160, 2280, 1280]},
    ]
    with pytest.raises(GenerationError, match=message):
        pipeline.prepare(car_job(shared_media, persons=persons))


def test_empty_box_more_streams_than_regions_and_bad_frame_num_are_rejected_by_the_schema(shared_media):
    person = {"audio": str(shared_media / "two_people_car_person1.WAV")}
    with pytest.raises(ValueError, match="box must be"):
        car_job(shared_media, persons=[{**person, "box": [10, 10, 10, 50]}])
    with pytest.raises(ValueError, match="2 audio streams but 1 person regions"):
        car_job(shared_media, persons=[{**person, "box": [10, 10, 100, 100]}, person])
    with pytest.raises(ValueError, match="frame_num\n.*must be 4n \\+ 1"):
        car_job(shared_media, frame_num=80)


def test_unreadable_image_and_audio_are_rejected_naming_the_field(pipeline, shared_media, tmp_path):
    not_an_image = tmp_path / "image.png"
    not_an_image.write_text("hello")
    with pytest.raises(GenerationError, match="image: .*image.png"):
        pipeline.prepare(car_job(shared_media, image=str(not_an_image)))
    corrupt = tmp_path / "voice.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage" * 10)
    persons = [{"audio": str(shared_media / "two_people_car_person1.WAV")}, {"audio": str(corrupt)}]
    with pytest.raises(GenerationError, match="persons.1.audio: .*voice.wav"):
        pipeline.prepare(car_job(shared_media, persons=persons))


def test_command_line_generates_from_the_official_json(model_dir, shared_media, tmp_path):
    official = json.loads((shared_media / "two_people_car.official.json").read_text())
    official["cond_image"] = str(shared_media / "two_people_car.png")
    official["cond_audio"] = {
        "person1": str(shared_media / "two_people_car_person1.WAV"),
        "person2": str(shared_media / "two_people_car_person2.WAV"),
    }
    job_file = tmp_path / "official.json"
    job_file.write_text(json.dumps(official))
    out = tmp_path / "cli.mp4"
    code = generate_main(
        [
            "--input",
            str(job_file),
            "--model-dir",
            str(model_dir),
            "--out",
            str(out),
            "--steps",
            "1",
            "--frame-num",
            "9",
            "--motion-frames",
            "5",
            "--resolution",
            "64",
            "112",
        ]
    )
    assert code == 0
    assert probe_media(out).num_frames == 9
