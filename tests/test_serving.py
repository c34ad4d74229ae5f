"""The serving application over real HTTP on 127.0.0.1: Ray Serve running the tiny model on the CPU.

One application serves the whole module (started once: the replicas take a while to import torch); the restart
test stops and starts it again on the same database and storage. The restart and cancellation tests hold the
running job at the generator's pause point after its first step, so they interrupt it there on any machine.
"""

import json
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from serving.app import build_app
from serving.config import GenerationDefaults, GeneratorScaling, Limits, ServingConfig
from serving.store import JobStore
from tests.helpers import Chromium, free_port, local_ray

pytestmark = pytest.mark.slow

APP = "multitalk"
ALICE, BOB, CAROL = "alice-key", "bob-key", "carol-key"
# The tiny fast settings of the generation tests; the config's defaults (used when a request says nothing) are
# smaller still, to keep the module quick.
FAST = {"steps": 2, "frame_num": 17, "motion_frames": 5, "resolution": [64, 112], "seed": 7}
SMALL = {"steps": 2, "frame_num": 5, "motion_frames": 1, "resolution": [32, 64]}
# Interrupted at the pause point after its first step, with steps left to run.
HELD = {**FAST, "steps": 4}
STEP_PAUSE = "generator-step"
FINISHED = {"succeeded", "failed", "cancelled"}
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


