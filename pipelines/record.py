"""The in-flight record of one input video, then of one clip window, as it moves through the stages.

Ray Data carries it as a Python object in a single `clip` column, so stages exchange typed fields (numpy arrays
of any shape included) instead of a columnar schema that would have to fit every stage and every reject.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.schema import SAMPLE_FPS, RejectReason


@dataclass
class Clip:
    """One input (before the shots stage) or one clip window of it (after)."""

    source: str  # the input as listed (path or URI)
    kind: str  # single | multi_event | dual, or auto until the faces stage decides
    caption: str | None = None
    kind_reason: str | None = None  # why an auto input got its kind

    # Probe: the source.
    source_hash: str | None = None
    source_fps: float | None = None
    source_duration_s: float | None = None
    source_audio: np.ndarray | None = None  # 16 kHz mono of the whole source; dropped once windows are cut

    # Shots: the window.
    clip_id: str | None = None
    start_frame: int = 0
    num_frames: int = 0

    # Clip: the normalised clip.
    mp4: bytes | None = None
    width: int = 0
    height: int = 0
    audio: np.ndarray | None = None  # 16 kHz mono of the window
    detect_frames: np.ndarray | None = None  # [T, h, w, 3] uint8 downscaled for detection; dropped after faces
    detect_scale: float = 1.0  # clip pixels per detection pixel

    # Faces: persons left to right.
    tracks: np.ndarray | None = None  # [P, T, 4] xyxy clip pixels
    mouth_motion: np.ndarray | None = None  # [P, T] grey levels per frame
    lip_motion: np.ndarray | None = None  # [P, 2, T] lip speed and opening (evaluation.landmarks), speakers and sync

    # Audio, speakers, sync.
    voiced: np.ndarray | None = None  # [T] bool, 25 fps voice activity
    person_masks: np.ndarray | None = None  # [P, T] bool, the frames whose speech is bound to each person
    person_audio: np.ndarray | None = None  # [P, samples] the mix gated to each person
    binding_confidence: list[float] = field(default_factory=list)
    sync_confidence: list[float] = field(default_factory=list)
    sync_offset: list[int] = field(default_factory=list)
    sync_distance: list[float] = field(default_factory=list)  # SyncNet's Sync-D per person (empty without it)
    sync_source: str | None = None  # syncnet | landmarks

    words: list[dict] = field(default_factory=list)  # ASR word timings, schema.Word fields
    turns: list[dict] = field(default_factory=list)  # whisperx diarization, schema.SpeakerTurn fields

    # Wav2vec and captions.
    wav2vec: np.ndarray | None = None  # float16 [P, T, 12, C]
    caption_source: str = "none"

    scores: dict[str, float] = field(default_factory=dict)
    sample: dict[str, bytes] | None = None  # webdataset members, filled by the sample stage

    stage_seconds: dict[str, float] = field(default_factory=dict)  # worker seconds spent on it per stage

    reject_stage: str | None = None
    reject_reason: str | None = None
    reject_detail: str | None = None

    @property
    def rejected(self) -> bool:
        return self.reject_reason is not None

    @property
    def start_s(self) -> float:
        return self.start_frame / SAMPLE_FPS

    @property
    def end_s(self) -> float:
        return (self.start_frame + self.num_frames) / SAMPLE_FPS

    def reject(self, stage: str, reason: RejectReason, detail: str = "") -> None:
        """Mark the record as dropped; later stages pass it through to the rejects table."""
        self.reject_stage, self.reject_reason, self.reject_detail = stage, str(reason), detail
        # Rejects travel to the driver: keep only what the rejects table needs.
        self.source_audio = self.audio = self.detect_frames = self.mp4 = self.person_audio = self.wav2vec = None

    def reject_row(self) -> dict:
        """The rejects.parquet row of a rejected record."""
        windowed = self.clip_id is not None
        return {
            "input": self.source,
            "clip_id": self.clip_id,
            "start_s": self.start_s if windowed else None,
            "end_s": self.end_s if windowed else None,
            "kind": self.kind,
            "stage": self.reject_stage,
            "reason": self.reject_reason,
            "detail": self.reject_detail,
            "stage_seconds": self.stage_seconds,  # for the run's report; not a rejects.parquet column
        }
