"""The Videos API as OpenAI's SDK speaks it, on a running Serve app (tiny model, CPU, real HTTP on 127.0.0.1).

The official `openai` client uploads the speech through /v1/files, creates and polls a video, downloads it and its
thumbnail, lists, deletes; the multipart form of earlier clients still works; progress streams as Server-Sent
Events; the content endpoint serves byte ranges; and every bad upload gets a 4xx naming the file and what was found
while the server keeps serving.
"""

import hashlib
import json
import re
import shutil
import socket
import struct
import subprocess
import warnings
import zlib
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import openai
import pytest
import ray
from PIL import Image
from ray import serve

from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.jobs import GenerationJob
from serving.app import build_app
from serving.config import GenerationDefaults, GeneratorScaling, Limits, ServingConfig
from serving.store import JobStore

pytestmark = pytest.mark.slow

APP = "multitalk-videos"
KEY, OTHER_KEY = "videos-key", "other-key"
SMALL = {"steps": 2, "frame_num": 5, "motion_frames": 1, "resolution": [32, 64]}
BOXES = [[0, 0, 112, 128], [112, 0, 224, 128]]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Inputs:
    """Media this module makes itself: a two-person image, speech, and every kind of lying file."""

    def __init__(self, root: Path) -> None:
        rng = np.random.default_rng(0)
        self.image = root / "two_people.png"
        Image.fromarray(rng.integers(0, 255, (128, 224, 3), dtype=np.uint8)).save(self.image)
        self.speech = [root / "person1.wav", root / "person2.wav"]
        for seed, path in enumerate(self.speech):
            write_wav(path, synthesize_speech(0.6, seed=seed), 16000)
        self.root = root

    def bad(self, name: str) -> Path:
        """A file that claims more than it holds, or holds the wrong thing (see the tests below)."""
        path = self.root / name
        if name == "truncated.wav":  # the data chunk declares 2 s; the file holds the first second
            whole = self.root / "two_seconds.wav"
            write_wav(whole, synthesize_speech(2.0), 16000)
            data = whole.read_bytes()
            path.write_bytes(data[: 44 + 16000 * 2])
        elif name == "short.wav":  # 100 ms: less than one clip's worth of lip motion
            write_wav(path, synthesize_speech(0.1), 16000)
        elif name == "lying.png":  # IHDR says 640x640 (checksum fixed), the pixel data is 64x64
            Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
            data = bytearray(path.read_bytes())
            data[16:24] = struct.pack(">II", 640, 640)
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
            path.write_bytes(bytes(data))
        elif name == "truncated.jpg":
            noise = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(noise).save(path.with_suffix(".whole.jpg"))  # half the file: the header and half the data
            data = path.with_suffix(".whole.jpg").read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif name == "audio_only.mp4":  # a "video" for dubbing that holds only sound
            _ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", str(path))
        elif name == "source.mp4":
            _ffmpeg(
                "-f", "lavfi", "-i", "testsrc=d=1:s=64x48:r=25", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)
            )
        elif name == "truncated.mp4":  # moov first, then two thirds of the frames' data
            whole = self.root / "whole.mp4"
            _ffmpeg(
                "-f", "lavfi", "-i", "testsrc=d=2:s=64x48:r=25", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                "-movflags", "+faststart", str(whole),
            )  # fmt: skip
            data = whole.read_bytes()
            path.write_bytes(data[: len(data) * 2 // 3])
        return path


def _ffmpeg(*args: str) -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is missing (apt-get install ffmpeg; CI installs it)")
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", *args], check=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    config = ServingConfig(
        model_dir=build_tiny_model_dir(root / "model"),
        model_name="multitalk-tiny",
        database_url=f"sqlite:///{root / 'jobs.db'}",
        storage_uri=str(root / "files"),
        api_keys=[KEY, OTHER_KEY],
        dispatch_interval_s=0.2,
        limits=Limits(max_image_bytes=2 * 2**20, max_audio_bytes=2 * 2**20),
        generator=GeneratorScaling(num_cpus=1),
        generation=GenerationDefaults(defaults=SMALL),
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP, route_prefix="/")
    base_url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield config, base_url, http
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    _, base_url, _ = server
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks its videos methods deprecated for Sora
        yield openai.OpenAI(api_key=KEY, base_url=f"{base_url}/v1", max_retries=0)


def _options(**fields) -> str:
    return json.dumps({**SMALL, "boxes": BOXES, **fields})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_openai_sdk_uploads_creates_polls_downloads_lists_and_deletes(client, server, inputs, tmp_path):
    files = [client.files.create(file=path.open("rb"), purpose="user_data") for path in inputs.speech]
    assert [file.filename for file in files] == ["person1.wav", "person2.wav"] and files[0].object == "file"

    video = client.videos.create_and_poll(
        prompt="two people talk",
        input_reference=inputs.image.open("rb"),
        model="multitalk-tiny",
        size="64x32",
        poll_interval_ms=100,
        extra_body={"audio_file_id": [file.id for file in files], "options": json.dumps({"boxes": BOXES})},
    )
    assert (video.object, video.status, video.progress, video.model) == ("video", "completed", 100, "multitalk-tiny")
    assert video.prompt == "two people talk" and video.size == "64x32" and video.error is None
    assert video.completed_at >= video.created_at and isinstance(video.created_at, int)
    assert video.model_extra["result"]["region_source"] == "boxes"  # our extension fields ride along

    mp4 = tmp_path / "video.mp4"
    client.videos.download_content(video.id).write_to_file(mp4)
    with av.open(str(mp4)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == SMALL["frame_num"] and frames[0].shape == (32, 64, 3)
    thumbnail = tmp_path / "thumbnail.jpg"
    client.videos.download_content(video.id, variant="thumbnail").write_to_file(thumbnail)
    with Image.open(thumbnail) as shown:
        assert shown.format == "JPEG" and shown.size == (64, 32)

    second = client.videos.create(
        prompt="again", input_reference=inputs.image.open("rb"), extra_body={"audio_file_id": [files[0].id]}
    )
    newest_first = [item.id for item in client.videos.list(limit=1)]  # the SDK follows last_id page by page
    assert newest_first[:2] == [second.id, video.id]
    oldest_first = [item.id for item in client.videos.list(order="asc", limit=100)]
    assert oldest_first.index(video.id) < oldest_first.index(second.id)

    client.videos.poll(second.id, poll_interval_ms=100)
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert client.files.delete(files[1].id).deleted


def test_the_earlier_multipart_form_still_works(server, inputs):
    _, _, http = server
    form = [("image", ("car.png", inputs.image.read_bytes(), "image/png"))] + [
        ("audio", (path.name, path.read_bytes(), "audio/wav")) for path in inputs.speech
    ]
    response = http.post("/v1/videos", files=form, data={"options": _options(prompt="hello")})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued" and response.json()["state"] == "queued"
    assert _wait(http, response.json()["id"])["status"] == "completed"


def test_a_json_create_body_takes_its_files_as_ids_as_aiperf_sends_it(server, inputs):
    _, _, http = server

    def upload(path: Path) -> str:
        files = [("file", (path.name, path.read_bytes()))]
        return http.post("/v1/files", files=files, data={"purpose": "user_data"}).json()["id"]

    body = {
        "prompt": "two people talk",
        "model": "multitalk-tiny",
        "input_reference": {"file_id": upload(inputs.image)},
        "audio_file_id": [upload(path) for path in inputs.speech],
        "seed": 5,  # job fields may sit at the top level
        "options": {"boxes": BOXES},
    }
    response = http.post("/v1/videos", json=body)
    assert response.status_code == 202, response.text
    job = _wait(http, response.json()["id"])
    assert job["status"] == "completed" and job["persons"] == 2 and job["result"]["region_source"] == "boxes"


def test_progress_streams_as_server_sent_events_until_the_job_ends(server, inputs):
    _, _, http = server
    job_id = _submit(http, inputs, {"steps": 3})
    events = []
    with http.stream("GET", f"/v1/videos/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for block in _sse_blocks(stream.iter_lines()):
            events.append(block)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) <= {"video"}
    progress = [data["progress"] for _, data in events]
    assert progress == sorted(progress) and events[-1][1]["status"] == "completed"


def test_content_serves_byte_ranges(server, inputs):
    _, _, http = server
    job_id = _submit(http, inputs, {})
    _wait(http, job_id)
    whole = http.get(f"/v1/videos/{job_id}/content")
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    size = len(whole.content)
    head = http.get(f"/v1/videos/{job_id}/content", headers={"Range": "bytes=0-99"})
    assert head.status_code == 206 and head.content == whole.content[:100]
    assert head.headers["content-range"] == f"bytes 0-99/{size}"
    tail = http.get(f"/v1/videos/{job_id}/content", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    middle = http.get(f"/v1/videos/{job_id}/content", headers={"Range": f"bytes=100-{size + 50}"})
    assert middle.content == whole.content[100:] and middle.headers["content-range"] == f"bytes 100-{size - 1}/{size}"
    past = http.get(f"/v1/videos/{job_id}/content", headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"


def test_speech_given_as_text_is_spoken_and_drives_the_video(server, inputs):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is missing (apt-get install espeak-ng; CI installs it)")
    _, _, http = server
    form = [("input_reference", ("people.png", inputs.image.read_bytes(), "image/png"))]
    data = {"speech_text": ["Hello, how are you?", "Fine, thanks."], "options": _options(mode="streaming")}
    response = http.post("/v1/videos", files=form, data=data)
    assert response.status_code == 202, response.text
    job = _wait(http, response.json()["id"])
    assert job["status"] == "completed", job["error"]
    # Both sentences, in turn (add): over a second of speech, so streaming made several 5-frame clips.
    assert job["result"]["duration_s"] > 1.0 and job["result"]["clips"] > 1


def test_a_prompt_schedule_is_accepted_and_reported(server, inputs):
    _, _, http = server
    schedule = [{"start_s": 0, "prompt": "they greet"}, {"start_s": 0.4, "prompt": "they laugh"}]
    job_id = _submit(http, inputs, {"prompt": schedule, "mode": "streaming"})
    job = _wait(http, job_id)
    assert job["status"] == "completed" and job["prompt"] == "they greet" and job["prompt_schedule"] == schedule


def test_a_job_that_fails_later_says_why(server):
    config, _, http = server
    # A job whose input files are gone from the storage by the time it runs (accepted straight into the store).
    job_id = "f" * 32
    job = GenerationJob(image="inputs/image.png", persons=[{"audio": "inputs/audio1.wav"}], **SMALL)
    owner = hashlib.sha256(KEY.encode()).hexdigest()[:32]
    JobStore(config.database_url).submit(job_id, owner, job.model_dump(mode="json"), "digest")
    # The dispatcher finds it on its next look (every dispatch_interval_s, 0.2 s here).
    job = _wait(http, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "generation_failed"
    assert re.search(r"inputs/image.png: not in the storage", job["error"]["message"]), job["error"]


# What every bad input gets: (form files, form fields) -> (status, message pattern).
def _bad_inputs(inputs: Inputs, http: httpx.Client) -> dict[str, tuple[list, dict, int, str]]:
    image = ("input_reference", ("people.png", inputs.image.read_bytes(), "image/png"))
    voice = [("audio", (path.name, path.read_bytes(), "audio/wav")) for path in inputs.speech]

    def file_of(field: str, name: str) -> tuple[str, tuple[str, bytes, str]]:
        return (field, (name, inputs.bad(name).read_bytes(), "application/octet-stream"))

    other_owners_file = httpx.post(
        f"{http.base_url}/v1/files",
        files=[("file", ("theirs.wav", inputs.speech[0].read_bytes(), "audio/wav"))],
        data={"purpose": "user_data"},
        headers={"Authorization": f"Bearer {OTHER_KEY}"},
    ).json()["id"]
    options = {"options": _options()}
    return {
        "truncated WAV": (
            [image, voice[0], file_of("audio", "truncated.wav")],
            options,
            422,
            r"audio 2 \('truncated.wav'\): truncated: its header declares 2.000 s of audio but the file holds 1.000 s",
        ),
        "audio shorter than one clip": (
            [image, voice[0], file_of("audio", "short.wav")],
            options,
            422,
            r"audio 2 \('short.wav'\): 100 ms of audio, shorter than the minimum of 200 ms",
        ),
        "PNG header declaring more pixels than it holds": (
            [file_of("input_reference", "lying.png"), *voice],
            {"options": _options(boxes=None)},
            422,
            r"image \('lying.png'\): its header declares 640x640 pixels but its data does not hold them",
        ),
        "truncated JPEG": (
            [file_of("input_reference", "truncated.jpg"), *voice],
            {"options": _options(boxes=None)},
            422,
            r"image \('truncated.jpg'\): its header declares 256x256 pixels but its data does not hold them",
        ),
        "video for dubbing without a video stream": (
            [file_of("input_reference", "audio_only.mp4"), *voice],
            options,
            422,
            r"input_reference \('audio_only.mp4'\): no video stream \(found: 1 audio\); dubbing needs a video",
        ),
        "truncated video": (
            [file_of("input_reference", "truncated.mp4"), *voice],
            options,
            422,
            r"input_reference \('truncated.mp4'\): cannot decode frame \d+ of the video",
        ),
        "a source video to dub on a MultiTalk deployment": (
            [file_of("input_reference", "source.mp4"), *voice],
            options,
            422,
            r"video: dubbing a video needs an InfiniteTalk model; this service's is multitalk",
        ),
        "unknown form field": (
            [image, *voice],
            {**options, "colour": "red"},
            422,
            r"form: unknown field\(s\) \['colour'\]",
        ),
        "another model": ([image, *voice], {**options, "model": "sora-2"}, 422, r"model: 'sora-2' is not served here"),
        "size not WxH": ([image, *voice], {**options, "size": "big"}, 422, r"size: give WIDTHxHEIGHT"),
        "negative seconds": ([image, *voice], {**options, "seconds": "-3"}, 422, r"seconds: must be a positive"),
        "prompt twice": (
            [image, *voice],
            {"options": _options(prompt="a"), "prompt": "b"},
            422,
            r"prompt: given both as a form field and in options",
        ),
        "someone else's file id": (
            [image],
            {**options, "audio_file_id": other_owners_file},
            422,
            rf"audio_file_id: '{other_owners_file}' is not a file you uploaded",
        ),
        "empty speech text": ([image], {**options, "speech_text": "  "}, 422, r"speech_text \(person 1\): empty text"),
        "schedule not starting at 0": (
            [image, *voice],
            {"options": _options(prompt=[{"start_s": 1, "prompt": "late"}])},
            422,
            r"options.prompt: a prompt schedule must start with an entry at start_s 0",
        ),
        "no reference image": (voice, options, 422, r"input_reference: missing"),
    }


def test_every_bad_input_gets_a_4xx_naming_the_file_and_the_server_keeps_serving(server, inputs):
    _, _, http = server
    before = http.get("/v1/videos", params={"limit": 100}).json()["data"]
    for case, (files, data, status, pattern) in _bad_inputs(inputs, http).items():
        response = http.post("/v1/videos", files=files, data=data)
        assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
        assert re.search(pattern, response.json()["detail"]), f"{case}: {response.json()['detail']}"
        assert http.get("/healthz").status_code == 200, case
    assert http.get("/v1/videos", params={"limit": 100}).json()["data"] == before  # nothing was accepted

    unknown_after = http.get("/v1/videos", params={"after": "nope"})
    assert unknown_after.status_code == 422 and "after: 'nope'" in unknown_after.json()["detail"]
    job_id = before[0]["id"] if before else _submit(http, inputs, {})
    _wait(http, job_id)
    sprites = http.get(f"/v1/videos/{job_id}/content", params={"variant": "spritesheet"})
    assert sprites.status_code == 422 and "variant: 'spritesheet'" in sprites.json()["detail"]


# ---------------------------------------------------------------------------------------------------- helpers


def _submit(http: httpx.Client, inputs: Inputs, fields: dict[str, Any]) -> str:
    form = [("input_reference", ("people.png", inputs.image.read_bytes(), "image/png"))] + [
        ("audio", (path.name, path.read_bytes(), "audio/wav")) for path in inputs.speech
    ]
    response = http.post("/v1/videos", files=form, data={"options": _options(**fields)})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _wait(http: httpx.Client, job_id: str) -> dict[str, Any]:
    """Follows a job's event stream to its end (no polling loop of our own)."""
    with http.stream("GET", f"/v1/videos/{job_id}/events") as stream:
        for name, data in _sse_blocks(stream.iter_lines()):
            if name == "done":
                return data
    raise AssertionError(f"job {job_id}: the event stream ended without a done event")


def _sse_blocks(lines):
    """(event, data) of each Server-Sent Event."""
    name, data = None, []
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))
