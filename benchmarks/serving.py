"""Serving overhead and throughput: Ray Serve with the tiny model on this machine's CPU, over real HTTP.

1. The API's share of a job's wall time: (submission sent -> generator starts) + (generator ends -> video
   available, i.e. uploaded and the job marked succeeded), over (submission sent -> video available). Target <= 5%.
   The first part is broken down into accepting the request (checks, storing the inputs, queueing), dispatching it
   to a generator, and fetching the inputs there. Client and server share this machine's clock.
2. Jobs per minute with 1 and 2 generator replicas (one CPU each) on a burst of jobs, and their ratio.

The job is the two_people_car example (../shared/media) at the tiny fast settings, with its official boxes.

    python benchmarks/serving.py [--repeats 5] [--burst 6]
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# Run as a script, this file's folder leads sys.path and its name would hide the `serving` package it measures.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402 - after the sys.path fix above
import ray  # noqa: E402
from ray import serve  # noqa: E402

from multitalk_model.fixtures.tiny_model import build_tiny_model_dir  # noqa: E402
from serving.app import build_app  # noqa: E402
from serving.config import GenerationDefaults, GeneratorScaling, ServingConfig  # noqa: E402

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
KEY = "benchmark-key"
FAST = {"steps": 2, "frame_num": 17, "motion_frames": 5, "resolution": [64, 112], "seed": 7}
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _epoch(moment: str) -> float:
    return datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()


def payload(seed: int) -> dict:
    """The request of one job, read from disk before any clock starts."""
    options = {**json.loads((MEDIA / "two_people_car.official.json").read_text()), **FAST, "seed": seed}
    audio = ("two_people_car_person1.WAV", "two_people_car_person2.WAV")
    files = [("input_reference", ("car.png", (MEDIA / "two_people_car.png").read_bytes(), "image/png"))]
    files += [("audio", (name, (MEDIA / name).read_bytes())) for name in audio]
    return {"files": files, "data": {"options": json.dumps(options)}}


def submit(client: httpx.Client, request: dict) -> str:
    response = client.post("/v1/videos", headers=AUTH, **request)
    response.raise_for_status()
    return response.json()["id"]


def finished(client: httpx.Client, job_id: str) -> dict:
    """Polls every 10 ms, so the client sees the end at most that much late (the share uses the server's time)."""
    while (job := client.get(f"/v1/videos/{job_id}", headers=AUTH).json())["status"] in ("queued", "in_progress"):
        time.sleep(0.01)
    if job["status"] != "completed":
        raise RuntimeError(f"job {job_id}: {job['status']}: {job['error']}")
    return job


def api_share(client: httpx.Client, repeats: int) -> None:
    finished(client, submit(client, payload(seed=0)))  # warm-up: first-call costs of every replica
    parts: dict[str, list[float]] = {"accept": [], "dispatch": [], "inputs": [], "store result": [], "total": []}
    shares = []
    for seed in range(1, repeats + 1):
        request = payload(seed)
        sent = time.time()
        job = finished(client, submit(client, request))
        accepted, claimed = job["timestamps"]["created"], job["timestamps"]["started"]
        started = _epoch(job["result"]["generation_started_at"])
        ended = _epoch(job["result"]["generation_ended_at"])
        available = job["timestamps"]["finished"]
        assert client.get(job["content_url"], headers=AUTH).status_code == 200
        spans = {
            "accept": accepted - sent,
            "dispatch": claimed - accepted,
            "inputs": started - claimed,
            "store result": available - ended,
            "total": available - sent,
        }
        for name, seconds in spans.items():
            parts[name].append(seconds)
        shares.append((started - sent + available - ended) / (available - sent))
    share = statistics.median(shares)
    total = statistics.median(parts.pop("total"))
    print(f"job wall time (submit -> video available), median of {repeats}: {total:.2f} s")
    for name, seconds in parts.items():
        print(f"  {name:>12}: {statistics.median(seconds) * 1000:6.0f} ms")
    print(f"  API share: {share * 100:.1f}% (target <= 5%: {'met' if share <= 0.05 else 'NOT met'})")


def jobs_per_minute(client: httpx.Client, burst: int) -> float:
    requests = [payload(seed) for seed in range(burst)]
    first_sent = time.time()
    ids = [submit(client, request) for request in requests]
    last_available = max(finished(client, job_id)["timestamps"]["finished"] for job_id in ids)
    return burst / (last_available - first_sent) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="jobs timed one after the other for the API share")
    parser.add_argument("--burst", type=int, default=6, help="jobs submitted at once for the throughput")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="multitalk-serving-benchmark-") as work:
        root = Path(work)
        config = ServingConfig(
            model_dir=build_tiny_model_dir(root / "model"),
            database_url=f"sqlite:///{root / 'jobs.db'}",
            storage_uri=str(root / "files"),
            api_keys=[KEY],
            max_queued_jobs=64,
            dispatch_interval_s=0.5,
            generation=GenerationDefaults(defaults=FAST),
        )
        port = _free_port()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rates = {}
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                for replicas in (1, 2):
                    scaling = GeneratorScaling(min_replicas=replicas, max_replicas=replicas, num_cpus=1)
                    app = build_app(config.model_copy(update={"generator": scaling}))
                    serve.run(app, name="multitalk", route_prefix="/")
                    print(f"\n== {replicas} generator replica(s)")
                    if replicas == 1:
                        api_share(client, args.repeats)
                    for job_id in [submit(client, payload(seed=100 + index)) for index in range(replicas)]:
                        finished(client, job_id)  # warm up every new replica
                    rates[replicas] = jobs_per_minute(client, args.burst)
                    print(f"  {rates[replicas]:.1f} jobs/min on a burst of {args.burst}")
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\n2 replicas / 1 replica: {rates[2] / rates[1]:.2f}x jobs per minute (2 CPU cores: ideal 2x)")


if __name__ == "__main__":
    main()
