"""The HTTP API, the ingress deployment: video jobs under /v1/videos, region previews, the web page, health and
Prometheus metrics. OpenAPI docs at /docs.

Callers authenticate with an API key as a bearer token and see only their own jobs. A submission is checked
completely (sizes, limits, decodable image and audio, boxes inside the image, one region per audio stream) before
it is accepted; its files then go to the storage and the job to the store, and the dispatcher is woken.
"""

import asyncio
import hashlib
import hmac
import json
import math
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitalk_model.faces import FaceDetector, build_face_detector
from multitalk_model.jobs import GenerationJob
from multitalk_model.media import MediaError, load_image
from multitalk_model.regions import locate_persons, validate_box
from multitalk_model.tts import TtsSettings

from . import metrics
from .config import ServingConfig
from .http_range import file_response
from .openai_objects import FileDeleted, FileList, FileObject, Video, VideoDeleted, VideoList
from .storage import THUMBNAIL_NAME, VIDEO_NAME, Storage, job_file, job_folder, uploaded_file
from .store import IdempotencyConflict, Job, JobState, JobStore, QueueFull
from .submission import RequestRejected, Upload, build_job, check_sizes
from .video_form import VideoFormReader, json_fields, save_upload

WEB_DIR = Path(__file__).parent / "web"
# download_content's variants: the file of a job each names, and its media type.
_VARIANTS = {"video": (VIDEO_NAME, "video/mp4"), "thumbnail": (THUMBNAIL_NAME, "image/jpeg")}
# How often a progress event stream looks at its job (progress is written per step, far slower than this).
_EVENTS_POLL_S = 0.25
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
        return await request.form(max_files=max_files, max_fields=32)
    except StarletteHTTPException as error:  # the multipart parser's own complaints (too many files, bad body)
        raise RequestRejected(error.status_code, f"request: {error.detail}") from None


async def _json_body(request: Request) -> Any:
    """A JSON body (no files: those come as /v1/files ids), refused over the form overhead limit."""
    body = await request.body()
    if len(body) > _FORM_OVERHEAD_BYTES:
        raise RequestRejected(
            413, f"request: {len(body)} bytes of JSON, over {_FORM_OVERHEAD_BYTES}; upload files first"
        )
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise RequestRejected(422, f"body: not valid JSON ({error})") from None


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


