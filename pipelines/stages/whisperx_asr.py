"""Stage 5b with `asr.whisperx: true`: whisperx speech recognition, forced word alignment and pyannote speaker
diarization, in a Ray runtime env of their own.

whisperx 3.8.6 pins torch~=2.8 and huggingface-hub<1, which clash with this project's torch and transformers 5, so
the main environment never imports it: only this stage's actors do, inside a pip env of pinned requirements built
on top of the worker's packages, or a prepared venv's python (`asr.whisperx_python`). The env is checked before the
dataset runs, so a broken one fails the run at its start with the reason. Every model comes from a configured
local path and the env runs with the hubs offline: nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import numpy as np
import ray

from pipelines.config import AsrConfig, CurationConfig
from pipelines.record import Clip
from pipelines.schema import SAMPLE_FPS
from pipelines.stages.base import Stage

# What a working env must import: whisperx's top level imports lazily, these pull torch, torchaudio and pyannote.
WHISPERX_MODULES = ("whisperx.asr", "whisperx.alignment", "whisperx.diarize")
_PREPARED_ENV_START_S = 120  # a prepared venv's python starts in seconds; longer means it does not start


class WhisperXEnvError(RuntimeError):
    """whisperx's runtime env cannot be created, or cannot import whisperx."""


def whisperx_runtime_env(config: AsrConfig) -> dict:
    """The Ray runtime_env of the stage's actors, from the asr config."""
    runtime_env: dict = {
        "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        "config": {"setup_timeout_seconds": config.whisperx_setup_timeout_s},
    }
    if config.whisperx_python:
        runtime_env["py_executable"] = config.whisperx_python
    else:
        # pip_check off: the env deliberately shadows packages of the worker's environment (torch, transformers).
        runtime_env["pip"] = {"packages": list(config.whisperx_requirements), "pip_check": False}
    return runtime_env


@ray.remote(num_cpus=0)
def _whisperx_version() -> str:
    for module in WHISPERX_MODULES:
        importlib.import_module(module)
    return importlib.metadata.version("whisperx")


