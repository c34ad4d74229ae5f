"""Curation's outputs, defined once: shard names, clip ids, and the columns of manifest.parquet and rejects.parquet.
The format of one sample (its members and `json` metadata) lives in platform_common.samples, which evaluation reads
too; it is re-exported here for curation's modules."""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Literal

import pyarrow as pa

from multitalk_model.audio import SAMPLE_RATE, VIDEO_FPS
from platform_common.samples import (  # noqa: F401 (the sample format, re-exported for curation's modules)
    JSON_KEY,
    KINDS,
    MANIFEST_FILE,
    MP4_KEY,
    WAV2VEC_KEY,
    ClipMetadata,
    Kind,
    PersonMetadata,
    Scores,
    SpeakerTurn,
    Word,
    person_audio_key,
)

# An input's kind may also be left to the faces stage: one face track makes it single, two make it dual.
InputKind = Literal["auto", "single", "multi_event", "dual"]
INPUT_KINDS: tuple[str, ...] = ("auto", *KINDS)
# Every clip is resampled to the model's frame rate; per-person audio is at wav2vec's input rate.
SAMPLE_FPS = VIDEO_FPS
AUDIO_RATE = SAMPLE_RATE

REJECTS_FILE = "rejects.parquet"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"

_SHARD_NAME = re.compile(rf"^(?P<kind>{'|'.join(KINDS)})-(?P<index>\d{{6}})\.tar$")


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
