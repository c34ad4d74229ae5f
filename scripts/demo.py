"""`make demo`: the platform end to end on data it generates itself, with tiny random models.

Steps: synthesise two speakers' speech, encode it with a tiny wav2vec2 and run the tiny MultiTalk transformer on a
two-person, turn-taking conversation; then generate a short two-person talking video with sound from the tiny
model directory, through the same pipeline and job schema as `python -m multitalk_model.generate`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import skimage.data
import torch
import yaml
from PIL import Image

from multitalk_model.accounting import forward_flops, parameter_counts
from multitalk_model.audio import SAMPLE_RATE, Wav2VecEncoder, audio_windows, build_tiny_wav2vec2, compose_persons, loudness_normalize
from multitalk_model.build_tiny import build_tiny_model_dir
from multitalk_model.checkpoints import build_model
from multitalk_model.config import get_preset
from multitalk_model.jobs import GenerationJob, PersonInput
from multitalk_model.pipeline import MultiTalkPipeline
from multitalk_model.regions import default_halves, region_masks
from multitalk_model.synth import synthesize_speech, write_wav
from pipelines.sample_data import write_corpus

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
    print(f"   velocity {tuple(velocity.shape)} in {elapsed * 1000:.0f} ms, finite: {bool(torch.isfinite(velocity).all())}")
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
        mode="streaming", frame_num=17, motion_frames=5, steps=2, resolution=(64, 128), seed=0,
    )
    (out / "job.json").write_text(job.model_dump_json(indent=2))
    pipeline = MultiTalkPipeline.from_model_dir(model_dir)
    result = pipeline.generate(job, out / "two_people.mp4", preview_path=out / "regions.png")
    print(f"   regions from {result.region_source}: {[tuple(round(v) for v in box) for box in result.boxes]}")
    print(f"   {result.num_frames} frames ({result.duration_s:.2f} s, {result.clips} clips) in {result.seconds:.1f} s")
    print(f"   video: {result.path}\n   regions preview: {out / 'regions.png'}")
    print(f"   same job from the command line: python -m multitalk_model.generate --input {out / 'job.json'} "
          f"--model-dir {model_dir} --out video.mp4")
    return result.path


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int = 2) -> Iterator[str]:
    """A real local Ray cluster (`ray start --head`), stopped on exit; yields the job-submission address.

    `--block` keeps `ray start` in the foreground, so stopping it stops exactly this cluster and nothing else that
    may run Ray on the machine.
    """
    ports = [_free_port() for _ in range(2)]
    env = _ray_env()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={ports[0]}", f"--dashboard-port={ports[1]}",
         "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the local Ray cluster did not start (run `ray start --head` by hand to see why)")
            time.sleep(2)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)


def curate(out: Path, address: str) -> Path:
    step("5. curation on Ray Data: `ray job submit ... pipelines/curate.py` on a local Ray cluster")
    data = out / "demo_data"
    manifest = write_corpus(data)
    print(f"   corpus the project made itself: {manifest}")
    # The job runs in an uploaded copy of this folder: give it absolute paths to the demo data and the output.
    config = yaml.safe_load((ROOT / "pipelines/configs/demo.yaml").read_text())
    config.update(input=str(manifest), output=str(out / "curation"))
    config["wav2vec"]["model_path"] = str(data / "wav2vec2-tiny")
    config_path = out / "curation.yaml"
    config_path.write_text(yaml.safe_dump(config))
    subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         "python", "pipelines/curate.py", "--config", str(config_path)],
        env=_ray_env(), check=True,
    )
    summary = json.loads((out / "curation" / "summary.json").read_text())
    print(f"   {summary}")
    print(f"   report: {out / 'curation' / 'report.html'}")
    return out / "curation"


def _ray_env() -> dict[str, str]:
    # The job's `python` and Ray's workers must be this environment's.
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}


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
    np.random.seed(0)
    transformer_forward(out)
    generate_video(out)
    with local_ray_cluster() as address:
        curate(out, address)
    print(f"\nDemo finished; outputs in {out}")


if __name__ == "__main__":
    main()
