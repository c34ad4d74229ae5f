"""The HTTP API, the ingress deployment: video jobs under /v1/videos, region previews, the web page, health and
Prometheus metrics. OpenAPI docs at /docs.

Callers authenticate with an API key as a bearer token and see only their own jobs. A submission is checked
completely (sizes, limits, decodable image and audio, boxes inside the image, one region per audio stream) before
it is accepted; its files then go to the storage and the job to the store, and the dispatcher is woken.
"""

import hashlib
import hmac
import json
import math
import tempfile
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitalk_model.faces import FaceDetector, build_face_detector
from multitalk_model.jobs import GenerationJob
from multitalk_model.media import MediaError, load_image
from multitalk_model.regions import locate_persons, validate_box

from . import metrics
from .config import ServingConfig
from .storage import VIDEO_NAME, Storage, job_file
from .store import IdempotencyConflict, Job, JobState, JobStore, QueueFull, as_utc
from .submission import RequestRejected, Upload, build_job, check_sizes, parse_options

WEB_DIR = Path(__file__).parent / "web"
_CHUNK_BYTES = 1 << 20
# Multipart boundaries, headers and the options field on top of the files' own limits.
_FORM_OVERHEAD_BYTES = 1 << 20
# Retry-After before any job has finished, when there is no measured job time yet.
_DEFAULT_JOB_SECONDS = 30.0

app = FastAPI(
    title="MultiTalk",
    summary="Audio-driven multi-person conversational video generation",
    description="Submit a reference image and one audio file per person; get back a talking video.",
    version="1",
)
app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
_bearer = HTTPBearer(auto_error=False, description="An API key of the service.")

app.middleware("http")(metrics.measure)


@app.exception_handler(RequestRejected)
async def _rejected(_request: Request, error: RequestRejected) -> JSONResponse:
    return JSONResponse({"detail": error.message}, status_code=error.status)


# ------------------------------------------------------------------------------------------------ response bodies


class JobProgress(BaseModel):
    clip: int  # 1-based; 0 before the first step
    clips: int
    step: int  # steps done in this clip
    steps: int
    percent: float


class VideoJob(BaseModel):
    id: str
    state: JobState
    progress: JobProgress
    prompt: str
    persons: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    attempts: int
    cancel_requested: bool
    result: dict[str, Any] | None
    content_url: str | None

    @classmethod
    def of(cls, job: Job) -> "VideoJob":
        return cls(
            id=job.id,
            state=job.state,
            progress=JobProgress(clip=job.clip, clips=job.clips, step=job.step, steps=job.steps, percent=job.percent),
            prompt=job.spec["prompt"],
            persons=len(job.spec["persons"]),
            created_at=as_utc(job.created_at),
            started_at=as_utc(job.started_at),
            finished_at=as_utc(job.finished_at),
            error=job.error,
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            result=job.result,
            content_url=f"/v1/videos/{job.id}/content" if job.state == JobState.SUCCEEDED else None,
        )


class VideoList(BaseModel):
    jobs: list[VideoJob]
    next_cursor: str | None  # pass as ?cursor= for the next (older) page; None on the last page


class Regions(BaseModel):
    width: int
    height: int
    source: str  # "boxes", "whole image", "faces", "faces+halves" or "halves"
    boxes: list[tuple[float, float, float, float]]  # [x0, y0, x1, y1] in image pixels, person 1 first


# ---------------------------------------------------------------------------------------------------- helpers


def _owner_of(key: str) -> str:
    """Jobs belong to a hash of the key: the database never holds a key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


async def _multipart(request: Request, limit_bytes: int, limit_names: str, max_files: int) -> Any:
    """The parsed multipart form; a declared size over limit_bytes is refused before the body is read."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestRejected(415, "request: send multipart/form-data")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise RequestRejected(
            413,
            f"request: {int(declared) / 2**20:.1f} MB, over the largest accepted upload of "
            f"{limit_bytes / 2**20:.1f} MB ({limit_names})",
        )
    try:
        return await request.form(max_files=max_files, max_fields=16)
    except StarletteHTTPException as error:  # the multipart parser's own complaints (too many files, bad body)
        raise RequestRejected(error.status_code, f"request: {error.detail}") from None


