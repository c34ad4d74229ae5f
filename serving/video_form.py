"""The fields of a `POST /v1/videos` form, in OpenAI's Videos API shape and ours, turned into local files and options.

    input_reference   the reference image (file), or the id of a /v1/files upload (`input_reference[file_id]`, or
                      `input_reference` as text, as AIPerf sends it in its multipart create); `image`
                      is the same field under its earlier name, `video` another. A video here (detected by
                      content, and checked to decode whole) is a source video to dub (InfiniteTalk models).
    audio             a person's speech (file), once per person
    audio_file_id     a person's speech uploaded through /v1/files, by id (several persons: repeat the field, or
                      give the ids comma-separated, as clients that send one text per key must)
    speech_text       a person's speech as text, spoken by the configured TTS (espeak-ng without one)
    prompt, model, seconds, size      OpenAI's fields: seconds caps the video's length (streaming mode), size is
                      WIDTHxHEIGHT (multiples of 16) or our 480p | 720p
    options           a JSON object of job fields (multitalk_model.jobs.GenerationJob), boxes, fast, speech_voice,
                      or the official MultiTalk input JSON

Persons are numbered in the order their speech fields (audio, audio_file_id, speech_text) appear in the form.
Array fields may carry the `[]` suffix the SDK's extra_body gives lists.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile

from multitalk_model.jobs import GenerationJob
from multitalk_model.tts import SpeechError, TtsSettings, synthesize_speech_file

from .config import Limits
from .inspection import UploadProblem, inspect_video, is_image
from .storage import Storage, uploaded_file
from .store import JobStore
from .submission import RequestRejected, Upload, check_sizes, parse_options

_CHUNK_BYTES = 1 << 20
_IMAGE_FIELDS = ("input_reference", "image", "video")
_IMAGE_ID_FIELD = "input_reference[file_id]"
_SPEECH_FIELDS = ("audio", "audio_file_id", "speech_text")
_TEXT_FIELDS = ("prompt", "model", "seconds", "size", "options")
_SIZE = re.compile(r"(\d+)x(\d+)")
# Our options besides GenerationJob's fields (see submission.build_job).
_OPTION_FIELDS = ("boxes", "fast", "speech_voice")


@dataclass
class VideoForm:
    image: Upload
    speech: list[Upload]  # one per person, in order
    options: dict[str, Any]  # job fields and our options, with OpenAI's fields mapped onto them
    digest: str  # sha256 of every field and file, for idempotent retries


def save_upload(upload: Any, field: str, path: Path) -> tuple[Upload, str]:
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


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def json_fields(body: Any) -> list[tuple[str, Any]]:
    """A JSON create body (what AIPerf and other JSON clients send) as form fields: files come as /v1/files ids
    (`input_reference: {"file_id": ...}` or the id, `audio_file_id`: one id or a list), `speech_text` a text or a
    list, `options` an object; GenerationJob fields may also sit at the top level, as options."""
    if not isinstance(body, dict):
        raise RequestRejected(422, f"body: must be a JSON object, got {type(body).__name__}")
    body = dict(body)
    fields: list[tuple[str, Any]] = []
    reference = body.pop("input_reference", None)
    if reference is not None:
        file_id = reference.get("file_id") if isinstance(reference, dict) else reference
        if not isinstance(file_id, str):
            raise RequestRejected(422, 'input_reference: give {"file_id": ...} of a /v1/files upload')
        fields.append((_IMAGE_ID_FIELD, file_id))
    for name in ("audio_file_id", "speech_text"):
        values = body.pop(name, [])
        for value in values if isinstance(values, list) else [values]:
            fields.append((name, value))
    options = body.pop("options", {})
    if isinstance(options, str):
        options = parse_options(options)
    if not isinstance(options, dict):
        raise RequestRejected(422, "options: must be a JSON object")
    job_fields = {name for name in body if name in GenerationJob.model_fields or name in _OPTION_FIELDS}
    options = {**{name: body.pop(name) for name in job_fields - set(_TEXT_FIELDS)}, **options}
    for name, value in body.items():
        fields.append((name, value if isinstance(value, str) else json.dumps(value)))
    if options:
        fields.append(("options", json.dumps(options)))
    return fields


# How image files start: one that starts so is an image, whole or broken (a broken one is told so as an image).
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _as_image_or_video(field: str, reference: Upload) -> Upload:
    """The reference as the job's image, or (when its content is no picture) as a source video to dub."""
    if field == "video":
        return replace(reference, field="video")
    with reference.path.open("rb") as file:
        head = file.read(12)
    webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    if not reference.size or head.startswith(_IMAGE_SIGNATURES) or webp or is_image(reference.path):
        return reference  # an empty file is told "empty" with the image checks
    return replace(reference, field="video")


def _check_video(field: str, reference: Upload) -> None:
    """A source video must hold a video stream whose frames all decode."""
    try:
        inspect_video(reference.path, f"{field} ({reference.filename!r})")
    except UploadProblem as problem:
        raise RequestRejected(422, str(problem)) from None