@serve.deployment  # its CPUs and node labels come from the config (serving/app.py)
@serve.ingress(app)
class VideosAPI:
    def __init__(self, config: ServingConfig, dispatcher: DeploymentHandle) -> None:
        keys = config.all_api_keys()
        if not keys:
            raise ValueError("api_keys: no API key configured; list some under api_keys or in $MULTITALK_API_KEYS")
        self.owners = {key: _owner_of(key) for key in keys}
        self.config = config
        self.model = config.served_model
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

    @app.post("/v1/videos", status_code=202, response_model=Video, summary="Submit a video job")
    async def submit(
        self,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
        idempotency_key: str | None = Header(default=None, alias="Idempotency-Key", max_length=255),
    ) -> JSONResponse:
        """multipart/form-data, or JSON with files as /v1/files ids (see serving/video_form.py): `input_reference`
        (the reference image, or a video to dub with an InfiniteTalk model), the persons' speech as `audio` files,
        `audio_file_id`s or `speech_text`, `prompt`, `model`, `seconds`, `size`, and `options` (a JSON object:
        GenerationJob fields, `boxes`, `fast`; or the official MultiTalk / InfiniteTalk input JSON)."""
        owner = self._owner(credentials)
        if request.headers.get("content-type", "").startswith("application/json"):
            fields = json_fields(await _json_body(request))
        else:
            limits = self.limits
            source_bytes = max(limits.max_image_bytes, limits.max_video_bytes)
            largest = source_bytes + limits.max_persons * limits.max_audio_bytes + _FORM_OVERHEAD_BYTES
            limit_names = (
                "max(limits.max_image_bytes, limits.max_video_bytes) + limits.max_persons x limits.max_audio_bytes"
            )
            fields = list((await _multipart(request, largest, limit_names, limits.max_persons + 2)).multi_items())
        response, created = await run_in_threadpool(self._submit, owner, fields, idempotency_key)
        if created:
            self.dispatcher.wake.remote()
        return response

    def _submit(self, owner: str, fields: list, idempotency_key: str | None) -> tuple[JSONResponse, bool]:
        """Checks, stores and queues a submission (in a worker thread: it decodes media and writes files)."""
        tts = TtsSettings(model_dir=self.config.tts_model_dir, voice=self.config.tts_voice)
        reader = VideoFormReader(owner, self.store, self.storage, tts, self.model)
        with tempfile.TemporaryDirectory(prefix="multitalk-upload-") as work:
            request = reader.read(fields, Path(work), self.limits)
            image, audio = request.image, request.speech
            if idempotency_key is not None:
                existing = self.store.find(owner, idempotency_key)
                if existing is not None:
                    return self._accepted(self._replay(existing, request.digest), replayed=True), False
            if self.store.state_counts().get(JobState.QUEUED, 0) >= self.config.max_queued_jobs:
                return self._queue_full(f"{self.config.max_queued_jobs} jobs are waiting (max_queued_jobs)"), False

            job = build_job(request.options, image, audio, self.config)
            job_id = uuid.uuid4().hex
            spec, files = _stored_spec(job, image, audio)
            for name, local in files.items():
                self.storage.upload(local, job_file(job_id, name))
        try:
            record, created = self.store.submit(
                job_id, owner, spec, request.digest, idempotency_key, self.config.max_queued_jobs
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

    def _video(self, job: Job) -> dict[str, Any]:
        return Video.of(job, self.model).model_dump(mode="json")

    def _accepted(self, job: Job, replayed: bool) -> JSONResponse:
        headers = {"Location": f"/v1/videos/{job.id}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(self._video(job), status_code=202, headers=headers)

    @app.get("/v1/videos", response_model=VideoList, summary="The caller's jobs")
    def list_videos(
        self,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
        limit: int = Query(default=20, ge=1, le=100),
        after: str | None = Query(default=None, description="last_id of the previous page"),
        order: Literal["asc", "desc"] = Query(default="desc", description="by creation: desc = newest first"),
    ) -> VideoList:
        owner = self._owner(credentials)
        after_job = None if after is None else self.store.get(after)
        if after is not None and (after_job is None or after_job.owner != owner):
            raise HTTPException(422, f"after: {after!r} is not one of your videos")
        jobs = self.store.list_jobs(owner, limit + 1, after_job, newest_first=order == "desc")
        page = [Video.of(job, self.model) for job in jobs[:limit]]
        return VideoList(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(jobs) > limit,
        )

    @app.get("/v1/videos/{job_id}", response_model=Video, summary="A job's status and progress")
    def get_video(self, job_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Video:
        return Video.of(self._own_job(job_id, self._owner(credentials)), self.model)

    @app.get("/v1/videos/{job_id}/events", summary="A job's progress as Server-Sent Events, until it ends")
    async def video_events(
        self, job_id: str, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> StreamingResponse:
        """`event: video` with the video object whenever it changes, then `event: done` with the final one."""
        await run_in_threadpool(self._own_job, job_id, self._owner(credentials))

        async def events():
            last = None
            while True:
                job = await run_in_threadpool(self.store.get, job_id)
                if job is None:  # deleted meanwhile
                    yield f"event: error\ndata: {json.dumps({'detail': f'job {job_id}: deleted'})}\n\n"
                    return
                body = json.dumps(self._video(job))
                if job.finished:
                    yield f"event: done\ndata: {body}\n\n"
                    return
                if body != last:
                    yield f"event: video\ndata: {body}\n\n"
                    last = body
                if await request.is_disconnected():
                    return
                await asyncio.sleep(_EVENTS_POLL_S)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.get("/v1/videos/{job_id}/content", summary="The video (mp4) of a succeeded job, or its thumbnail")
    def get_content(
        self,
        job_id: str,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
        variant: str = Query(default="video", description="video (mp4) | thumbnail (jpeg of the first frame)"),
        range_header: str | None = Header(default=None, alias="Range"),
    ) -> Response:
        """Serves HTTP Range requests (206 Partial Content), so a player can seek without the whole file."""
        job = self._own_job(job_id, self._owner(credentials))
        if variant not in _VARIANTS:
            raise HTTPException(422, f"variant: {variant!r} is not made here; one of {sorted(_VARIANTS)}")
        if job.state != JobState.SUCCEEDED:
            raise HTTPException(409, f"job {job_id}: {job.state} ({job.percent:.0f}%), no video to download")
        name, media_type = _VARIANTS[variant]
        key = job_file(job_id, name)
        size = self.storage.size(key)
        if size is None:
            raise HTTPException(410, f"job {job_id}: its {variant} is gone from the storage")
        filename = f"{job_id}{Path(name).suffix}"
        return file_response(self.storage, key, size, media_type, filename, range_header)

    @app.delete("/v1/videos/{job_id}", summary="Delete a finished job and its files; cancel an unfinished one")
    def delete_video(
        self, job_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> JSONResponse:
        """A finished job (completed, failed, cancelled) is deleted with its files: 200 and OpenAI's deletion object.
        A queued job is cancelled at once (200), a running one between two steps (202): the video object, whose
        `deleted` is false; delete it again once it has ended."""
        job = self._own_job(job_id, self._owner(credentials))
        if job.finished:
            if not self.store.delete(job_id):
                raise HTTPException(404, f"job {job_id}: no such job")
            self.storage.delete(job_folder(job_id))
            return JSONResponse(VideoDeleted(id=job_id, deleted=True).model_dump(mode="json"))
        job = self.store.cancel(job_id)
        status = 200 if job.state == JobState.CANCELLED else 202
        return JSONResponse({**self._video(job), "deleted": False}, status_code=status)

    # ------------------------------------------------------------------------------------------------- files

    @app.post("/v1/files", response_model=FileObject, summary="Upload a file (a person's speech, an image)")
    async def upload_file(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> FileObject:
        """multipart/form-data: `file` and `purpose` (as OpenAI's Files API; any of its purposes, e.g. user_data).
        Reference it in a video request as `audio_file_id` or `input_reference[file_id]`."""
        owner = self._owner(credentials)
        largest = max(self.limits.max_audio_bytes, self.limits.max_image_bytes)
        names = "the larger of limits.max_audio_bytes and limits.max_image_bytes"
        form = await _multipart(request, largest + _FORM_OVERHEAD_BYTES, names, max_files=1)
        return await run_in_threadpool(self._store_file, owner, form, largest)

    def _store_file(self, owner: str, form: Any, largest: int) -> FileObject:
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise RequestRejected(422, "purpose: missing; give the file's purpose (e.g. user_data)")
        if form.get("file") is None:
            raise RequestRejected(422, "file: missing; upload the file as the field 'file'")
        file_id = f"file-{uuid.uuid4().hex}"
        with tempfile.TemporaryDirectory(prefix="multitalk-file-") as work:
            upload, _ = save_upload(form["file"], "file", Path(work) / "file")
            if upload.size > largest:
                raise RequestRejected(413, f"file: {upload.size} bytes, over the limit of {largest} bytes")
            if upload.size == 0:
                raise RequestRejected(422, f"file ({upload.filename!r}): empty file")
            self.storage.upload(upload.path, uploaded_file(file_id))
        return FileObject.of(self.store.add_file(file_id, owner, upload.filename[:255], purpose[:32], upload.size))

    def _own_file(self, file_id: str, owner: str):
        record = self.store.get_file(file_id)
        if record is None or record.owner != owner:
            raise HTTPException(404, f"file {file_id}: no such file")
        return record

    @app.get("/v1/files", response_model=FileList, summary="The caller's uploaded files, newest first")
    def list_files(self, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> FileList:
        return FileList(data=[FileObject.of(record) for record in self.store.list_files(self._owner(credentials))])

    @app.get("/v1/files/{file_id}", response_model=FileObject, summary="An uploaded file's description")
    def get_file(self, file_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)):
        return FileObject.of(self._own_file(file_id, self._owner(credentials)))

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted, summary="Delete an uploaded file")
    def delete_file(self, file_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)):
        record = self._own_file(file_id, self._owner(credentials))
        self.store.delete_file(record.id)
        self.storage.delete(uploaded_file(record.id))
        return FileDeleted(id=record.id, deleted=True)

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
            image, _ = save_upload(form["image"], "image", Path(work) / "image")
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
