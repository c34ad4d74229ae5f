"""The objects of OpenAI's Videos and Files APIs, as this server fills them from its jobs and uploads.

The official `openai` SDK (client.videos.create / retrieve / list / delete / download_content / create_and_poll,
client.files.create) and tools built on that API shape (AIPerf's video generation benchmark, vLLM-Omni, SGLang
diffusion clients) read these fields. What the API has no field for rides along as extra fields: the job's own
lifecycle `state` (which tells a cancelled job from a failed one: OpenAI's `status` has no "cancelled", so a
cancelled job reads `status: failed` with `error.code: cancelled`), the clip/step progress, the attempts and the
result (frames, regions used and where they came from).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from multitalk_model.audio import VIDEO_FPS
from multitalk_model.jobs import PromptAt

from .store import Job, JobState, StoredFile, as_utc

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]

_STATUS = {
    JobState.QUEUED: "queued",
    JobState.RUNNING: "in_progress",
    JobState.SUCCEEDED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "failed",
}


def unix_seconds(moment: datetime | None) -> int | None:
    return None if moment is None else int(as_utc(moment).timestamp())


class VideoError(BaseModel):
    code: str  # generation_failed | cancelled
    message: str


class StepsProgress(BaseModel):
    clip: int  # 1-based; 0 before the first step
    clips: int
    step: int  # steps done in this clip
    steps: int


class Timestamps(BaseModel):
    """When the job was accepted, (last) started and ended: unix seconds to the microsecond (OpenAI's are whole)."""

    created: float
    started: float | None
    finished: float | None


def _precise(moment: datetime | None) -> float | None:
    return None if moment is None else as_utc(moment).timestamp()


class Video(BaseModel):
    """OpenAI's video object, and this server's extra fields after `size`."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: VideoStatus
    progress: int  # 0-100
    created_at: int  # unix seconds
    completed_at: int | None
    error: VideoError | None
    prompt: str  # the prompt at 0 s when the prompt is a schedule
    seconds: str  # the video's length: measured once done, the longest it may get before
    size: str  # WIDTHxHEIGHT once done; the requested resolution or size bucket before
    # --- extensions
    state: JobState
    progress_detail: StepsProgress
    prompt_schedule: list[PromptAt] | None
    persons: int
    timestamps: Timestamps
    attempts: int
    cancel_requested: bool
    result: dict[str, Any] | None
    content_url: str | None

    @classmethod
    def of(cls, job: Job, model: str) -> Video:
        spec, result = job.spec, job.result
        schedule = spec["prompt"] if isinstance(spec["prompt"], list) else None
        return cls(
            id=job.id,
            model=model,
            status=_STATUS[JobState(job.state)],
            progress=int(job.percent),
            created_at=unix_seconds(job.created_at),
            completed_at=unix_seconds(job.finished_at),
            error=_error_of(job),
            prompt=schedule[0]["prompt"] if schedule else spec["prompt"],
            seconds=_seconds(spec, result),
            size=_size(spec, result),
            state=job.state,
            progress_detail=StepsProgress(clip=job.clip, clips=job.clips, step=job.step, steps=job.steps),
            prompt_schedule=schedule,
            persons=len(spec["persons"]),
            timestamps=Timestamps(
                created=_precise(job.created_at), started=_precise(job.started_at), finished=_precise(job.finished_at)
            ),
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            result=result,
            content_url=f"/v1/videos/{job.id}/content" if job.state == JobState.SUCCEEDED else None,
        )


def _error_of(job: Job) -> VideoError | None:
    if job.state == JobState.CANCELLED:
        return VideoError(code="cancelled", message=job.error or "cancelled by its owner")
    if job.state == JobState.FAILED:
        return VideoError(code="generation_failed", message=job.error or "failed without a message")
    return None


def _seconds(spec: dict[str, Any], result: dict[str, Any] | None) -> str:
    if result is not None:
        return f"{result['duration_s']:g}"
    longest = spec["max_duration_s"] if spec["mode"] == "streaming" else spec["frame_num"] / VIDEO_FPS
    return f"{longest:g}"


def _size(spec: dict[str, Any], result: dict[str, Any] | None) -> str:
    if result is not None and "width" in result:
        return f"{result['width']}x{result['height']}"
    if spec.get("resolution"):
        height, width = spec["resolution"]
        return f"{width}x{height}"
    return spec["size"]


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None  # pass as ?after= for the next page
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"

    @classmethod
    def of(cls, record: StoredFile) -> FileObject:
        return cls(
            id=record.id,
            bytes=record.bytes,
            created_at=unix_seconds(record.created_at),
            filename=record.filename,
            purpose=record.purpose,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