class VideoFormReader:
    """Reads one form into a VideoForm, with the caller's stored files and the configured speech synthesiser."""

    def __init__(self, owner: str, store: JobStore, storage: Storage, tts: TtsSettings, model: str) -> None:
        self.owner, self.store, self.storage, self.tts, self.model = owner, store, storage, tts, model

    def read(self, fields: list[tuple[str, Any]], work_dir: Path, limits: Limits) -> VideoForm:
        """The request's fields (a form's multi_items, or json_fields of a JSON body) with its files saved into
        work_dir, and the rest as job options; sizes are checked against limits before any file is decoded."""
        items = []
        for name, value in fields:
            name = name.removesuffix("[]")
            if name == "audio_file_id" and isinstance(value, str):  # "id1,id2": clients that send one text field
                items += [(name, file_id.strip()) for file_id in value.split(",")]
            else:
                items.append((name, value))
        known = {*_IMAGE_FIELDS, _IMAGE_ID_FIELD, *_SPEECH_FIELDS, *_TEXT_FIELDS}
        unknown = sorted({name for name, _ in items} - known)
        if unknown:
            raise RequestRejected(
                422, f"form: unknown field(s) {unknown}; known: {sorted(known)} (job fields go in options)"
            )
        texts = {}
        for name in _TEXT_FIELDS:
            values = [value for field, value in items if field == name]
            if len(values) > 1:
                raise RequestRejected(422, f"{name}: given {len(values)} times; give it once")
            if values and not isinstance(values[0], str):
                raise RequestRejected(422, f"{name}: must be a text field, not a file")
            if values:
                texts[name] = values[0]

        options = parse_options(texts.get("options"))
        voice = options.pop("speech_voice", None)
        if voice is not None and not isinstance(voice, str):
            raise RequestRejected(422, f"options.speech_voice: must be a voice name, got {voice!r}")
        options = self._openai_fields(texts, options)

        digest = hashlib.sha256()
        reference_field, image = self._image(items, work_dir, digest)
        speech = []
        for name, value in items:
            if name not in _SPEECH_FIELDS:
                continue
            person = len(speech) + 1
            upload, fingerprint = self._speech(name, value, person, work_dir, voice)
            speech.append(upload)
            digest.update(f"{name}:{fingerprint}".encode())
        digest.update(json.dumps([texts.get(name, "") for name in _TEXT_FIELDS]).encode())
        image = _as_image_or_video(reference_field, image)
        check_sizes(image, speech, limits)  # before any decoding
        if image.field == "video":
            _check_video(reference_field, image)
        return VideoForm(image=image, speech=speech, options=options, digest=digest.hexdigest())

    def _openai_fields(self, texts: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
        """prompt, model, seconds and size (OpenAI's fields) as job options."""
        if "model" in texts and texts["model"] != self.model:
            served = f"this server serves {self.model!r}"
            raise RequestRejected(422, f"model: {texts['model']!r} is not served here; {served}")
        if "prompt" in texts:
            if "prompt" in options:
                raise RequestRejected(422, "prompt: given both as a form field and in options; give it once")
            options["prompt"] = texts["prompt"]
        if "seconds" in texts:
            try:
                seconds = float(texts["seconds"])
            except ValueError:
                seconds = -1.0
            if not seconds > 0:
                raise RequestRejected(422, f"seconds: must be a positive number of seconds, got {texts['seconds']!r}")
            options.setdefault("max_duration_s", seconds)
            options.setdefault("mode", "streaming")  # the video follows the speech up to that length
        if "size" in texts:
            size = texts["size"]
            if size in ("480p", "720p"):
                options.setdefault("size", size)
            elif match := _SIZE.fullmatch(size):
                options.setdefault("resolution", [int(match.group(2)), int(match.group(1))])
            else:
                raise RequestRejected(422, f"size: give WIDTHxHEIGHT (e.g. 832x480) or 480p | 720p, got {size!r}")
        return options

    def _image(self, items: list[tuple[str, Any]], work_dir: Path, digest) -> tuple[str, Upload]:
        given = [(name, value) for name, value in items if name in (*_IMAGE_FIELDS, _IMAGE_ID_FIELD)]
        if not given:
            raise RequestRejected(
                422, "input_reference: missing; upload the reference image as the field 'input_reference'"
            )
        if len(given) > 1:
            raise RequestRejected(422, f"input_reference: given {len(given)} times (as {[n for n, _ in given]})")
        name, value = given[0]
        path = work_dir / "reference"
        if name == _IMAGE_ID_FIELD or isinstance(value, str):  # a text input_reference is a /v1/files id
            image = self._stored_file(value, name, "image", path)
            fingerprint = _hash_file(path)
        else:
            image, fingerprint = save_upload(value, "image", path)
        digest.update(f"image:{fingerprint}".encode())
        return name, image

    def _speech(self, name: str, value: Any, person: int, work_dir: Path, voice: str | None) -> tuple[Upload, str]:
        field, path = f"audio {person}", work_dir / f"audio{person}"
        if name == "audio":
            return save_upload(value, field, path)
        if name == "audio_file_id":
            upload = self._stored_file(value, name, field, path)
            return upload, _hash_file(path)
        if not isinstance(value, str):
            raise RequestRejected(422, f"speech_text (person {person}): must be a text field, not a file")
        path = path.with_suffix(".wav")
        settings = TtsSettings(model_dir=self.tts.model_dir, voice=voice or self.tts.voice)
        try:
            synthesize_speech_file(value, path, settings)
        except SpeechError as error:
            raise RequestRejected(422, f"speech_text (person {person}): {error}") from None
        upload = Upload(field=field, filename=f"speech{person}.wav", path=path, size=path.stat().st_size)
        return upload, hashlib.sha256(f"{value}\0{settings}".encode()).hexdigest()

    def _stored_file(self, file_id: Any, name: str, field: str, path: Path) -> Upload:
        record = self.store.get_file(file_id) if isinstance(file_id, str) else None
        if record is None or record.owner != self.owner:
            raise RequestRejected(422, f"{name}: {file_id!r} is not a file you uploaded to /v1/files")
        try:
            self.storage.download(uploaded_file(record.id), path)
        except FileNotFoundError:
            raise RequestRejected(410, f"{name}: {file_id!r} is gone from the storage") from None
        return Upload(field=field, filename=record.filename, path=path, size=record.bytes)