def check_whisperx_env(runtime_env: dict, resources: dict[str, float] | None = None) -> str:
    """whisperx's version inside `runtime_env`, on a node with the ASR actors' `resources` (where their env is built);
    raises WhisperXEnvError with the cause when the env cannot be created or cannot import whisperx."""
    prepared = "py_executable" in runtime_env
    where = f"python {runtime_env['py_executable']}" if prepared else f"pip {runtime_env['pip']}"
    # Ray retries a worker whose python does not start (a wrong path) for ever: bound the wait.
    timeout_s = _PREPARED_ENV_START_S if prepared else runtime_env["config"]["setup_timeout_seconds"]
    task = _whisperx_version.options(runtime_env=runtime_env, resources=resources or {}).remote()
    try:
        return ray.get(task, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as error:
        ray.cancel(task, force=True)
        raise WhisperXEnvError(
            f"asr.whisperx: no worker started in its runtime env ({where}) within {timeout_s} s; "
            "does that python exist on the workers?"
            if prepared
            else f"asr.whisperx: its runtime env ({where}) was not ready within {timeout_s} s"
        ) from error
    except ray.exceptions.RuntimeEnvSetupError as error:
        raise WhisperXEnvError(f"asr.whisperx: cannot create its runtime env ({where}): {error}") from error
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if error.cause is not None else error
        raise WhisperXEnvError(
            f"asr.whisperx: its runtime env ({where}) cannot import whisperx: {type(cause).__name__}: {cause}"
        ) from error


def bind_speakers(diarization: list[dict], person_masks: np.ndarray | None) -> dict[str, int | None]:
    """Diarization label -> the person whose bound speech (`person_masks` [P, T] at 25 fps) it overlaps most, or
    None where it overlaps none (a voice without a face)."""
    if person_masks is None:
        return {turn["speaker"]: None for turn in diarization}
    frame_times = np.arange(person_masks.shape[1]) / SAMPLE_FPS
    covered: dict[str, np.ndarray] = {}
    for turn in diarization:
        inside = (frame_times >= turn["start"]) & (frame_times < turn["end"])
        covered[turn["speaker"]] = covered.get(turn["speaker"], np.zeros_like(inside)) | inside
    persons: dict[str, int | None] = {}
    for speaker, frames in covered.items():
        overlap = (person_masks & frames[None]).sum(axis=1)
        persons[speaker] = int(np.argmax(overlap)) if overlap.max() > 0 else None
    return persons


def parse_whisperx(
    result: dict, diarization: list[dict], person_masks: np.ndarray | None, num_frames: int
) -> tuple[list[dict], list[dict]]:
    """(words, turns) of a clip from whisperx's aligned result with speakers assigned (`assign_word_speakers`) and
    its diarization turns ({speaker, start, end}): schema.Word and schema.SpeakerTurn fields, in clip seconds."""
    duration_s = num_frames / SAMPLE_FPS
    persons = bind_speakers(diarization, person_masks)
    turns = []
    for turn in sorted(diarization, key=lambda turn: turn["start"]):
        start_s, end_s = max(0.0, float(turn["start"])), min(duration_s, float(turn["end"]))
        if end_s > start_s:
            turns.append(
                {
                    "speaker": turn["speaker"],
                    "person": persons[turn["speaker"]],
                    "start_s": round(start_s, 3),
                    "end_s": round(end_s, 3),
                }
            )
    words = []
    for segment in result["segments"]:
        for word in segment.get("words", []):
            # The aligner leaves words without alignable characters (numerals, symbols) untimed and unscored.
            if not {"start", "end", "score"} <= word.keys():
                continue
            words.append(
                {
                    "word": word["word"],
                    "start_s": round(float(word["start"]), 3),
                    "end_s": round(float(word["end"]), 3),
                    "probability": round(float(word["score"]), 4),
                    "person": persons.get(word["speaker"]) if "speaker" in word else None,
                }
            )
    return words, turns


class WhisperXStage(Stage):
    """Actor inside whisperx's runtime env: holds the ASR, alignment and diarization models. Fills `words` and
    `turns` of clips that have audio."""

    name = "whisperx"  # its CPUs, GPUs and actor count come from the asr config

    def __init__(self, config: CurationConfig) -> None:
        # Imported here, never at module level: this only runs inside the stage's runtime env.
        import whisperx
        from whisperx.diarize import DiarizationPipeline

        asr = config.asr
        self.whisperx = whisperx
        self.device = "cuda" if asr.num_gpus > 0 else "cpu"  # only the device Ray gave the actor
        self.language, self.batch_size = asr.language, asr.whisperx_batch_size
        # The voice activity model of vad_method="pyannote" ships inside the whisperx wheel.
        self.model = whisperx.load_model(
            asr.model_path, self.device, compute_type=asr.compute_type, language=asr.language,
            vad_method="pyannote", local_files_only=True,
        )  # fmt: skip
        self.align_model, self.align_metadata = whisperx.load_align_model(
            asr.language, self.device, model_name=asr.whisperx_align_model_path, model_cache_only=True
        )
        self.diarizer = DiarizationPipeline(model_name=asr.whisperx_diarization_path, device=self.device)

    def process(self, clip: Clip) -> None:
        if clip.audio is None:
            return
        transcript = self.model.transcribe(clip.audio, batch_size=self.batch_size, language=self.language)
        aligned = self.whisperx.align(
            transcript["segments"], self.align_model, self.align_metadata, clip.audio, self.device
        )
        diarization = self.diarizer(clip.audio)
        aligned = self.whisperx.assign_word_speakers(diarization, aligned)
        turns = diarization[["speaker", "start", "end"]].to_dict("records")
        clip.words, clip.turns = parse_whisperx(aligned, turns, clip.person_masks, clip.num_frames)
