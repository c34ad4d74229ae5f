"""Command line: one video from a job file, no Ray.

    python -m multitalk_model.generate --input job.json --model-dir DIR --out video.mp4 [overrides]

The job file is either our schema (multitalk_model.jobs.GenerationJob) or the official MultiTalk input JSON as it
is. Overrides replace fields of the job and are validated with it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from .generation import GenerationError, MultiTalkPipeline, Progress
from .jobs import GenerationJob, JobError, PersonInput, load_job
from .tts import SpeechError, TtsSettings, synthesize_speech_file

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
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="group-offload the transformer's blocks (diffusers), keep the other components on the CPU until they run",
    )
    parser.add_argument(
        "--text-encoder-on-cpu",
        action="store_true",
        help="encode the prompts with umT5 on the CPU: its weights never take device memory (the reference's --t5_cpu)",
    )
    parser.add_argument(
        "--quantization", choices=["none", "int8", "fp8"], default="none", help="torchao weights of the blocks"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="regional torch.compile of the transformer blocks (default: on for cuda)",
    )
    parser.add_argument("--preview", type=Path, default=None, help="write the person regions over the image here")
    parser.add_argument("--resolution", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None)
    parser.add_argument("--apg", action="store_true", help="adaptive projected guidance")
    parser.add_argument(
        "--speech",
        action="append",
        default=[],
        metavar="TEXT",
        help="the i-th --speech is person i's speech as text: it replaces that person's audio (or adds a person)",
    )
    parser.add_argument("--tts-model-dir", type=Path, default=None, help="Kokoro model that speaks --speech")
    parser.add_argument("--voice", default=None, help="voice of --speech (Kokoro: af_heart; espeak-ng: en)")
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


def with_spoken_text(job: GenerationJob, args: argparse.Namespace, work_dir: Path) -> GenerationJob:
    """The job with each --speech text spoken (Kokoro from --tts-model-dir, else espeak-ng) as its person's audio."""
    persons = list(job.persons)
    settings = TtsSettings(model_dir=args.tts_model_dir, voice=args.voice)
    for index, text in enumerate(args.speech):
        audio = str(synthesize_speech_file(text, work_dir / f"speech{index + 1}.wav", settings))
        if index < len(persons):
            persons[index] = persons[index].model_copy(update={"audio": audio})
        else:
            persons.append(PersonInput(audio=audio))
    return GenerationJob.model_validate({**job.model_dump(), "persons": [p.model_dump() for p in persons]})


def parse_lora(spec: str) -> tuple[Path, float]:
    path, _, scale = spec.rpartition(":") if ":" in spec else (spec, "", "1.0")
    return Path(path), float(scale)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="multitalk-speech-") as work:
        try:  # the job and its spoken text first: a bad input fails before any model loads
            job = job_with_overrides(args)
            job = with_spoken_text(job, args, Path(work)) if args.speech else job
        except (JobError, SpeechError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return _generate(job, args)


def load_pipeline(args: argparse.Namespace) -> MultiTalkPipeline:
    """The pipeline the command line asks for: model directory, device, dtype, LoRAs and memory options."""
    dtype_name = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    return MultiTalkPipeline.from_model_dir(
        args.model_dir,
        device=args.device,
        dtype=getattr(torch, dtype_name),
        loras=[parse_lora(spec) for spec in args.lora],
        low_memory=args.low_memory,
        attention_backend=args.attention_backend,
        quantization=args.quantization,
        compile_blocks=str(args.device).startswith("cuda") if args.compile is None else args.compile,
        text_encoder_on_cpu=args.text_encoder_on_cpu,
    )


def _generate(job: GenerationJob, args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args)
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
