"""The format of one curated sample, defined once: its members in a webdataset shard and its `json` metadata, and
the name of the manifest that lists a corpus folder's clips. Curation (pipelines) writes it; training and evaluation
read it, so it lives below all three."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["single", "multi_event", "dual"]
KINDS: tuple[str, ...] = get_args(Kind)

# Members of one sample in a shard (the webdataset "extension" after the clip id).
MP4_KEY = "mp4"
JSON_KEY = "json"
WAV2VEC_KEY = "wav2vec.npy"

MANIFEST_FILE = "manifest.parquet"

_CAPTION_SOURCE_PATTERN = r"^(manifest|none|model:.+)$"


def person_audio_key(person: int) -> str:
    """The member holding person `person`'s gated 16 kHz mono audio."""
    return f"person{person}.flac"


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
