"""The generator deployment: each replica holds the model on its devices and runs jobs one at a time.

A job runs in a worker thread (the replica keeps answering health checks and the dispatcher meanwhile): its inputs
come from the storage, every step's progress goes to the job store, whose answer tells the run whether to go on
(a cancellation, or a newer attempt of the same job after a restart, stops it between two steps), and the video
goes back to the storage before the job is marked succeeded, so a succeeded job always has its content. Every
finished clip is kept with the job in the storage (serving/clips.py): a retry, on this replica or another node's,
generates only the clips after the last one an earlier attempt finished.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from ray import serve

from multitalk_model.faces import build_face_detector
from multitalk_model.generation import (
    ClipStore,
    GenerationCancelled,
    GenerationError,
    GenerationResult,
    MultiTalkPipeline,
    Progress,
)
from multitalk_model.jobs import GenerationJob
from multitalk_model.media import read_video_frames
from platform_common.pause import pause_point

from .clips import JobClips
from .config import ServingConfig
from .device_group import DeviceGroup
from .storage import THUMBNAIL_NAME, VIDEO_NAME, Storage, job_file
from .store import JobState, JobStore, StepProgress

logger = logging.getLogger(__name__)


class Runner(Protocol):
    """What generates a job on a replica's devices: MultiTalkPipeline on one device, a device group on several."""

    def generate(
        self,
        job: GenerationJob,
        out_path: str | Path,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        preview_path: str | Path | None = None,
        clip_store: ClipStore | None = None,
    ) -> GenerationResult: ...


def build_runner(config: ServingConfig) -> Runner:
    """The runner of one replica: the pipeline itself on one device, or a device group sharding each job over K."""
    if config.devices_per_replica > 1:
        # The group places its K rank actors in a STRICT_PACK placement group next to this replica (which then
        # reserves no device of its own: set generator.num_gpus 0 and, on a CPU laptop, num_cpus 0).
        return DeviceGroup(
            config.model_dir,
            config.devices_per_replica,
            mode=config.parallel_mode,
            use_gpu=config.device == "cuda",
            face_detector=config.face_detector,
            shard_weights=config.shard_weights,
            **pipeline_options(config),
        )
    return MultiTalkPipeline.from_model_dir(
        config.model_dir,
        device=config.device,
        face_detector=build_face_detector(config.face_detector),
        **pipeline_options(config),
    )


def pipeline_options(config: ServingConfig) -> dict[str, Any]:
    """`MultiTalkPipeline.from_model_dir` arguments from the config (the device and face detector aside)."""
    return {
        "dtype": getattr(torch, config.dtype),
        "low_memory": config.offload == "group",
        "quantization": config.quantization,
        # Off by default in device groups: compiled blocks with FSDP2 and the parallel collectives inside are
        # tested on CPU ranks with Dynamo's capture (tests/test_sharding_options.py), not yet with inductor + NCCL.
        "compile_blocks": config.compile
        if config.compile is not None
        else config.device == "cuda" and config.devices_per_replica == 1,
        "attention_backend": config.attention_backend,
        "text_encoder_on_cpu": config.text_encoder_on_cpu,
    }


def _local_job(spec: dict[str, Any], job_id: str, storage: Storage, work_dir: Path) -> GenerationJob:
    """The stored job with its input files fetched from the storage into work_dir."""
    job = GenerationJob.model_validate(spec)
    for name in [job.source, *(person.audio for person in job.persons if person.audio)]:
        storage.download(job_file(job_id, name), work_dir / name)
    persons = [
        person.model_copy(update={"audio": person.audio and str(work_dir / person.audio)}) for person in job.persons
    ]
    source_field = "image" if job.image is not None else "video"
    return job.model_copy(update={source_field: str(work_dir / job.source), "persons": persons})


def _write_thumbnail(video: Path, out: Path) -> tuple[int, int]:
    """The video's first frame as a JPEG (download_content's thumbnail variant); returns the video's (width, height)."""
    first = read_video_frames(video, num_frames=1)[0]
    Image.fromarray(first).save(out, quality=90)
    return first.shape[1], first.shape[0]


def _summary(result: GenerationResult, size: tuple[int, int], started: datetime, ended: datetime) -> dict[str, Any]:
    return {
        "width": size[0],
        "height": size[1],
        "num_frames": result.num_frames,
        "duration_s": result.duration_s,
        "clips": result.clips,
        "resumed_clips": result.resumed_clips,
        "boxes": [list(box) for box in result.boxes],
        "region_source": result.region_source,
        "generation_started_at": started.isoformat(),
        "generation_ended_at": ended.isoformat(),
        "generation_seconds": result.seconds,
    }


@serve.deployment(max_ongoing_requests=1)
class Generator:
    """One replica: a runner and the job store and storage it reads from and reports to."""

    def __init__(self, config: ServingConfig) -> None:
        self.store = JobStore(config.database_url)
        self.storage = Storage(config.storage_uri)
        self.runner = build_runner(config)

    def __del__(self) -> None:
        # Serve calls this when the replica stops: a device group's rank actors and placement group go with it.
        if isinstance(getattr(self, "runner", None), DeviceGroup):
            self.runner.shutdown()

    async def run(self, job_id: str) -> str:
        """Runs a queued job to its end and returns its final state (a job no longer queued is left alone)."""
        return await asyncio.to_thread(self._run, job_id)

    def _run(self, job_id: str) -> str:
        record = self.store.claim(job_id)
        if record is None:
            return self.store.get(job_id).state
        attempt = record.attempts
        go_on = True

        def report(progress: Progress) -> None:
            nonlocal go_on
            step = StepProgress(progress.clip, progress.clips, progress.step, progress.steps, progress.percent)
            go_on = self.store.report(job_id, attempt, step)
            pause_point("generator-step")

        state, error, summary = JobState.SUCCEEDED, None, None
        clips = JobClips(self.storage, job_id)
        with tempfile.TemporaryDirectory(prefix=f"multitalk-{job_id}-") as work:
            work_dir = Path(work)
            try:
                job = _local_job(record.spec, job_id, self.storage, work_dir)
                started = datetime.now(UTC)
                result = self.runner.generate(
                    job, work_dir / VIDEO_NAME, progress=report, cancelled=lambda: not go_on, clip_store=clips
                )
                ended = datetime.now(UTC)
                size = _write_thumbnail(result.path, work_dir / THUMBNAIL_NAME)
                self.storage.upload(work_dir / THUMBNAIL_NAME, job_file(job_id, THUMBNAIL_NAME))
                self.storage.upload(result.path, job_file(job_id, VIDEO_NAME))
                summary = _summary(result, size, started, ended)
            except GenerationCancelled:
                state = JobState.CANCELLED
            except (GenerationError, FileNotFoundError) as failure:
                state, error = JobState.FAILED, str(failure)
            except Exception as failure:  # noqa: BLE001 - any failure of one job is that job's, told to its caller
                logger.exception("job %s failed", job_id)
                state, error = JobState.FAILED, f"generation failed: {type(failure).__name__}: {failure}"
            if error is not None:  # name the job's files as stored ("inputs/audio2.wav"), not this replica's copies
                error = error.replace(f"{work_dir}/", "")
        if not self.store.end(job_id, attempt, state, error, summary):
            logger.info("job %s: attempt %d was superseded; its end (%s) is not recorded", job_id, attempt, state)
            return state
        clips.clear()  # the job has ended: nothing will resume from them
        return state
