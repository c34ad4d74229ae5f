"""The curated sample format, defined once: webdataset member keys, the per-clip json metadata, shard names, and
the columns of manifest.parquet and rejects.parquet. Training reads the corpus through these definitions."""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from multitalk_model.audio import SAMPLE_RATE, VIDEO_FPS

Kind = Literal["single", "multi_event", "dual"]
KINDS: tuple[str, ...] = ("single", "multi_event", "dual")
# An input's kind may also be left to the faces stage: one face track makes it single, two make it dual.
InputKind = Literal["auto", "single", "multi_event", "dual"]
INPUT_KINDS: tuple[str, ...] = ("auto", *KINDS)
# Every clip is resampled to the model's frame rate; per-person audio is at wav2vec's input rate.
SAMPLE_FPS = VIDEO_FPS
AUDIO_RATE = SAMPLE_RATE

# Members of one sample in a shard (the webdataset "extension" after the clip id).
MP4_KEY = "mp4"
JSON_KEY = "json"
WAV2VEC_KEY = "wav2vec.npy"

MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.parquet"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"

_CAPTION_SOURCE_PATTERN = r"^(manifest|none|model:.+)$"

_SHARD_NAME = re.compile(r"^(?P<kind>single|multi_event|dual)-(?P<index>\d{6})\.tar$")


def person_audio_key(person: int) -> str:
    """The member holding person `person`'s gated 16 kHz mono audio."""
    return f"person{person}.flac"


def shard_name(kind: str, index: int) -> str:
    """`{kind}-{index:06d}.tar`, the committed name of a shard."""
    return f"{kind}-{index:06d}.tar"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """(kind, index) of a committed shard's file name, or None for any other file."""
    match = _SHARD_NAME.match(name)
    return (match["kind"], int(match["index"])) if match else None


def clip_id(source_hash: str, start_frame: int, num_frames: int) -> str:
    """A clip's id from its content: the source file's hash and its window at 25 fps (stable across reruns)."""
    window = f"{source_hash}:{start_frame}:{num_frames}@{SAMPLE_FPS}"
    return hashlib.sha256(window.encode()).hexdigest()[:24]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PersonMetadata(_Strict):
    """One person of a clip, in the order of the audio streams (left to right)."""

    bbox_xyxy: list[float] = Field(description="face box on the first frame, clip pixels")
    track: list[list[float]] = Field(description="face box on every frame, clip pixels")
    speaking_s: float = Field(description="seconds of speech bound to this person")
    binding_confidence: float | None = Field(description="how clearly the speech was bound to this face (0..1)")
    sync_confidence: float | None = Field(default=None, description="audio-visual sync score (SyncNet: Sync-C)")
    sync_offset: int | None = Field(default=None, description="audio lag of the best sync, in frames")
    sync_distance: float | None = Field(default=None, description="SyncNet's Sync-D (None with the landmark score)")


class Word(_Strict):
    """One recognised word (when the run has an ASR model)."""

    word: str
    start_s: float = Field(description="start in the clip")
    end_s: float = Field(description="end in the clip")
    probability: float
    person: int | None = Field(description="the person speaking it (bound speech or diarized speaker), if any")


class SpeakerTurn(_Strict):
    """One diarized stretch of speech (when the run has whisperx), bound to a person where the faces agree."""

    speaker: str = Field(description="the diarization's speaker label")
    person: int | None = Field(description="the person whose bound speech this speaker overlaps most (None: no face)")
    start_s: float = Field(description="start in the clip")
    end_s: float = Field(description="end in the clip")


