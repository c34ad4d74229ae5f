"""Command line: one video from a job file, no Ray.

    python -m multitalk_model.generate --input job.json --model-dir DIR --out video.mp4 [overrides]

The job file is either our schema (multitalk_model.jobs.GenerationJob) or the official MultiTalk input JSON as it
is. Overrides replace fields of the job and are validated with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .generation import GenerationError, MultiTalkPipeline, Progress
from .jobs import GenerationJob, JobError, load_job

# Command-line flag -> job field, for the fields worth overriding from a shell.
OVERRIDES = {
    "steps": int,
    "seed": int,
    "mode": str,
    "size": str,
    "frame_num": int,
    "motion_frames": int,
    "shift": float,
    "text_guidance": float,
    "audio_guidance": float,
    "audio_type": str,
    "prompt": str,
    "step_cache_threshold": float,
    "max_duration_s": float,
    "color_correction": float,
    "regions": str,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m multitalk_model.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", type=Path, required=True, help="job JSON (our schema or the official one)")
    parser.add_argument("--model-dir", type=Path, required=True, help="model directory (see components.py)")
    parser.add_argument("--out", type=Path, required=True, help="output mp4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="transformer dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="merge a LoRA (e.g. a few-step distillation LoRA) into the transformer; repeatable",
    )
    parser.add_argument("--attention-backend", default=None, help="diffusers attention backend, e.g. flash, native")
    parser.add_argument("--low-memory", action="store_true", help="keep only the running component on the device")
    parser.add_argument("--preview", type=Path, default=None, help="write the person regions over the image here")
    parser.add_argument("--resolution", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None)
    parser.add_argument("--apg", action="store_true", help="adaptive projected guidance")
    for name, kind in OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    return parser.parse_args(argv)


def job_with_overrides(args: argparse.Namespace) -> GenerationJob:
    job = load_job(args.input)
    updates = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    if args.resolution:
        updates["resolution"] = tuple(args.resolution)
    if args.apg:
        updates["use_apg"] = True
    return GenerationJob.model_validate({**job.model_dump(), **updates})


def parse_lora(spec: str) -> tuple[Path, float]:
    path, _, scale = spec.rpartition(":") if ":" in spec else (spec, "", "1.0")
    return Path(path), float(scale)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = job_with_overrides(args)
    except (JobError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    pipeline = MultiTalkPipeline.from_model_dir(
        args.model_dir,
        device=args.device,
        dtype=getattr(torch, dtype_name),
        loras=[parse_lora(spec) for spec in args.lora],
        low_memory=args.low_memory,
        attention_backend=args.attention_backend,
    )
    bar = tqdm(total=None, unit="step")

    def show(progress: Progress) -> None:
        bar.total = progress.clips * progress.steps
        bar.set_description(f"clip {progress.clip}/{progress.clips}")
        bar.update(1)

    try:
        result = pipeline.generate(job, args.out, progress=show, preview_path=args.preview)
    except GenerationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    print(
        f"{result.path}: {result.num_frames} frames ({result.duration_s:.2f} s) in {result.clips} clip(s), "
        f"regions from {result.region_source}, {result.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
