"""Evaluation throughput: clips generated and scored per minute by the Ray evaluation job on an embedded local Ray
(the tiny model on CPU), and the share of the workers' time spent generating vs computing the metrics. A second run
over the finished output shows what a resumed run costs when nothing is missing.

Inputs: held-out talking clips the project generates (fixtures.corpus.write_held_out_clips), one model.

    python benchmarks/evaluation.py [--clips 6] [--steps 4] [--frame-num 17] [--size 64] [--cpus 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import ray

from evaluation.evaluate import EvaluationConfig, run
from multitalk_model.fixtures.corpus import write_held_out_clips
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=6, help="held-out clips")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per clip")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--frame-num", type=int, default=17, help="frames generated per clip (4n + 1)")
    parser.add_argument("--size", type=int, default=64, help="side of the square generated frames (multiple of 16)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="evaluation-benchmark-") as scratch:
        scratch = Path(scratch)
        test_set = write_held_out_clips(scratch / "held_out", args.clips, args.seconds)
        config = EvaluationConfig.model_validate(
            {
                "test_set": str(test_set),
                "output": str(scratch / "out"),
                "models": [{"name": "tiny", "model_dir": str(build_tiny_model_dir(scratch / "tiny-model"))}],
                "protocol": {
                    "steps": args.steps,
                    "frame_num": args.frame_num,
                    "resolution": [args.size, args.size],
                    "text_guidance": 1.0,
                },
                "generation": {"num_actors": 1, "num_cpus": 1},
                "metrics": {"num_cpus": 1},
            }
        )
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        try:
            started = time.perf_counter()
            summary = run(config)
            wall_s = time.perf_counter() - started
            started = time.perf_counter()
            rerun = run(config)
            rerun_s = time.perf_counter() - started
        finally:
            ray.shutdown()

    clips = summary["models"]["tiny"]["clips"]
    if clips != args.clips or any(rerun["generated"].values()):
        sys.exit(f"error: {clips} of {args.clips} clips scored; the rerun generated {rerun['generated']}")
    generation_s, metrics_s = summary["seconds"]["generation_s"], summary["seconds"]["metrics_s"]
    worker_s = generation_s + metrics_s
    print(f"{args.clips} clips of {args.seconds:.1f} s, tiny model, {args.steps} steps, {args.frame_num} frames of "
          f"{args.size}x{args.size}, local Ray of {args.cpus} CPUs")  # fmt: skip
    print(f"wall time: {wall_s:.1f} s (Ray start-up, model loading and report included)")
    print(f"clips evaluated per minute: {clips / wall_s * 60:.2f}")
    print(f"worker time: generation {generation_s:.1f} s ({generation_s / worker_s:.1%}), "
          f"metrics {metrics_s:.1f} s ({metrics_s / worker_s:.1%})")  # fmt: skip
    print(f"per clip: generation {generation_s / clips:.2f} s, metrics {metrics_s / clips:.2f} s")
    print(f"rerun with nothing missing: {rerun_s:.1f} s ({rerun_s / wall_s:.2f}x the first run)")


if __name__ == "__main__":
    main()
