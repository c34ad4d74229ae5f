"""The curation run's configuration: a YAML file validated into typed models; a bad value fails naming its field."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from multitalk_model.config import check_clip_frames
from multitalk_model.regions import FaceDetectorKind
from pipelines.schema import InputKind
from platform_common.config import (
    ConfigError,
    ConfigSection,
    absolute_location,
    existing_local_path,
    read_config,
    require,
)

# whisperx 3.8.6 with what it resolves against on a CUDA worker: its pins (torch~=2.8, huggingface-hub<1) clash with
# this project's torch and transformers 5, so it lives in its own pip env on top of the worker's packages.
WHISPERX_REQUIREMENTS = (
    "whisperx==3.8.6",
    "torch==2.8.0",
    "torchaudio==2.8.0",
    "torchvision==0.23.0",
    "torchcodec==0.7.0",
    "pyannote-audio==4.0.7",
    "transformers==4.57.6",
    "huggingface-hub==0.36.2",
)


# Ray's own resources, which the sections' num_cpus / num_gpus set: not custom resources.
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    for name in resources:
        if name in _BUILTIN_RESOURCES:
            raise ValueError(f"{name} is not a custom resource (num_cpus / num_gpus set it)")
    return resources


# Custom Ray resources per model actor: a resource that only one node type declares (the GPU pods' `gpu_node`) pins
# the actor pool to nodes of that type (pipelines/README.md, "Placement"). The CPU tasks ask for none: any node.
ActorResources = Annotated[dict[str, Annotated[float, Field(gt=0)]], AfterValidator(_custom_resources)]


def _actor_resources_field() -> Any:
    return Field(
        default_factory=dict,
        description="custom Ray resources per actor; one that only a node type has pins the actors there (gpu_node: 1)",
    )


class ClipsConfig(ConfigSection):
    frame_num: int = Field(default=81, description="frames per clip at 25 fps (4n + 1)")
    stride: int | None = Field(default=None, ge=1, description="frames between window starts (default: frame_num)")
    resolution: Literal["480p", "720p"] = Field(default="480p", description="bucket family of the clip's size")
    crf: int = Field(default=23, ge=0, le=51, description="H.264 quality of the clip's mp4")
    shot_threshold: float = Field(
        default=0.25, gt=0, le=1, description="colour-histogram distance (0..1) between frames that counts as a cut"
    )

    _frames_are_4n_plus_1 = field_validator("frame_num")(check_clip_frames)


class FacesConfig(ConfigSection):
    detector: FaceDetectorKind = Field(
        default="auto", description="face detector; auto = insightface when a pack is given, else MTCNN"
    )
    insightface_pack: str | None = Field(default=None, description="local insightface model pack directory")
    detect_every: int = Field(default=8, ge=1, description="frames between two face detections")
    detect_max_side: int = Field(default=320, ge=64, description="longest side of the frames faces are detected on")
    min_face_size: int = Field(default=40, ge=12, description="smallest face (pixels at detect_max_side) detected")
    track_iou: float = Field(default=0.3, gt=0, lt=1, description="IoU that links a detection to a track")
    min_track_coverage: float = Field(
        default=0.8, gt=0, le=1, description="fraction of detections a track needs to count as a person"
    )
    min_face_fraction: float = Field(default=0.1, ge=0, lt=1, description="smallest face height / clip height")
    min_stability: float = Field(default=0.5, ge=0, le=1, description="smallest mean IoU of a track between detections")
    num_actors: int = Field(default=1, ge=1, description="face detector actors")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per face detector actor")
    resources: ActorResources = _actor_resources_field()


class AudioConfig(ConfigSection):
    silence_dbfs: float = Field(default=-60.0, description="a source whose audio RMS is below this is silent")
    vad_threshold: float = Field(default=0.5, gt=0, lt=1, description="Silero VAD speech probability threshold")
    min_speech_s: float = Field(default=0.5, ge=0, description="voice activity a clip needs (single and dual)")


class SpeakersConfig(ConfigSection):
    window_frames: int = Field(
        default=15, ge=3, description="speech around a voiced frame scored against each face's lips, frames"
    )
    min_speaking_s: float = Field(default=0.4, ge=0, description="speech a person needs to count as bound")
    min_binding_confidence: float = Field(default=0.2, ge=0, le=1, description="lowest binding confidence kept")


class SyncConfig(ConfigSection):
    max_offset_frames: int = Field(default=3, ge=0, description="largest offset the landmark score searches, frames")
    # Calibrated on the shared talking videos' 81-frame clips (benchmarks/quality.py): keeps about 3 in 4 clips with
    # their own audio and 1 in 12 with another video's; Youden's J is within 0.01 of its best (0.225), which keeps
    # twice as many swapped clips.
    min_confidence: float = Field(
        default=0.3, ge=-1, le=1, description="lowest landmark sync score kept (single and dual; evaluation.lipsync)"
    )
    syncnet_path: str | None = Field(
        default=None, description="SyncNet weights (syncnet_python's syncnet_v2.model): Sync-C/D, not the landmarks"
    )
    syncnet_vshift: int = Field(default=15, ge=1, description="largest offset SyncNet searches, frames (vshift)")
    min_syncnet_confidence: float = Field(default=3.0, ge=0, description="lowest Sync-C kept (single and dual)")
    syncnet_batch_size: int = Field(default=20, ge=1, description="lip and audio windows per SyncNet forward")
    num_actors: int = Field(default=1, ge=1, description="SyncNet actors")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per SyncNet actor")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per SyncNet actor (0: run on CPU)")
    resources: ActorResources = _actor_resources_field()


class AsrConfig(ConfigSection):
    model_path: str | None = Field(
        default=None, description="faster-whisper (CTranslate2) model directory; word timings are added when set"
    )
    language: str | None = Field(default=None, description="spoken language code (default: detected per clip)")
    compute_type: str = Field(default="int8", description="CTranslate2 compute type (int8, float16, float32, ...)")
    num_actors: int = Field(default=1, ge=1, description="ASR actors")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per ASR actor")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per ASR actor (0: run on CPU)")
    resources: ActorResources = _actor_resources_field()
    whisperx: bool = Field(
        default=False, description="whisperx (ASR + alignment + diarization) in its own runtime env, not faster-whisper"
    )
    whisperx_python: str | None = Field(
        default=None, description="python of a venv holding whisperx (default: a pip env of whisperx_requirements)"
    )
    whisperx_requirements: list[str] = Field(
        default_factory=lambda: list(WHISPERX_REQUIREMENTS), description="pinned packages of whisperx's pip env"
    )
    whisperx_align_model_path: str | None = Field(
        default=None, description="wav2vec2 CTC alignment model directory (Hugging Face format) for `language`"
    )
    whisperx_diarization_path: str | None = Field(
        default=None, description="pyannote speaker-diarization pipeline directory (config.yaml and its models)"
    )
    whisperx_batch_size: int = Field(default=16, ge=1, description="speech chunks per whisperx ASR batch")
    whisperx_setup_timeout_s: int = Field(
        default=1800, ge=1, description="time allowed to build whisperx's runtime env (it installs torch)"
    )


class CaptionsConfig(ConfigSection):
    model_path: str | None = Field(
        default=None, description="vision-language model directory (transformers image-text-to-text: BLIP, LLaVA, ...)"
    )
    prompt: str = Field(
        default="Describe the people in this video frame, what they are doing and where, in one sentence.",
        description="instruction given to chat models (BLIP-style captioners caption without one)",
    )
    max_new_tokens: int = Field(default=60, ge=1, description="longest caption, tokens")
    replace_manifest: bool = Field(default=False, description="caption clips that have a manifest caption too")
    num_actors: int = Field(default=1, ge=1, description="captioner actors")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per captioner actor")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per captioner actor (0: run on CPU)")
    resources: ActorResources = _actor_resources_field()


class Wav2VecConfig(ConfigSection):
    model_path: str | None = Field(default=None, description="wav2vec2 checkpoint directory (chinese-wav2vec2-base)")
    batch_size: int = Field(default=8, ge=1, description="clips per wav2vec2 batch")
    num_actors: int = Field(default=1, ge=1, description="wav2vec2 actors")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per wav2vec2 actor")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per wav2vec2 actor (0: run on CPU)")
    resources: ActorResources = _actor_resources_field()


class ShardsConfig(ConfigSection):
    size: int = Field(default=64, ge=1, description="most clips per shard")


class SplitConfig(ConfigSection):
    test_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="share of source videos held out as the test split (by content hash)"
    )
    test_sources: list[str] = Field(
        default_factory=list, description="source videos (file names or full paths/URIs) held out as the test split"
    )


class CurationConfig(ConfigSection):
    input: str | None = Field(default=None, description="folder/URI of videos, or a manifest (.jsonl/.csv/.parquet)")
    output: str | None = Field(default=None, description="folder/URI the shards, manifest and report are written to")
    default_kind: InputKind = Field(
        default="auto", description="kind of videos listed from a folder (auto: single or dual from the face tracks)"
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster address or auto (default: RAY_ADDRESS, else a local Ray)"
    )
    local_num_cpus: int = Field(default=2, ge=1, description="CPUs of the embedded local Ray")
    clips: ClipsConfig = Field(default_factory=ClipsConfig, description="windows and encoding")
    faces: FacesConfig = Field(default_factory=FacesConfig, description="detection and tracking")
    audio: AudioConfig = Field(default_factory=AudioConfig, description="loudness and voice activity")
    speakers: SpeakersConfig = Field(default_factory=SpeakersConfig, description="speech-to-face binding")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="audio-visual sync")
    asr: AsrConfig = Field(default_factory=AsrConfig, description="word timings (optional)")
    wav2vec: Wav2VecConfig = Field(default_factory=Wav2VecConfig, description="audio features")
    captions: CaptionsConfig = Field(default_factory=CaptionsConfig, description="captioner (optional)")
    shards: ShardsConfig = Field(default_factory=ShardsConfig, description="webdataset shards")
    split: SplitConfig = Field(
        default_factory=SplitConfig, description="held-out test split by source video (own shards in output/test)"
    )


def load_config(
    path: str | os.PathLike, sets: Mapping[str, Any] | None = None, **overrides: str | None
) -> CurationConfig:
    """Read and validate a YAML config; `sets` (dotted field -> value, from --set) and the non-None `overrides`
    (input, output) replace fields of the file."""
    given = {name: value for name, value in overrides.items() if value is not None}
    config = read_config(path, CurationConfig, {**(sets or {}), **given})
    require(path, {"input": config.input, "output": config.output, "wav2vec.model_path": config.wav2vec.model_path})
    config.input, config.output = absolute_location(config.input), absolute_location(config.output)
    if config.faces.insightface_pack:
        config.faces.insightface_pack = absolute_location(config.faces.insightface_pack)
    directories = ("wav2vec.model_path", "asr.model_path", "asr.whisperx_align_model_path",
                   "asr.whisperx_diarization_path", "captions.model_path")  # fmt: skip
    for field in directories:
        _check_local(config, path, field, "directory")
    _check_local(config, path, "sync.syncnet_path", "file")
    python = config.asr.whisperx_python
    if python and not os.path.isabs(python):
        # Taken as it is on the workers: resolving it here would follow the venv's symlink out of the venv.
        raise ConfigError(f"{path}: asr.whisperx_python: {python} must be an absolute path")
    if config.asr.whisperx:
        needed = {"asr.model_path": config.asr.model_path, "asr.language": config.asr.language}
        needed["asr.whisperx_align_model_path"] = config.asr.whisperx_align_model_path
        needed["asr.whisperx_diarization_path"] = config.asr.whisperx_diarization_path
        for field, value in needed.items():
            if not value:
                raise ConfigError(f"{path}: {field}: required with asr.whisperx (models are never downloaded)")
    return config


def _check_local(config: CurationConfig, path: Path, field: str, kind: Literal["directory", "file"]) -> None:
    """Make a local path field absolute (when set) and check that it is an existing `kind`."""
    section_name, name = field.split(".")
    section = getattr(config, section_name)
    if getattr(section, name):
        setattr(section, name, existing_local_path(path, field, getattr(section, name), kind))
