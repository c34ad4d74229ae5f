"""Job inputs: the official MultiTalk JSON, our schema, and the validation messages a user sees."""

import json
import logging
from pathlib import Path

import pytest

from multitalk_model.jobs import (
    REFERENCE_NEGATIVE_PROMPT,
    GenerationJob,
    JobError,
    PersonInput,
    from_official_json,
    load_job,
)


@pytest.fixture
def official_example(shared_media, tmp_path) -> Path:
    """The official example JSON as shipped, in a folder laid out the way its relative paths expect."""
    data = json.loads((shared_media / "two_people_car.official.json").read_text())
    named = {
        data["cond_image"]: "two_people_car.png",
        data["cond_audio"]["person1"]: "two_people_car_person1.WAV",
        data["cond_audio"]["person2"]: "two_people_car_person2.WAV",
    }
    for relative, shared_name in named.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).symlink_to(shared_media / shared_name)
    job_file = tmp_path / "multitalk_example_1.json"
    job_file.write_text(json.dumps(data))
    return job_file


def _write(folder: Path, data: dict) -> Path:
    path = folder / "job.json"
    path.write_text(json.dumps(data))
    return path


def test_official_example_loads_with_boxes_converted_to_xyxy(official_example):
    job = load_job(official_example)

    assert [person.box for person in job.persons] == [(120, 160, 1080, 1280), (1320, 160, 2280, 1280)]
    assert job.image == str(official_example.parent / "examples/multi/1/multi1.png")
    assert [Path(person.audio).name for person in job.persons] == ["1.WAV", "2.WAV"]
    assert job.audio_type == "add"
    assert job.prompt.startswith("In a casual, intimate setting")
    assert job.negative_prompt == REFERENCE_NEGATIVE_PROMPT
    assert (job.frame_num, job.steps, job.resolved_shift) == (81, 40, 7.0)


def test_official_persons_are_ordered_by_number_not_by_key_order(tmp_path):
    data = {"cond_image": "a.png", "cond_audio": {"person10": "j.wav", "person2": "b.wav", "person1": "a.wav"}}

    job = from_official_json(data, tmp_path)

    assert [Path(person.audio).name for person in job.persons] == ["a.wav", "b.wav", "j.wav"]


def test_official_unused_keys_are_ignored_with_a_warning(tmp_path, caplog):
    data = {"cond_image": "a.png", "cond_audio": {"person1": "a.wav"}, "tts_audio": {"text": "(s1) hi"}}

    with caplog.at_level(logging.WARNING, logger="multitalk_model.jobs"):
        job = from_official_json(data, tmp_path)

    assert len(job.persons) == 1 and job.persons[0].box is None
    assert "tts_audio" in caplog.text


def test_official_json_without_cond_audio_is_rejected_naming_it(tmp_path):
    with pytest.raises(JobError, match=r"job\.json: cond_audio: missing"):
        load_job(_write(tmp_path, {"cond_image": "a.png", "prompt": "two people"}))


def test_our_schema_round_trips_through_json(shared_media, tmp_path):
    job = GenerationJob(
        image=str(shared_media / "two_people_car.png"),
        persons=[
            PersonInput(audio=str(shared_media / "two_people_car_person1.WAV"), box=(120, 160, 1080, 1280)),
            PersonInput(audio=str(shared_media / "two_people_car_person2.WAV"), box=(1320, 160, 2280, 1280)),
        ],
        prompt="a conversation in a car",
        audio_type="para",
        size="720p",
        mode="streaming",
        step_cache_threshold=0.2,
    )
    path = tmp_path / "job.json"
    path.write_text(job.model_dump_json())

    assert load_job(path) == job
    assert job.resolved_shift == 11.0


def test_our_schema_resolves_relative_paths_against_the_file(shared_media, tmp_path):
    (tmp_path / "face.png").symlink_to(shared_media / "one_person_studio.png")
    (tmp_path / "voice.wav").symlink_to(shared_media / "one_person_studio.wav")

    job = load_job(_write(tmp_path, {"image": "face.png", "persons": [{"audio": "voice.wav"}]}))

    assert (job.image, job.persons[0].audio) == (str(tmp_path / "face.png"), str(tmp_path / "voice.wav"))


def test_missing_input_file_is_named(tmp_path):
    (tmp_path / "face.png").write_bytes(b"")

    with pytest.raises(JobError, match=r"job\.json: persons\.0\.audio: no such file .*voice\.wav"):
        load_job(_write(tmp_path, {"image": "face.png", "persons": [{"audio": "voice.wav"}]}))


def test_frame_num_that_is_not_4n_plus_1_is_rejected(tmp_path):
    with pytest.raises(JobError, match=r"job\.json: frame_num: must be 4n \+ 1 and at least 5 .*, got 80"):
        load_job(_write(tmp_path, {"image": "a.png", "persons": [{"audio": "a.wav"}], "frame_num": 80}))


def test_unknown_field_is_rejected_naming_it(tmp_path):
    with pytest.raises(JobError, match=r"job\.json: sample_steps: Extra inputs are not permitted"):
        load_job(_write(tmp_path, {"image": "a.png", "persons": [{"audio": "a.wav"}], "sample_steps": 8}))


def test_boxes_for_only_some_persons_are_rejected():
    persons = [{"audio": "a.wav", "box": [0, 0, 10, 10]}, {"audio": "b.wav"}]

    with pytest.raises(ValueError, match=r"persons: 2 audio streams but 1 person regions"):
        GenerationJob(image="a.png", persons=persons)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"persons": []}, r"persons: List should have at least 1 item"),
        ({"steps": 0}, r"steps: Input should be greater than or equal to 1"),
        ({"audio_guidance": -1.0}, r"audio_guidance: Input should be greater than or equal to 0"),
        ({"motion_frames": 24}, r"motion_frames: must be 4n \+ 1 and at least 1 .*, got 24"),
        ({"frame_num": 25, "motion_frames": 25}, r"motion_frames must be < frame_num, got 25 >= 25"),
        ({"persons": [{"audio": "a.wav", "box": [10, 0, 5, 10]}]}, r"persons\.0\.box: .*x1 > x0"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_field(tmp_path, fields, message):
    with pytest.raises(JobError, match=message):
        load_job(_write(tmp_path, {"image": "a.png", "persons": [{"audio": "a.wav"}]} | fields))


def test_text_guidance_of_zero_is_allowed():
    assert GenerationJob(image="a.png", persons=[{"audio": "a.wav"}], text_guidance=0.0).text_guidance == 0.0
