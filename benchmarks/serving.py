"""Serving overhead and throughput: Ray Serve with the tiny model on this machine's CPU, over real HTTP.

1. The API's share of a job's wall time: (submission sent -> generator starts) + (generator ends -> video
   available, i.e. uploaded and the job marked succeeded), over (submission sent -> video available). Target <= 5%.
   The first part is broken down into accepting the request (checks, storing the inputs, queueing), dispatching it
   to a generator, and fetching the inputs there. Client and server share this machine's clock.
2. Jobs per minute with 1 and 2 generator replicas (one CPU each) on a burst of jobs, and their ratio.
3. With --aiperf PATH (the `aiperf` command, NVIDIA AIPerf >= 0.13, installed in a virtualenv of its own: it pins
   huggingface-hub < 2, which the model's transformers cannot use), the same server loaded by AIPerf's video
   generation benchmark (`--endpoint-type video_generation`: JSON create with the inputs as /v1/files ids, polling,
   download), so the figures compare with what the same tool reports for other /v1/videos servers.

The job is the two_people_car example (../shared/media) at the tiny fast settings, with its official boxes.

    python benchmarks/serving.py [--repeats 5] [--burst 6] [--aiperf .venv-aiperf/bin/aiperf --aiperf-requests 4]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
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
TOKENIZER_REPO = "local/multitalk-tiny-tokenizer"
_SNAPSHOT = "0" * 40


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


def _tokenizer_cache(model_dir: Path, work: Path) -> Path:
    """A Hugging Face cache holding the tiny model's tokenizer as TOKENIZER_REPO: AIPerf counts prompt tokens with
    a tokenizer it loads offline only from such a cache (its builtin one downloads its vocabulary)."""
    cache = work / "hf-cache"
    repo = cache / f"models--{TOKENIZER_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(_SNAPSHOT)
    shutil.copytree(model_dir / "tokenizer", repo / "snapshots" / _SNAPSHOT)
    return cache


def aiperf(client: httpx.Client, command: str, requests: int, work: Path, model: str, model_dir: Path) -> dict:
    """AIPerf's video generation benchmark against the running server, one request at a time; its own summary."""
    artifacts = work / "aiperf"
    artifacts.mkdir()
    ids = {}
    for name in ("two_people_car.png", "two_people_car_person1.WAV", "two_people_car_person2.WAV"):
        files = [("file", (name, (MEDIA / name).read_bytes()))]
        ids[name] = client.post("/v1/files", headers=AUTH, files=files, data={"purpose": "user_data"}).json()["id"]
    prompts = artifacts / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "Two people talk in a car."}) + "\n")
    boxes = json.loads((MEDIA / "two_people_car.official.json").read_text())["bbox"]
    options = {**FAST, "boxes": [[x0, y0, x1, y1] for y0, x0, y1, x1 in boxes.values()]}
    # AIPerf sends these as multipart text fields: the speech ids comma-separated, the options as JSON text.
    extra = {
        "input_reference": ids["two_people_car.png"],
        "audio_file_id": f"{ids['two_people_car_person1.WAV']},{ids['two_people_car_person2.WAV']}",
        "options": json.dumps(options),
    }
    arguments = [command, "profile", "--url", str(client.base_url), "--model", model, "--api-key", KEY]
    arguments += ["--endpoint-type", "video_generation", "--download-video-content", "--ui-type", "none"]
    arguments += ["--tokenizer", TOKENIZER_REPO]
    arguments += ["--input-file", str(prompts), "--custom-dataset-type", "single_turn", "--concurrency", "1"]
    arguments += ["--request-count", str(requests), "--warmup-request-count", "1", "--artifact-dir", str(artifacts)]
    arguments += ["--request-timeout-seconds", "600", "--extra-inputs", json.dumps(extra)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(_tokenizer_cache(model_dir, work))}
    done = subprocess.run(arguments, env=environment, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"aiperf failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(next(artifacts.rglob("profile_export_aiperf.json")).read_text())


def print_aiperf(summary: dict, requests: int) -> None:
    latency, throughput = summary["request_latency"], summary["request_throughput"]
    print(f"  AIPerf video_generation, {requests} requests at concurrency 1 (submit, poll, download):")
    print(f"    request latency avg {latency['avg']:.0f} {latency['unit']}, p99 {latency['p99']:.0f} {latency['unit']}")
    print(f"    {throughput['avg'] * 60:.1f} requests/min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="jobs timed one after the other for the API share")
    parser.add_argument("--burst", type=int, default=6, help="jobs submitted at once for the throughput")
    parser.add_argument("--aiperf", default=None, help="the aiperf command: also load the server with AIPerf")
    parser.add_argument("--aiperf-requests", type=int, default=4, help="requests of the AIPerf run")
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
        served = (config.served_model, config.model_dir)
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
                    if replicas == 1 and args.aiperf:
                        summary = aiperf(client, args.aiperf, args.aiperf_requests, root, *served)
                        print_aiperf(summary, args.aiperf_requests)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\n2 replicas / 1 replica: {rates[2] / rates[1]:.2f}x jobs per minute (2 CPU cores: ideal 2x)")


if __name__ == "__main__":
    main()
