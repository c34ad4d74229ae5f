"""Curation throughput on the generated demo corpus, on an embedded local Ray: seconds of video curated per wall
second, and the cost of a rerun over a finished output (every clip is skipped) relative to the first run.

    python benchmarks/curation.py [--duration 7] [--frame-num 81] [--cpus 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import ray
import yaml

from pipelines.config import load_config
from pipelines.curate import run
from pipelines.sample_data import write_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=7.0, help="seconds per generated video")
    parser.add_argument("--frame-num", type=int, default=81, help="frames per clip (4n + 1)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        manifest = write_corpus(scratch / "corpus", args.duration)
        config_path = scratch / "config.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "input": str(manifest),
                    "output": str(scratch / "out"),
                    "clips": {"frame_num": args.frame_num},
                    "faces": {"num_cpus": 0.5},
                    "wav2vec": {"model_path": str(scratch / "corpus" / "wav2vec2-tiny"), "num_cpus": 0.5},
                }
            )
        )
        config = load_config(config_path)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
        try:
            ray.data.range(1).materialize()  # start Ray Data's machinery outside the timings
            started = time.perf_counter()
            summary = run(config)
            first_s = time.perf_counter() - started
            started = time.perf_counter()
            rerun = run(config)
            rerun_s = time.perf_counter() - started
        finally:
            ray.shutdown()

    curated_s = sum(summary["hours_by_kind"].values()) * 3600
    print(f"inputs: generated corpus, {args.duration:.1f} s per video; {args.frame_num}-frame clips; {args.cpus} CPUs")
    print(f"clips: {summary['clips']} ({summary['clips_by_kind']}), rejects: {summary['rejects']}")
    print(f"first run: {first_s:.1f} s; rerun over the finished output: {rerun_s:.1f} s (clips: {rerun['clips']})")
    print(f"ratio  curated video seconds / wall seconds (first run): {curated_s / first_s:.3f}")
    print(f"ratio  rerun / first run wall time (resume skips finished clips): {rerun_s / first_s:.3f}")


if __name__ == "__main__":
    main()