class Scores(_Strict):
    """Clip-level scores; every one is a manifest column (None where it does not apply to the kind)."""

    face_size: float | None = Field(default=None, description="smallest person's median face height / clip height")
    face_stability: float | None = Field(default=None, description="lowest mean IoU of a track between detections")
    motion: float | None = Field(default=None, description="mean mouth-region motion of the persons (grey levels)")
    loudness_lufs: float | None = Field(default=None, description="integrated loudness of the clip's audio")
    speech_s: float | None = Field(default=None, description="seconds of voice activity in the clip")
    binding_confidence: float | None = Field(default=None, description="lowest binding confidence of the persons")
    sync_confidence: float | None = Field(default=None, description="lowest sync score of the persons")
    sync_offset: float | None = Field(default=None, description="mean sync offset of the persons, in frames")
    sync_distance: float | None = Field(default=None, description="highest Sync-D of the persons (SyncNet only)")
    binding_accuracy: float | None = Field(
        default=None, description="share of dual persons whose own stream binds to them (landmark sync only)"
    )


class ClipMetadata(_Strict):
    """The `json` member of a sample."""

    kind: Kind
    kind_reason: str | None = Field(default=None, description="why an `auto` input got its kind (None: it was given)")
    source: str
    source_hash: str
    start_s: float = Field(description="start of the clip in the source")
    end_s: float = Field(description="end of the clip in the source")
    num_frames: int
    fps: int
    width: int
    height: int
    caption: str | None
    caption_source: str = Field(pattern=_CAPTION_SOURCE_PATTERN, description="manifest, none or model:<model name>")
    persons: list[PersonMetadata]
    scores: Scores
    sync_source: Literal["syncnet", "landmarks"] | None = Field(
        default=None, description="what scored the sync (None: not scored, as for multi_event clips)"
    )
    words: list[Word] = Field(default_factory=list, description="ASR word timings (empty without an ASR model)")
    turns: list[SpeakerTurn] = Field(default_factory=list, description="diarized speech (empty without whisperx)")


_MANIFEST_BASE = [
    ("clip_id", pa.string()),
    ("shard", pa.string()),
    ("kind", pa.string()),
    ("kind_reason", pa.string()),
    ("source", pa.string()),
    ("source_hash", pa.string()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("num_frames", pa.int32()),
    ("fps", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("n_person", pa.int32()),
    ("caption", pa.string()),
    ("caption_source", pa.string()),
    ("sync_source", pa.string()),
]
MANIFEST_SCHEMA = pa.schema(_MANIFEST_BASE + [(name, pa.float64()) for name in Scores.model_fields])

REJECTS_SCHEMA = pa.schema(
    [
        ("input", pa.string()),
        ("clip_id", pa.string()),  # null when the whole input was rejected
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("kind", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


class RejectReason(StrEnum):
    """Why an input or a clip was dropped (the `reason` column of rejects.parquet)."""

    UNREADABLE = "unreadable"
    NO_AUDIO_TRACK = "no audio track"
    SILENT_AUDIO = "silent audio track"
    TOO_SHORT = "too short"
    FACE_COUNT = "face count"
    SMALL_FACE = "small face"
    UNSTABLE_FACE = "unstable face"
    NO_SPEECH = "no speech"
    SPEAKER_NOT_BOUND = "speaker not bound"
    LOW_SYNC = "low sync"
    NO_CAPTION = "no caption"
    ERROR = "error"


def manifest_row(metadata: ClipMetadata, clip: str, shard: str) -> dict:
    """One manifest.parquet row: the clip's metadata flattened, its scores as columns."""
    return {
        "clip_id": clip,
        "shard": shard,
        "kind": metadata.kind,
        "kind_reason": metadata.kind_reason,
        "source": metadata.source,
        "source_hash": metadata.source_hash,
        "start_s": metadata.start_s,
        "end_s": metadata.end_s,
        "num_frames": metadata.num_frames,
        "fps": metadata.fps,
        "width": metadata.width,
        "height": metadata.height,
        "n_person": len(metadata.persons),
        "caption": metadata.caption,
        "caption_source": metadata.caption_source,
        "sync_source": metadata.sync_source,
        **metadata.scores.model_dump(),
    }
