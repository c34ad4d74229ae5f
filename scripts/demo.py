"""`make demo`: the platform end to end on data it generates itself, with tiny random models.

Steps:
  1-3. synthesise two speakers' speech, encode it with a tiny wav2vec2 and run the tiny MultiTalk transformer on a
       two-person, turn-taking conversation;
  4.   generate a short two-person talking video with sound from the tiny model directory, through the same
       pipeline and job schema as `python -m multitalk_model.generate`, and dub a short video with a tiny
       InfiniteTalk model directory (video to video: each clip conditioned on the source frame at its position, the
       output carrying the new speech);
  5.   curate a generated sample corpus with `pipelines/curate.py`, submitted as a Ray job to a local Ray cluster;
  6.   train the tiny model's audio branch on those shards with `training/train.py` (Ray Train + DeepSpeed, two
       workers), which writes the loss curve and the exported audio weights;
  7.   serve the model with Ray Serve, submit a job over the HTTP API, and print the web page's URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import ray
import skimage.data
import torch
import yaml
from PIL import Image
from ray import serve

from multitalk_model.accounting import forward_flops, parameter_counts
from multitalk_model.audio import SAMPLE_RATE, compose_persons, loudness_normalize
from multitalk_model.checkpoints import build_model
from multitalk_model.config import get_preset
from multitalk_model.fixtures.corpus import write_corpus, write_held_out_clips
from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from multitalk_model.generation import MultiTalkPipeline
from multitalk_model.jobs import GenerationJob, PersonInput
from multitalk_model.media import write_video
from multitalk_model.regions import default_halves, region_masks
from multitalk_model.wav2vec import Wav2VecEncoder, audio_windows
from serving.app import build_app
from serving.config import ServingConfig
from training.loop import EXPORT_FILE
from training.metrics import LOSS_CURVE_FILE

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def transformer_forward(out: Path) -> None:
    step("1. speech for two persons, synthesised")
    voices = [synthesize_speech(1.6, seed=1, pitch_hz=115.0), synthesize_speech(1.6, seed=2, pitch_hz=210.0)]
    tracks = compose_persons([loudness_normalize(v) for v in voices], mode="add")  # person 1 speaks, then person 2
    for i, track in enumerate(tracks, 1):
        write_wav(out / f"person{i}.wav", track, SAMPLE_RATE)
    print(f"   {len(tracks)} tracks of {len(tracks[0]) / SAMPLE_RATE:.2f} s (turn-taking) -> {out}/person*.wav")

    step("2. wav2vec2 features at 25 fps (tiny random wav2vec2)")
    encoder = Wav2VecEncoder.from_pretrained(build_tiny_wav2vec2(out / "wav2vec2"))
    config = get_preset("tiny")
    frames = 4 * 5 + 1  # 21 video frames -> 6 latent frames
    features = [audio_windows(encoder(track)[:frames], config.audio_window) for track in tracks]
    audio = torch.stack(features)[None]  # [1, persons, frames, window, layers, channels]
    print(f"   features per person {tuple(features[0].shape)}  (frames, window, layers, channels)")

    step("3. two-person forward pass of the tiny MultiTalk transformer")
    torch.manual_seed(0)
    model = build_model(config, "cpu").eval()
    latent = (6, 16, 16)  # T, H, W: a 21-frame 128x128 clip
    boxes = default_halves((latent[1], latent[2]), 2)
    masks = torch.from_numpy(region_masks(boxes, (latent[1], latent[2])))[None]
    inputs = dict(
        hidden_states=torch.randn(1, config.in_channels, *latent),
        timestep=torch.tensor([900.0]),
        encoder_hidden_states=torch.randn(1, 12, config.text_dim),
        encoder_hidden_states_image=torch.randn(1, 257, config.image_dim),
        audio=audio,
        region_masks=masks,
    )
    start = time.perf_counter()
    with torch.no_grad():
        velocity = model(**inputs).sample
    elapsed = time.perf_counter() - start
    counts = parameter_counts(config)
    flops = forward_flops(config, latent, num_persons=2)
    print(
        f"   velocity {tuple(velocity.shape)} in {elapsed * 1000:.0f} ms, "
        f"finite: {bool(torch.isfinite(velocity).all())}"
    )
    print(f"   parameters {counts.total:,} (audio, trainable: {counts.audio:,}); forward {flops.total / 1e9:.2f} GFLOP")
    big = parameter_counts(get_preset("multitalk-14b"))
    print(f"   multitalk-14b preset: {big.total / 1e9:.2f}B parameters, {big.audio / 1e9:.2f}B in the audio branch")


def generate_video(out: Path) -> Path:
    step("4. a two-person talking video (tiny random model: the frames are noise-like, the plumbing is real)")
    model_dir = build_tiny_model_dir(out / "tiny-model")
    # Two faces side by side, from photos that ship with scikit-image: person 1 on the left.
    left, right = skimage.data.astronaut(), np.stack([skimage.data.camera()] * 3, axis=-1)
    Image.fromarray(np.concatenate([left, right], axis=1)).save(out / "two_people.png")
    job = GenerationJob(
        image=str(out / "two_people.png"),
        persons=[PersonInput(audio=str(out / "person1.wav")), PersonInput(audio=str(out / "person2.wav"))],
        prompt="two people talking to each other",
        audio_type="para",  # the tracks written in step 1 already take turns
        mode="streaming",
        frame_num=17,
        motion_frames=5,
        steps=2,
        resolution=(64, 128),
        seed=0,
    )
    (out / "job.json").write_text(job.model_dump_json(indent=2))
    pipeline = MultiTalkPipeline.from_model_dir(model_dir)
    result = pipeline.generate(job, out / "two_people.mp4", preview_path=out / "regions.png")
    print(f"   regions from {result.region_source}: {[tuple(round(v) for v in box) for box in result.boxes]}")
    print(f"   {result.num_frames} frames ({result.duration_s:.2f} s, {result.clips} clips) in {result.seconds:.1f} s")
    print(f"   video: {result.path}\n   regions preview: {out / 'regions.png'}")
    print(
        f"   same job from the command line: python -m multitalk_model.generate --input {out / 'job.json'} "
        f"--model-dir {model_dir} --out video.mp4"
    )
    return result.path


def dub_video(out: Path) -> Path:
    step("4b. video dubbing with a tiny InfiniteTalk model: a source video speaks person 1's speech")
    model_dir = build_tiny_model_dir(out / "tiny-infinitetalk", family="infinitetalk")
    # The source: a slow pan over a photo that ships with scikit-image, 2 s at 25 fps.
    photo = skimage.data.astronaut()  # 512 x 512
    frames = np.stack([photo[100 : 100 + 320, 40 + 4 * i : 40 + 4 * i + 256] for i in range(50)])
    source = write_video(out / "source.mp4", frames, 25)
    job = GenerationJob(
        video=str(source),
        persons=[PersonInput(audio=str(out / "person1.wav"))],
        prompt="a woman is talking",
        mode="streaming",
        frame_num=33,  # clips of 33 frames advancing by 24: two clips for the first 2 s of the speech
        max_duration_s=2.0,
        steps=2,
        resolution=(80, 64),
        seed=0,
    )
    (out / "dub_job.json").write_text(job.model_dump_json(indent=2))
    pipeline = MultiTalkPipeline.from_model_dir(model_dir)  # the directory says infinitetalk: its sampler runs
    result = pipeline.generate(job, out / "dubbed.mp4")
    print(f"   {type(pipeline).__name__}: {result.num_frames} frames ({result.duration_s:.2f} s, {result.clips} clips)")
    print(f"   video: {result.path} (sound: {out / 'person1.wav'}; source: {source})")
    print(
        f"   same job from the command line: python -m multitalk_model.generate --input {out / 'dub_job.json'} "
        f"--model-dir {model_dir} --out dubbed.mp4"
    )
    return result.path


@dataclass(frozen=True)
class LocalCluster:
    gcs_address: str  # for ray.init
    job_address: str  # for ray job submit


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int = 2, keep_running: bool = False) -> Iterator[LocalCluster]:
    """A real local Ray cluster (`ray start --head`), stopped on exit unless keep_running.

    `--block` keeps `ray start` in the foreground, so stopping it stops exactly this cluster and nothing else that
    may run Ray on the machine.
    """
    ports = [_free_port() for _ in range(2)]
    env = _ray_env()
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={ports[0]}",
            f"--dashboard-port={ports[1]}",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster = LocalCluster(gcs_address=f"127.0.0.1:{ports[0]}", job_address=f"http://127.0.0.1:{ports[1]}")
    stop = True
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(
            [RAY, "job", "list", "--address", cluster.job_address], env=env, capture_output=True
        ).returncode:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the local Ray cluster did not start (run `ray start --head` by hand to see why)")
            time.sleep(2)
        yield cluster
        stop = not keep_running
    finally:
        if stop:
            head.send_signal(signal.SIGTERM)
            head.wait(timeout=60)


def submit_job(cluster: LocalCluster, *entrypoint: str) -> None:
    """`ray job submit` of a command run in an uploaded copy of this repository, then its logs until it ends;
    raises if the job fails."""
    env, address = _ray_env(), ["--address", cluster.job_address]
    submit = [RAY, "job", "submit", *address, "--working-dir", str(ROOT), "--no-wait", "--", *entrypoint]
    deadline = time.monotonic() + 120
    while True:
        submitted = subprocess.run(submit, env=env, capture_output=True, text=True)
        said = submitted.stdout + submitted.stderr
        if submitted.returncode == 0:
            break
        # The head's job agent registers a little after the dashboard answers: until then submissions are refused.
        if "No available agent" not in said or time.monotonic() > deadline:
            raise RuntimeError(f"ray job submit failed:\n{said}")
        time.sleep(2)
    job_id = re.search(r"Job '(\S+)' submitted successfully", said).group(1)
    print(f"   ray job submit ... -- {' '.join(entrypoint)}  ->  job {job_id}")
    subprocess.run([RAY, "job", "logs", *address, "--follow", job_id], env=env, check=True)
    status = subprocess.run([RAY, "job", "status", *address, job_id], env=env, capture_output=True, text=True)
    if f"Job '{job_id}' succeeded" not in status.stdout + status.stderr:
        raise RuntimeError(f"job {job_id} did not succeed:\n{status.stdout}{status.stderr}")


def with_absolute_paths(template: Path, out: Path, updates: dict) -> Path:
    """A copy of a YAML config with the given (nested, dotted) fields set: jobs run in an uploaded copy of the
    repository, so every path they read or write must be absolute."""
    config = yaml.safe_load(template.read_text())
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = out / template.name
    path.write_text(yaml.safe_dump(config))
    return path


def curate(out: Path, cluster: LocalCluster) -> Path:
    step("5. curation on Ray Data: `ray job submit ... pipelines/curate.py` on a local Ray cluster")
    data = out / "demo_data"
    manifest = write_corpus(data)
    print(f"   corpus the project made itself: {manifest}")
    curated = out / "curation"
    config = with_absolute_paths(
        ROOT / "pipelines/configs/demo.yaml",
        out,
        {"input": str(manifest), "output": str(curated), "wav2vec.model_path": str(data / "wav2vec2-tiny")},
    )
    submit_job(cluster, "python", "pipelines/curate.py", "--config", str(config))
    print(f"   {json.loads((curated / 'summary.json').read_text())}")
    print(f"   report: {curated / 'report.html'}")
    return curated


def train(out: Path, cluster: LocalCluster, curated: Path) -> Path:
    step("6. training on Ray Train + DeepSpeed: two workers, audio parameters only, on the curated shards")
    trained = out / "training"
    config = with_absolute_paths(
        ROOT / "training/configs/tiny-cpu.yaml",
        out,
        {"output": str(trained), "data.path": str(curated), "model.model_dir": str(out / "tiny-model")},
    )
    submit_job(cluster, "python", "training/train.py", "--config", str(config), "--max-steps", "8")
    print(f"   loss curve: {trained / LOSS_CURVE_FILE}")
    print(f"   exported audio weights (official key format): {trained / EXPORT_FILE}")
    evaluate(out, cluster, trained)
    return trained


def evaluate(out: Path, cluster: LocalCluster, trained: Path) -> None:
    print(
        "   evaluation of the base and trained weights on held-out clips: `ray job submit ... evaluation/evaluate.py`"
    )
    evaluated = out / "evaluation"
    config = with_absolute_paths(
        ROOT / "evaluation/configs/demo.yaml",
        out,
        {
            "test_set": str(write_held_out_clips(out / "held_out")),
            "output": str(evaluated),
            "models": [
                {"name": "base", "model_dir": str(out / "tiny-model")},
                {
                    "name": "trained",
                    "model_dir": str(out / "tiny-model"),
                    "audio_weights": str(trained / "multitalk.safetensors"),
                },
            ],
        },
    )
    submit_job(cluster, "python", "evaluation/evaluate.py", "--config", str(config))
    summary = json.loads((evaluated / "summary.json").read_text())
    for difference in summary["differences"]:
        change = difference["metrics"].get(summary["primary_metric"], {})
        print(f"   {difference['b']} - {difference['a']}, {summary['primary_metric']}: {change}")
    print(f"   report: {evaluated / 'report.html'}")


def serve_and_submit(out: Path, cluster: LocalCluster) -> None:
    step("7. serving on Ray Serve: the jobs API, a job submitted over HTTP, the web page")
    port, key = _free_port(), "demo-key"
    ray.init(address=cluster.gcs_address, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServingConfig.model_validate(
        {
            "model_dir": str(out / "tiny-model"),
            "tiny": True,
            "database_url": f"sqlite:///{out / 'serving' / 'jobs.db'}",
            "storage_uri": str(out / "serving" / "files"),
            "api_keys": [key],
            "generation": {"defaults": {"steps": 2, "frame_num": 17, "motion_frames": 5, "resolution": [64, 112]}},
        }
    )
    serve.run(build_app(config), name="multitalk", route_prefix="/")
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    files = [("image", ("two_people.png", (out / "two_people.png").read_bytes(), "image/png"))]
    files += [("audio", (f"person{i}.wav", (out / f"person{i}.wav").read_bytes(), "audio/wav")) for i in (1, 2)]
    options = json.dumps({"prompt": "two people talking", "audio_type": "para", "mode": "streaming"})
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        response = client.post("/v1/videos", files=files, data={"options": options})
        response.raise_for_status()
        job_id = response.json()["id"]
        print(f"   POST /v1/videos -> {response.status_code}, job {job_id}")
        while (job := client.get(f"/v1/videos/{job_id}").json())["state"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(1)
        if job["state"] != "succeeded":
            raise RuntimeError(f"the demo job ended {job['state']}: {job['error']}")
        video = out / "served.mp4"
        video.write_bytes(client.get(f"/v1/videos/{job_id}/content").content)
    print(f"   GET /v1/videos/{job_id}/content -> {video}")
    print(f"   web page: {base}/  (API key: {key}; API docs at {base}/docs)")
    print(f"   the service keeps running; stop it with: {RAY} stop")


def _ray_env() -> dict[str, str]:
    # The job's `python` and Ray's workers must be this environment's.
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    transformer_forward(out)
    generate_video(out)
    dub_video(out)
    with local_ray_cluster(keep_running=True) as cluster:
        curated = curate(out, cluster)
        train(out, cluster, curated)
        serve_and_submit(out, cluster)
    print(f"\nDemo finished; outputs in {out}")


if __name__ == "__main__":
    main()