def _save(upload: Any, field: str, path: Path) -> tuple[Upload, str]:
    """Copies an uploaded file to path; returns it and the sha256 of its bytes."""
    if not isinstance(upload, UploadFile):
        raise RequestRejected(422, f"{field}: must be a file upload")
    digest, size = hashlib.sha256(), 0
    upload.file.seek(0)
    with open(path, "wb") as target:
        while chunk := upload.file.read(_CHUNK_BYTES):
            target.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return Upload(field=field, filename=upload.filename or field, path=path, size=size), digest.hexdigest()


def _stored_spec(job: GenerationJob, image: Upload, audio: list[Upload]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The job as stored (inputs named relative to the job's files) and the local file behind each name."""
    image_name = f"inputs/{image.field}{image.suffix}"  # the image or the video
    audio_names = [f"inputs/audio{index + 1}{upload.suffix}" for index, upload in enumerate(audio)]
    names = iter(audio_names)  # the uploads belong to the persons with audio, in order; silent ones keep null
    persons = [person.model_copy(update={"audio": person.audio and next(names)}) for person in job.persons]
    spec = job.model_copy(update={image.field: image_name, "persons": persons}).model_dump(mode="json")
    files = {image_name: image.path} | {name: upload.path for name, upload in zip(audio_names, audio, strict=False)}
    return spec, files


# ------------------------------------------------------------------------------------------------- deployment


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class VideosAPI:
    def __init__(self, config: ServingConfig, dispatcher: DeploymentHandle) -> None:
        keys = config.all_api_keys()
        if not keys:
            raise ValueError("api_keys: no API key configured; list some under api_keys or in $MULTITALK_API_KEYS")
        self.owners = {key: _owner_of(key) for key in keys}
        self.config = config
        self.limits = config.limits
        self.dispatcher = dispatcher
        self.store = JobStore(config.database_url)
        self.storage = Storage(config.storage_uri)
        metrics.watch_jobs(self.store)
        self._detector: FaceDetector | None = None
        self._detector_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ access

    def _owner(self, credentials: HTTPAuthorizationCredentials | None) -> str:
        if credentials is None:
            raise HTTPException(
                401,
                "Authorization: missing; send 'Authorization: Bearer <API key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        for key, owner in self.owners.items():
            if hmac.compare_digest(key.encode(), credentials.credentials.encode()):
                return owner
        raise HTTPException(401, "Authorization: unknown API key", headers={"WWW-Authenticate": "Bearer"})

    def _own_job(self, job_id: str, owner: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id}: no such job")
        if job.owner != owner:
            raise HTTPException(403, f"job {job_id}: belongs to another API key")
        return job

    def _retry_after_s(self, queued: int) -> int:
        job_s = self.store.mean_run_seconds() or _DEFAULT_JOB_SECONDS
        return max(1, math.ceil(job_s * queued / self.config.generator.max_replicas))

    def _queue_full(self, reason: str) -> JSONResponse:
        queued = self.store.state_counts().get(JobState.QUEUED, 0)
        return JSONResponse(
            {"detail": f"queue full: {reason}; retry later"},
            status_code=429,
            headers={"Retry-After": str(self._retry_after_s(queued))},
        )

    # ------------------------------------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    def page(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/healthz", summary="Liveness and database reachability")
    def healthz(self) -> JSONResponse:
        try:
            self.store.ping()
        except Exception as error:  # noqa: BLE001 - any database failure makes the service unhealthy
            return JSONResponse({"status": "unhealthy", "detail": f"database: {error}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    def prometheus(self) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/videos", status_code=202, response_model=VideoJob, summary="Submit a video job")
    async def submit(
        self,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
        idempotency_key: str | None = Header(default=None, alias="Idempotency-Key", max_length=255),
    ) -> JSONResponse:
        """multipart/form-data: `image` (the reference image) or `video` (a video to dub, InfiniteTalk models), `audio`
        once per person in order, and `options` (a JSON object: GenerationJob fields, `boxes`, `fast`; or the official
        MultiTalk / InfiniteTalk input JSON)."""
        owner = self._owner(credentials)
        limits = self.limits
        source_bytes = max(limits.max_image_bytes, limits.max_video_bytes)
        largest = source_bytes + limits.max_persons * limits.max_audio_bytes + _FORM_OVERHEAD_BYTES
        limit_names = (
            "max(limits.max_image_bytes, limits.max_video_bytes) + limits.max_persons x limits.max_audio_bytes"
        )
        form = await _multipart(request, largest, limit_names, max_files=limits.max_persons + 2)
        response, created = await run_in_threadpool(self._submit, owner, form, idempotency_key)
        if created:
            self.dispatcher.wake.remote()
        return response

    def _submit(self, owner: str, form: Any, idempotency_key: str | None) -> tuple[JSONResponse, bool]:
        """Checks, stores and queues a submission (in a worker thread: it decodes media and writes files)."""
        sources = [field for field in ("image", "video") if form.get(field) is not None]
        if len(sources) != 1:
            raise RequestRejected(
                422,
                "image / video: upload exactly one: the reference image as the field 'image', or a video to dub as "
                f"the field 'video' (got {' and '.join(sources) or 'neither'})",
            )
        options_text = form.get("options")
        if options_text is not None and not isinstance(options_text, str):
            raise RequestRejected(422, "options: must be a JSON text field, not a file")
        with tempfile.TemporaryDirectory(prefix="multitalk-upload-") as work:
            work_dir = Path(work)
            image, image_hash = _save(form[sources[0]], sources[0], work_dir / sources[0])
            saved = [
                _save(upload, f"audio {index + 1}", work_dir / f"audio{index + 1}")
                for index, upload in enumerate(form.getlist("audio"))
            ]
            audio = [upload for upload, _ in saved]
            check_sizes(image, audio, self.limits)
            request_digest = hashlib.sha256(
                json.dumps([options_text or "", image_hash, *(file_hash for _, file_hash in saved)]).encode()
            ).hexdigest()

            if idempotency_key is not None:
                existing = self.store.find(owner, idempotency_key)
                if existing is not None:
                    return self._accepted(self._replay(existing, request_digest), replayed=True), False
            if self.store.state_counts().get(JobState.QUEUED, 0) >= self.config.max_queued_jobs:
                return self._queue_full(f"{self.config.max_queued_jobs} jobs are waiting (max_queued_jobs)"), False

            job = build_job(parse_options(options_text), image, audio, self.config)
            job_id = uuid.uuid4().hex
            spec, files = _stored_spec(job, image, audio)
            for name, local in files.items():
                self.storage.upload(local, job_file(job_id, name))
        try:
            record, created = self.store.submit(
                job_id, owner, spec, request_digest, idempotency_key, self.config.max_queued_jobs
            )
        except QueueFull as full:
            return self._queue_full(str(full)), False
        except IdempotencyConflict as conflict:
            raise HTTPException(409, str(conflict)) from None
        return self._accepted(record, replayed=not created), created

    def _replay(self, job: Job, request_digest: str) -> Job:
        try:
            return self.store.replay(job, request_digest)
        except IdempotencyConflict as conflict:
            raise HTTPException(409, str(conflict)) from None

    @staticmethod
    def _accepted(job: Job, replayed: bool) -> JSONResponse:
        headers = {"Location": f"/v1/videos/{job.id}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(VideoJob.of(job).model_dump(mode="json"), status_code=202, headers=headers)

    @app.get("/v1/videos", response_model=VideoList, summary="The caller's jobs, newest first")
    def list_videos(
        self,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
        limit: int = Query(default=20, ge=1, le=100),
        cursor: str | None = Query(default=None, description="next_cursor of the previous page"),
    ) -> VideoList:
        owner = self._owner(credentials)
        if cursor is not None and not cursor.isdigit():
            raise HTTPException(422, f"cursor: {cursor!r} is not a cursor this API returned")
        jobs = self.store.list_jobs(owner, limit + 1, int(cursor) if cursor else None)
        page, more = jobs[:limit], len(jobs) > limit
        return VideoList(jobs=[VideoJob.of(job) for job in page], next_cursor=str(page[-1].seq) if more else None)

    @app.get("/v1/videos/{job_id}", response_model=VideoJob, summary="A job's state and progress")
    def get_video(self, job_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> VideoJob:
        return VideoJob.of(self._own_job(job_id, self._owner(credentials)))

    @app.get("/v1/videos/{job_id}/content", summary="The video (mp4) of a succeeded job")
    def get_content(
        self, job_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> StreamingResponse:
        job = self._own_job(job_id, self._owner(credentials))
        if job.state != JobState.SUCCEEDED:
            raise HTTPException(409, f"job {job_id}: {job.state} ({job.percent:.0f}%), no video to download")
        key = job_file(job_id, VIDEO_NAME)
        size = self.storage.size(key)
        if size is None:
            raise HTTPException(410, f"job {job_id}: its video is gone from the storage")
        headers = {"Content-Length": str(size), "Content-Disposition": f'inline; filename="{job_id}.mp4"'}
        return StreamingResponse(self.storage.chunks(key), media_type="video/mp4", headers=headers)

    @app.delete("/v1/videos/{job_id}", response_model=VideoJob, summary="Cancel a job (between two steps)")
    def cancel_video(
        self, job_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> JSONResponse:
        job = self._own_job(job_id, self._owner(credentials))
        if job.state in (JobState.SUCCEEDED, JobState.FAILED):
            raise HTTPException(409, f"job {job_id}: already {job.state}, nothing to cancel")
        job = self.store.cancel(job_id)
        if job.state not in (JobState.CANCELLED, JobState.RUNNING):  # it finished in the meantime
            raise HTTPException(409, f"job {job_id}: already {job.state}, nothing to cancel")
        # 202 while a running job still has to reach its next step; 200 once it is cancelled.
        status = 200 if job.state == JobState.CANCELLED else 202
        return JSONResponse(VideoJob.of(job).model_dump(mode="json"), status_code=status)

    @app.post("/v1/regions", response_model=Regions, summary="The person regions of an image")
    async def regions(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> Regions:
        """multipart/form-data: `image`, and `persons` (how many to find) or `boxes` (a JSON list to check)."""
        self._owner(credentials)
        largest = self.limits.max_image_bytes + _FORM_OVERHEAD_BYTES
        form = await _multipart(request, largest, "limits.max_image_bytes", max_files=1)
        return await run_in_threadpool(self._regions, form)

    def _regions(self, form: Any) -> Regions:
        """The regions generation would use (in a worker thread: it decodes the image and may detect faces)."""
        if form.get("image") is None:
            raise RequestRejected(422, "image: missing; upload the image as the field 'image'")
        with tempfile.TemporaryDirectory(prefix="multitalk-regions-") as work:
            image, _ = _save(form["image"], "image", Path(work) / "image")
            check_sizes(image, [], self.limits)
            try:
                pixels = load_image(image.path)
            except MediaError as error:
                raise RequestRejected(422, image.describe(error)) from None
        height, width = pixels.shape[:2]
        boxes_text, persons_text = form.get("boxes"), form.get("persons")
        if boxes_text is not None:
            boxes = self._checked_boxes(boxes_text, (height, width))
            return Regions(width=width, height=height, source="boxes", boxes=boxes)
        most = self.limits.max_persons
        if persons_text is None or not str(persons_text).isdigit() or not 1 <= int(persons_text) <= most:
            raise RequestRejected(
                422, f"persons: give a count from 1 to {most} (limits.max_persons), got {persons_text!r}"
            )
        persons = int(persons_text)
        if persons == 1:  # as in generation: one person needs no region
            whole = (0.0, 0.0, float(width), float(height))
            return Regions(width=width, height=height, source="whole image", boxes=[whole])
        with self._detector_lock:  # one detector, built on first use, used by one request at a time
            if self._detector is None:
                self._detector = build_face_detector(self.config.face_detector)
            boxes, source = locate_persons(pixels, persons, self._detector)
        return Regions(width=width, height=height, source=source, boxes=boxes)

    def _checked_boxes(self, text: Any, size_hw: tuple[int, int]) -> list[tuple[float, float, float, float]]:
        try:
            boxes = json.loads(text) if isinstance(text, str) else None
        except json.JSONDecodeError:
            boxes = None
        if not isinstance(boxes, list) or not boxes or len(boxes) > self.limits.max_persons:
            raise RequestRejected(422, f"boxes: must be a JSON list of 1 to {self.limits.max_persons} [x0, y0, x1, y1]")
        for index, box in enumerate(boxes):
            try:
                name = f"boxes[{index}] (person {index + 1})"
                validate_box(tuple(box) if isinstance(box, list) else box, size_hw, name)
            except (TypeError, ValueError) as error:
                raise RequestRejected(422, str(error)) from None
        return [tuple(float(v) for v in box) for box in boxes]
