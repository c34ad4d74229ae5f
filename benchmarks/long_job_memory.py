"""Memory over a long streaming job: the generating process's RSS clip after clip, with the tiny model.

Users of other implementations run out of memory after ~60 clips of a long job: every clip's frames stay in memory
until the video is written at the end. `MultiTalkPipeline.generate` encodes each clip as soon as it is decoded and
keeps only the motion frames the next clip needs, so its memory must stay flat however long the job. This script
runs one long streaming job (the tiny random model, 1 step, text guidance 1: two passes a step, 5-frame clips of
which 4 are new, 96x160) twice in one process:

  * `generate`: streaming into the mp4, as serving does;
  * `sample`: the whole video kept in memory (the accumulating baseline, the other implementations' behaviour);

and prints the RSS (psutil) at the first step of clips 10, 50, 100 and the last, and the growth per 100 clips fitted
from clip 10 on (least squares), for both. Each clip adds 4 x 96 x 160 x 3 bytes = 180 KiB of frames to the
baseline; flat means a slope within a few MiB per 100 clips (allocator noise).

    python benchmarks/long_job_memory.py [--clips 110] [--resolution 96 160]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

# Run as a script, this file's folder leads sys.path; the project's packages are imported from the repository root.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402 - after the sys.path fix above
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from multitalk_model.fixtures.speech import synthesize_speech, write_wav  # noqa: E402
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir  # noqa: E402
from multitalk_model.generation import MultiTalkPipeline, Progress  # noqa: E402
from multitalk_model.jobs import GenerationJob  # noqa: E402

FRAME_NUM, MOTION_FRAMES = 5, 1
MiB = 2**20


def _rss_per_clip(run, clips: int) -> dict[int, float]:
    """RSS in MiB at the first step of every clip while `run(progress)` generates."""
    rss: dict[int, float] = {}
    process = psutil.Process()

    def progress(event: Progress) -> None:
        if event.step == 1:
            gc.collect()
            rss[event.clip] = process.memory_info().rss / MiB

    run(progress)
    assert len(rss) == clips, f"{len(rss)} clips ran, expected {clips}"
    return rss


def _slope_per_100_clips(rss: dict[int, float], first: int = 10) -> float:
    clips = np.array([clip for clip in rss if clip >= first], dtype=float)
    values = np.array([rss[int(clip)] for clip in clips])
    return float(np.polyfit(clips, values, 1)[0] * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=110, help="clips of the job (at least 100)")
    parser.add_argument("--resolution", type=int, nargs=2, default=(96, 160), metavar=("HEIGHT", "WIDTH"))
    args = parser.parse_args()
    if args.clips < 100:
        parser.error("--clips: the measurement needs at least 100 clips")

    stride = FRAME_NUM - MOTION_FRAMES
    num_frames = stride * (args.clips - 1) + FRAME_NUM  # exactly args.clips clips
    with tempfile.TemporaryDirectory(prefix="long-job-memory-") as scratch:
        scratch = Path(scratch)
        image, audio = scratch / "face.png", scratch / "speech.wav"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(image)
        write_wav(audio, synthesize_speech(num_frames / 25 + 0.5), 16000)
        job = GenerationJob.model_validate(
            {
                "image": str(image),
                "persons": [{"audio": str(audio)}],
                "mode": "streaming",
                "steps": 1,
                "frame_num": FRAME_NUM,
                "motion_frames": MOTION_FRAMES,
                "resolution": tuple(args.resolution),
                "max_duration_s": num_frames / 25,
                "color_correction": 0.0,
                "text_guidance": 1.0,  # two passes a step, not three: the measurement is about memory
            }
        )
        pipeline = MultiTalkPipeline.from_model_dir(build_tiny_model_dir(scratch / "model"))
        prepared = pipeline.prepare(job)
        runs = {
            "generate (streams)": lambda progress: pipeline.generate(job, scratch / "video.mp4", progress=progress),
            "sample (keeps all)": lambda progress: pipeline.sample(prepared, progress=progress),
        }
        print(f"{args.clips} clips of {FRAME_NUM} frames ({stride} new), {args.resolution[0]}x{args.resolution[1]},")
        print("tiny model, 1 step; RSS of this process in MiB at the first step of each clip", flush=True)
        print(
            f"{'run':<20} {'clip 10':>8} {'clip 50':>8} {'clip 100':>8} {f'clip {args.clips}':>9} {'MiB/100 clips':>14}"
        )
        for name, run in runs.items():
            rss = _rss_per_clip(run, args.clips)
            figures = " ".join(f"{rss[clip]:>8.1f}" for clip in (10, 50, 100))
            print(f"{name:<20} {figures} {rss[args.clips]:>9.1f} {_slope_per_100_clips(rss):>14.2f}", flush=True)
        frames_mib = stride * args.clips * args.resolution[0] * args.resolution[1] * 3 / MiB
        print(f"frames of the whole video: {frames_mib:.1f} MiB ({frames_mib / args.clips * 100:.1f} per 100 clips)")


if __name__ == "__main__":
    main()
