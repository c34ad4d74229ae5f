"""Generator replicas scale on queued jobs: on a local Ray with at most 2 replicas, a burst of jobs starts the
second replica, both replicas run jobs, and once the queue is empty the deployment scales back to one.

Jobs are held at their first step (the generator's `generator-step` pause point) until the test has seen two
replica processes each holding one: no job can finish before the autoscaler has acted, whatever the machine's speed.
"""

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from serving.app import build_app
from serving.config import GenerationDefaults, GeneratorScaling, ServingConfig
from tests.helpers import free_port

pytestmark = pytest.mark.slow

APP, KEY = "multitalk-autoscaling", "scaling-key"
STEP_PAUSE = "generator-step"  # platform_common.pause: a replica reported a sampling step
SMALL = {"steps": 2, "frame_num": 5, "motion_frames": 1, "resolution": [32, 32]}
# Only guards against a hang: every wait below ends on a condition.
HANG_GUARD_S = 300
# Serve's metrics reach the autoscaler every 10 s by default; the burst and the idle queue are seen sooner so.
FAST_METRICS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.2",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.2",
}


def _running_generators() -> dict[str, int]:
    deployment = serve.status().applications[APP].deployments["Generator"]
    return {str(state): count for state, count in deployment.replica_states.items() if count}


@pytest.fixture
def scaling_service(tmp_path, monkeypatch):
    for name, value in FAST_METRICS.items():
        monkeypatch.setenv(name, value)
    config = ServingConfig(
        model_dir=build_tiny_model_dir(tmp_path / "model"),
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        storage_uri=str(tmp_path / "files"),
        api_keys=[KEY],
        dispatch_interval_s=0.2,
        generator=GeneratorScaling(
            min_replicas=1,
            max_replicas=2,
            target_jobs_per_replica=1,
            upscale_delay_s=0,
            downscale_delay_s=0,
            look_back_period_s=11,  # Serve wants it above its (deprecated) metrics_interval_s of 10 s
            num_cpus=0.5,
        ),
        generation=GenerationDefaults(defaults=SMALL),
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": FAST_METRICS})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        yield http, tmp_path
    serve.shutdown()
    ray.shutdown()


def _submit(http: httpx.Client, root: Path, seed: int) -> str:
    image, audio = root / "face.png", root / "speech.wav"
    if not image.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
        write_wav(audio, synthesize_speech(0.4), 16000)
    response = http.post(
        "/v1/videos",
        files=[("input_reference", ("face.png", image.read_bytes())), ("audio", ("speech.wav", audio.read_bytes()))],
        data={"options": json.dumps({"seed": seed})},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _until(condition, what: str):
    deadline = time.monotonic() + HANG_GUARD_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)
    return value


def test_a_burst_of_jobs_starts_a_second_replica_both_run_jobs_then_it_scales_back(scaling_service, pause_gate):
    http, root = scaling_service
    assert _running_generators() == {"RUNNING": 1}

    pause_gate.hold(STEP_PAUSE)
    jobs = [_submit(http, root, seed) for seed in range(4)]
    # One replica runs one job at a time: two processes held at once means the autoscaler started the second replica.
    holders = pause_gate.wait_reached(STEP_PAUSE, count=2, limit_s=HANG_GUARD_S)
    assert len(set(holders)) == 2
    assert _running_generators() == {"RUNNING": 2}

    pause_gate.release(STEP_PAUSE)  # both replicas finish the jobs they hold, and the rest
    auth = {"Authorization": f"Bearer {KEY}"}

    def finished() -> list[dict]:
        states = [http.get(f"/v1/videos/{job_id}", headers=auth).json() for job_id in jobs]
        return states if all(job["status"] in ("completed", "failed") for job in states) else []

    states = _until(finished, "every job finished")
    assert [job["status"] for job in states] == ["completed"] * len(jobs), [job["error"] for job in states]

    # The queue is empty: back to min_replicas.
    _until(lambda: _running_generators() == {"RUNNING": 1}, "the deployment scaled back to one replica")
