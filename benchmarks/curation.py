"""Curation throughput: the same stages on the same inputs, run serially in this process (the baseline) and as
the Ray Data pipeline on an embedded local Ray. Prints the seconds of each stage in the serial run, video seconds
curated per wall second, the Ray / serial wall-time ratio (target <= 1.3x), and the cost of a rerun over the
finished output (every clip is skipped).

Inputs: the talking videos of ../shared/media (single and dual, plus the no-audio and silent ones, which are
rejected), or with --generated, the demo corpus the project generates.

    python benchmarks/curation.py [--media DIR | --generated] [--frame-num 81] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import ray
import yaml

from multitalk_model.fixtures.corpus import write_corpus
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from pipelines.config import load_config
from pipelines.curate import run

SHARED_INPUTS = {
    "conversation_left_then_right.mp4": "dual",
    "talking_man_25fps.mp4": "single",
    "talking_woman_25fps.mp4": "single",
    "talking_man_30fps.mp4": "single",
    "no_audio_track.mp4": "single",
    "silent_audio_track.mp4": "single",
}


def _inputs(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path, str]:
    """The input manifest, a wav2vec2 model directory, and a description of the inputs."""
    if args.generated:
        manifest = write_corpus(scratch / "corpus", args.duration)
        return manifest, scratch / "corpus" / "wav2vec2-tiny", f"generated corpus, {args.duration:.1f} s per video"
    if not args.media.is_dir():
        sys.exit(f"error: no shared media at {args.media} (pass --media DIR or --generated)")
    manifest = scratch / "inputs.jsonl"
    rows = [{"path": str(args.media / name), "kind": kind} for name, kind in SHARED_INPUTS.items()]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest, build_tiny_wav2vec2(scratch / "wav2vec2"), f"{len(rows)} videos of {args.media}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--media", type=Path, default=REPO.parent / "shared" / "media", help="shared media folder")
    parser.add_argument("--generated", action="store_true", help="curate the generated demo corpus instead")
    parser.add_argument("--duration", type=float, default=7.0, help="seconds per generated video")
    parser.add_argument("--frame-num", type=int, default=81, help="frames per clip (4n + 1)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        manifest, wav2vec_dir, described = _inputs(args, scratch)
        config_path = scratch / "config.yaml"
        fields = {
            "clips": {"frame_num": args.frame_num},
            "faces": {"num_cpus": 0.5},  # the two model actors share one CPU; the tasks get the rest
            "wav2vec": {"model_path": str(wav2vec_dir), "num_cpus": 0.5},
        }
        config_path.write_text(yaml.safe_dump(fields))

        seconds_by_step: dict[str, float] = {}
        started = time.perf_counter()
        serial_config = load_config(config_path, input=str(manifest), output=str(scratch / "serial"))
        serial = run(serial_config, serial=True, seconds_by_step=seconds_by_step)
        serial_s = time.perf_counter() - started

        config = load_config(config_path, input=str(manifest), output=str(scratch / "ray"))
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
        try:
            ray.data.range(1).materialize()  # start Ray Data's machinery outside the timings
            started = time.perf_counter()
            summary = run(config)
            ray_s = time.perf_counter() - started
            started = time.perf_counter()
            rerun = run(config)
            rerun_s = time.perf_counter() - started
        finally:
            ray.shutdown()

    if (serial["clips"], serial["rejects"]) != (summary["clips"], summary["rejects"]):
        sys.exit(f"error: the serial run curated {serial['clips']} clips, the Ray run {summary['clips']}")
    curated_s = sum(summary["hours_by_kind"].values()) * 3600
    print(f"inputs: {described}; {args.frame_num}-frame clips; Ray with {args.cpus} CPUs")
    print(f"clips: {summary['clips']} ({summary['clips_by_kind']}), rejects: {summary['rejects']}")
    print("serial run, seconds per stage (model loading included):")
    for name, seconds in seconds_by_step.items():
        print(f"  {name:10s} {seconds:7.2f} s  ({seconds / serial_s:5.1%})")
    print(f"serial in one process: {serial_s:.1f} s; Ray Data pipeline: {ray_s:.1f} s; rerun: {rerun_s:.1f} s")
    throughput = f"Ray {curated_s / ray_s:.3f}, serial {curated_s / serial_s:.3f}"
    print(f"ratio  curated video seconds / wall seconds: {throughput}")
    print(f"ratio  Ray pipeline / serial in one process wall time: {ray_s / serial_s:.3f}x (target <= 1.3x)")
    resumed = f"resume skips finished clips; clips: {rerun['clips']}"
    print(f"ratio  rerun / first run wall time ({resumed}): {rerun_s / ray_s:.3f}")


if __name__ == "__main__":
    main()