class Service:
    """The running application and a client for it."""

    def __init__(self, config: ServingConfig, media: Path) -> None:
        self.config = config
        self.media = media
        self.base_url = f"http://127.0.0.1:{free_port()}"
        self.http = httpx.Client(base_url=self.base_url, timeout=120)

    def start(self) -> None:
        serve.run(build_app(self.config), name=APP, route_prefix="/")

    def stop(self) -> None:
        serve.delete(APP)

    def car_files(self, image: bytes | None = None, audio: list[tuple[str, bytes]] | None = None) -> list:
        media = self.media
        image = (media / "two_people_car.png").read_bytes() if image is None else image
        if audio is None:
            names = ("two_people_car_person1.WAV", "two_people_car_person2.WAV")
            audio = [(name, (media / name).read_bytes()) for name in names]
        return [("image", ("two_people_car.png", image, "image/png"))] + [("audio", item) for item in audio]

    def submit(
        self,
        options: dict[str, Any] | None = None,
        key: str = ALICE,
        files: list | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return self.http.post(
            "/v1/videos",
            files=self.car_files() if files is None else files,
            data={"options": json.dumps(options or {})},
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        )

    def job(self, job_id: str, key: str = ALICE) -> dict[str, Any]:
        response = self.http.get(f"/v1/videos/{job_id}", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        return response.json()

    def wait(
        self, job_id: str, until=lambda job: job["state"] in FINISHED, key: str = ALICE, limit_s: float = 240
    ) -> dict[str, Any]:
        """Polls a job until `until` holds (the limit only guards against a hang)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            job = self.job(job_id, key)
            if until(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never got there; last seen {job}")

    def cancel(self, job_id: str, key: str = ALICE) -> httpx.Response:
        return self.http.delete(f"/v1/videos/{job_id}", headers={"Authorization": f"Bearer {key}"})

    def stored(self, job_id: str):
        """A job's record read from the database itself (while the application is down)."""
        return JobStore(self.config.database_url).get(job_id)

    def jobs(self, key: str = ALICE, **params) -> dict[str, Any]:
        return self.http.get("/v1/videos", params=params, headers={"Authorization": f"Bearer {key}"}).json()


@pytest.fixture(scope="module")
def service(tmp_path_factory, shared_media):
    root = tmp_path_factory.mktemp("serving")
    config = ServingConfig(
        model_dir=build_tiny_model_dir(root / "model"),
        database_url=f"sqlite:///{root / 'jobs.db'}",
        storage_uri=str(root / "files"),
        api_keys=[ALICE, BOB, CAROL],
        max_queued_jobs=3,
        dispatch_interval_s=0.5,
        limits=Limits(max_image_bytes=4 * 2**20, max_audio_bytes=2 * 2**20),
        # No grace on shutdown: the restart test stops the application in the middle of a job.
        generator=GeneratorScaling(num_cpus=1, graceful_shutdown_timeout_s=0),
        generation=GenerationDefaults(defaults=SMALL),
    )
    with local_ray(num_cpus=2):
        running = Service(config, shared_media)
        serve.start(http_options={"host": "127.0.0.1", "port": int(running.base_url.rsplit(":", 1)[1])})
        running.start()
        yield running
        running.http.close()
        serve.shutdown()


@pytest.fixture(scope="module")
def alice_job(service) -> str:
    response = service.submit()
    assert response.status_code == 202, response.text
    return service.wait(response.json()["id"])["id"]


def _official_options(media: Path) -> dict[str, Any]:
    return json.loads((media / "two_people_car.official.json").read_text())


def _streams(path: Path) -> dict[str, dict[str, Any]]:
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type,r_frame_rate,nb_frames,duration",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return {stream["codec_type"]: stream for stream in json.loads(probe.stdout)["streams"]}


def test_two_people_car_job_gives_a_25fps_video_with_its_audio(service, shared_media, tmp_path):
    if shutil.which("ffprobe") is None:
        pytest.skip("ffprobe is missing (apt-get install ffmpeg; CI installs it)")
    # The official input JSON as the options (its files are the uploads), with the tiny fast settings beside it.
    response = service.submit({**_official_options(shared_media), **FAST})
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/v1/videos/{response.json()['id']}"
    job = service.wait(response.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"] == 100 and job["progress_detail"] == {"clip": 1, "clips": 1, "step": 2, "steps": 2}
    # bbox [y0, x0, y1, x1] of the official file, converted to our [x0, y0, x1, y1].
    assert job["result"]["boxes"] == [[120, 160, 1080, 1280], [1320, 160, 2280, 1280]]

    content = service.http.get(job["content_url"], headers={"Authorization": f"Bearer {ALICE}"})
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    video_path = tmp_path / "car.mp4"
    video_path.write_bytes(content.content)
    streams = _streams(video_path)
    assert streams["video"]["r_frame_rate"] == "25/1"
    assert int(streams["video"]["nb_frames"]) == FAST["frame_num"]  # the speech (4.9 s) outlasts one clip
    video_s = FAST["frame_num"] / 25
    # The sound of the clip's 0.68 s; AAC may run past by up to one frame of 1024 samples.
    assert video_s - 0.01 <= float(streams["audio"]["duration"]) <= video_s + 1024 / 44100 + 0.01


def test_restart_finishes_every_accepted_job(service, pause_gate):
    pause_gate.hold(STEP_PAUSE)
    interrupted = service.submit(HELD).json()["id"]
    waiting = service.submit(SMALL).json()["id"]
    pause_gate.wait_reached(STEP_PAUSE)

    service.stop()  # mid-job: the generator replica dies holding the job after its first step
    pause_gate.release(STEP_PAUSE)
    # Unfinished: still running, or already requeued by the dispatcher that saw its generator die.
    stored = service.stored(interrupted)
    assert stored.state in {"running", "queued"} and stored.attempts == 1
    service.start()

    first, second = service.wait(interrupted), service.wait(waiting)
    assert first["state"] == "succeeded" and first["attempts"] == 2  # requeued and run again, not lost
    assert second["state"] == "succeeded" and second["attempts"] == 1


def test_cancelling_stops_a_running_job_between_steps_and_a_queued_one_at_once(service, pause_gate):
    pause_gate.hold(STEP_PAUSE)
    running = service.submit(HELD).json()["id"]
    queued = service.submit(SMALL).json()["id"]
    pause_gate.wait_reached(STEP_PAUSE)  # step 1 reported, and answered "go on" before the cancellation
    assert service.job(running)["progress_detail"]["step"] == 1

    response = service.cancel(queued)
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    response = service.cancel(running)
    assert response.status_code == 202 and response.json()["cancel_requested"]
    pause_gate.release(STEP_PAUSE)

    job = service.wait(running)
    # Step 2's report learns of the cancellation; the run stops before step 3.
    assert job["state"] == "cancelled" and job["progress_detail"]["step"] == 2
    content = service.http.get(f"/v1/videos/{running}/content", headers={"Authorization": f"Bearer {ALICE}"})
    assert content.status_code == 409 and "cancelled" in content.json()["detail"]
    assert service.job(queued)["attempts"] == 0  # never started


def test_an_idempotency_key_returns_the_same_job_to_its_owner_only(service):
    key = {"Idempotency-Key": "retry-42"}
    first = service.submit(SMALL, headers=key)
    again = service.submit(SMALL, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"

    changed = service.submit({**SMALL, "seed": 1}, headers=key)
    assert changed.status_code == 409 and "retry-42" in changed.json()["detail"]

    other_owner = service.submit(SMALL, key=BOB, headers=key)
    assert other_owner.status_code == 202 and other_owner.json()["id"] != first.json()["id"]
    assert service.wait(first.json()["id"])["state"] == "succeeded"
    assert service.wait(other_owner.json()["id"], key=BOB)["state"] == "succeeded"


def test_concurrent_submissions_over_the_queue_bound_get_429_and_health_keeps_answering(service, pause_gate):
    health: list[int] = []
    done = threading.Event()

    def probe_health() -> None:
        with httpx.Client(base_url=service.base_url, timeout=30) as client:
            while not done.is_set():
                health.append(client.get("/healthz").status_code)
                time.sleep(0.2)

    prober = threading.Thread(target=probe_health)
    prober.start()
    pause_gate.hold(STEP_PAUSE)  # the one generator holds the first job it runs: no other job leaves the queue
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(lambda seed: service.submit({**FAST, "steps": 4, "seed": seed}), range(20)))
        pause_gate.release(STEP_PAUSE)
        accepted = [response.json()["id"] for response in responses if response.status_code == 202]
        finished = [service.wait(job_id) for job_id in accepted]
    finally:
        pause_gate.release(STEP_PAUSE)
        done.set()
        prober.join()

    # The bound counts waiting jobs: max_queued_jobs of them, plus the one running if it was claimed meanwhile.
    assert service.config.max_queued_jobs <= len(accepted) <= service.config.max_queued_jobs + 1
    assert {response.status_code for response in responses} == {202, 429}
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1 and "max_queued_jobs" in response.json()["detail"]
    assert [job["state"] for job in finished] == ["succeeded"] * len(accepted)
    assert health and set(health) == {200}


def _bad_requests(service: Service) -> dict[str, tuple[httpx.Response, int, str]]:
    media = service.media
    person1 = ("two_people_car_person1.WAV", (media / "two_people_car_person1.WAV").read_bytes())
    limit = service.config.limits.max_image_bytes
    return {
        "not an image": (
            service.submit(files=service.car_files(image=b"hello, not a picture")),
            422,
            r"image \('two_people_car.png'\): not an image",
        ),
        "corrupt WAV": (
            service.submit(files=service.car_files(audio=[person1, ("voice.wav", b"RIFF\x00\x00garbage" * 10)])),
            422,
            r"audio 2 \('voice.wav'\)",
        ),
        "zero-length audio": (
            service.submit(files=service.car_files(audio=[person1, ("empty.wav", b"")])),
            422,
            r"audio 2 \('empty.wav'\): empty file",
        ),
        "box outside the image": (
            service.submit({"boxes": [[2000, 100, 2700, 900], [1320, 160, 2280, 1280]]}),
            422,
            r"options.boxes\[0\] \(person 1\): box .* reaches outside the 2560x1440 image",
        ),
        "more audio streams than regions": (
            service.submit({"boxes": [[120, 160, 1080, 1280]]}),
            422,
            r"options.boxes: 1 region\(s\) for 2 audio stream\(s\)",
        ),
        "oversized upload": (
            service.submit(files=service.car_files(image=b"\x89PNG" + bytes(limit))),
            413,
            r"limits.max_image_bytes",
        ),
        "wrong API key": (service.submit(key="guessed-key"), 401, r"unknown API key"),
        "missing API key": (service.http.post("/v1/videos", files=service.car_files()), 401, r"Authorization: missing"),
    }


def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(service, alice_job):
    jobs_before = len(service.jobs(limit=100)["data"])
    for case, (response, status, message) in _bad_requests(service).items():
        assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
        assert re.search(message, response.json()["detail"]), f"{case}: {response.json()['detail']}"
        assert service.http.get("/healthz").status_code == 200, case

    someone_elses = service.http.get(f"/v1/videos/{alice_job}", headers={"Authorization": f"Bearer {BOB}"})
    assert someone_elses.status_code == 403 and alice_job in someone_elses.json()["detail"]
    assert service.cancel(alice_job, key=BOB).status_code == 403
    assert len(service.jobs(limit=100)["data"]) == jobs_before  # nothing was accepted


def test_job_list_pages_through_the_callers_jobs_only(service):
    ids = [service.submit(SMALL, key=CAROL).json()["id"] for _ in range(2)]
    first_page = service.jobs(key=CAROL, limit=1)
    second_page = service.jobs(key=CAROL, limit=1, after=first_page["last_id"])
    assert [job["id"] for job in first_page["data"] + second_page["data"]] == ids[::-1]  # newest first
    assert first_page["has_more"] and not second_page["has_more"]
    assert not {job["id"] for job in service.jobs(key=ALICE, limit=100)["data"]} & set(ids)
    for job_id in ids:
        service.wait(job_id, key=CAROL)


def test_regions_endpoint_finds_person_one_left_of_person_two(service, shared_media):
    image = ("image", ("car.png", (shared_media / "two_people_car.png").read_bytes(), "image/png"))
    auth = {"Authorization": f"Bearer {ALICE}"}
    found = service.http.post("/v1/regions", files=[image], data={"persons": "2"}, headers=auth).json()
    assert (found["width"], found["height"], found["source"]) == (2560, 1440, "faces")
    (left, _, right, _), (left2, _, right2, _) = found["boxes"]
    assert (left + right) / 2 < (left2 + right2) / 2

    outside = service.http.post("/v1/regions", files=[image], data={"boxes": "[[0, 0, 3000, 100]]"}, headers=auth)
    assert outside.status_code == 422 and "outside" in outside.json()["detail"]


def test_metrics_count_requests_by_route_and_jobs_by_state(service, alice_job):
    service.http.get("/healthz")
    text = service.http.get("/metrics").text
    assert re.search(r'multitalk_http_requests_total\{[^}]*route="/healthz"[^}]*status="200"\} [1-9]', text)
    assert re.search(r'multitalk_jobs\{state="succeeded"\} [1-9]', text)


# ---------------------------------------------------------------------------------------------------- web page


def test_web_page_shows_regions_then_generates_plays_and_lists_the_video(service, shared_media, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is missing (apt-get install chromium; CI installs it)")
    browser = Chromium(tmp_path)
    try:
        browser.send("Page.navigate", url=f"{service.base_url}/")
        browser.wait_for("document.readyState === 'complete' && !!document.querySelector('#audio-1')")
        browser.evaluate(f"""{{ const key = document.querySelector('#api-key');
            key.value = {json.dumps(ALICE)}; key.dispatchEvent(new Event('change')); }}""")
        browser.evaluate("document.querySelector('#add-person').click()")
        browser.choose_files("#audio-1", shared_media / "two_people_car_person1.WAV")
        browser.choose_files("#audio-2", shared_media / "two_people_car_person2.WAV")
        browser.choose_files("#image", shared_media / "two_people_car.png")
        # The detected regions are drawn over the image before anything is submitted.
        shown = json.loads(
            browser.wait_for(
                "document.querySelector('#regions-note').textContent.includes('from faces')"
                " && document.querySelector('#regions').dataset.boxes"
            )
        )
        assert len(shown) == 2 and shown[0][0] < shown[1][0]

        browser.evaluate("document.querySelector('#prompt').value = 'two people talk in a car'")
        browser.evaluate("document.querySelector('#submit').click()")
        browser.wait_for("document.querySelector('#status').dataset.state === 'succeeded'")
        # HAVE_CURRENT_DATA: the browser decoded the H.264 video, not only its header.
        duration = browser.wait_for("(v => v.readyState >= 2 && v.duration)(document.querySelector('#video'))")
        job_id = browser.evaluate("document.querySelector('#job-id').textContent")
        browser.wait_for(f"!!document.querySelector('#jobs tr[data-job-id=\"{job_id}\"]')")
        browser.screenshot(ARTIFACTS / "web_page.png")
    finally:
        browser.close()

    job = service.job(job_id)
    assert duration == pytest.approx(job["result"]["duration_s"], abs=0.05)
    assert job["prompt"] == "two people talk in a car"
    assert job["result"]["region_source"] == "boxes" and job["result"]["boxes"] == shown  # what the page showed
