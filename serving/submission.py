"""A video request from its uploads: the options (ours, or the official MultiTalk / InfiniteTalk input JSON) and the
files, checked against the limits and decoded before the job is accepted, so that a bad request never reaches a
generator. The visual upload is a reference image (`image`) or a video to dub (`video`, InfiniteTalk models).

Our options are any GenerationJob fields besides the uploads, plus `boxes` (one [x0, y0, x1, y1] per person, in the
order of the audio files) and `fast` (the configured fast profile). Options holding `cond_image`, `cond_video` or
`cond_audio` are the official input JSON: its bbox ([y0, x0, y1, x1]) goes through the one converter in
multitalk_model.jobs, its files are the uploads (cond_audio's person1, person2, ... are the audio files in order),
and our fields may sit beside its keys as overrides.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from multitalk_model.components import model_family
from multitalk_model.jobs import GenerationJob, JobError, from_official_json
from multitalk_model.media import MediaError, read_video_frames
from multitalk_model.regions import validate_box

from .config import CONFIGURED_FIELDS, Limits, ServingConfig
from .inspection import UploadProblem, check_image_pixels, speech_seconds

_OFFICIAL_MARKERS = {"cond_image", "cond_video", "cond_audio"}
_EXIF_ORIENTATION = 0x0112
_SIDEWAYS = {5, 6, 7, 8}  # EXIF orientations of a photo stored rotated by 90 degrees
_OFFICIAL_KEYS = {"prompt", "cond_image", "cond_video", "audio_type", "cond_audio", "bbox"}


class RequestRejected(Exception):
    """A request that cannot become a job: the HTTP status and a message naming the field and the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Upload:
    """One uploaded file, copied to a local path."""

    field: str  # how messages name it: "image", "video", "audio 2"
    filename: str  # as the client sent it
    path: Path
    size: int

    @property
    def suffix(self) -> str:
        """The client's file extension when it is a plain one (decoders go by content; this keeps it readable)."""
        suffix = Path(self.filename).suffix
        return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""

    @property
    def label(self) -> str:
        """How messages name it: the field and the client's file name."""
        return f"{self.field} ({self.filename!r})"

    def describe(self, error: Exception) -> str:
        """An error about the local copy, told with the client's file name."""
        message = str(error).replace(f"{self.path}: ", "").replace(str(self.path), self.filename)
        return f"{self.label}: {message}"


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def check_sizes(image: Upload, audio: list[Upload], limits: Limits) -> None:
    """413 naming the limit for a file over its size limit; 422 for more persons than allowed."""
    limit_name = "max_video_bytes" if image.field == "video" else "max_image_bytes"
    if image.size > getattr(limits, limit_name):
        raise RequestRejected(
            413,
            f"{image.field}: {_megabytes(image.size)}, over the limit of {_megabytes(getattr(limits, limit_name))} "
            f"(limits.{limit_name})",
        )
    if len(audio) > limits.max_persons:
        raise RequestRejected(
            422, f"audio: {len(audio)} files (persons), over the limit of {limits.max_persons} (limits.max_persons)"
        )
    for upload in audio:
        if upload.size > limits.max_audio_bytes:
            raise RequestRejected(
                413,
                f"{upload.field}: {_megabytes(upload.size)}, over the limit of {_megabytes(limits.max_audio_bytes)} "
                "(limits.max_audio_bytes)",
            )


def parse_options(text: str | None) -> dict[str, Any]:
    """The options field: a JSON object (absent = {})."""
    if text is None or not text.strip():
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestRejected(422, f"options: not valid JSON ({error})") from None
    if not isinstance(options, dict):
        raise RequestRejected(422, f"options: must be a JSON object, got {type(options).__name__}")
    return options


def _describe(error: ValidationError) -> str:
    """A job's validation errors, each named as the request's options name the field."""
    problems = []
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        if location[:1] == ["persons"] and location[2:] == ["box"]:
            location = [f"boxes[{location[1]}]"]  # persons come from the audio files; their boxes from options.boxes
        field = ".".join(["options", *location])
        problems.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def _persons_from_boxes(boxes: Any, audio: list[Upload]) -> list[dict[str, Any]]:
    persons = [{"audio": str(upload.path)} for upload in audio]
    if boxes is None:
        return persons
    if not isinstance(boxes, list):
        raise RequestRejected(422, f"options.boxes: must be a list of [x0, y0, x1, y1], one per person, got {boxes!r}")
    if len(boxes) != len(audio):
        raise RequestRejected(
            422,
            f"options.boxes: {len(boxes)} region(s) for {len(audio)} audio stream(s); give one box per audio file, "
            "in person order, or none",
        )
    return [{**person, "box": box} for person, box in zip(persons, boxes, strict=False)]


def _official_fields(official: dict[str, Any], image: Upload, audio: list[Upload]) -> dict[str, Any]:
    """The official input JSON with the uploads as its files -> job fields (boxes converted to [x0, y0, x1, y1])."""
    cond_audio = official.get("cond_audio")
    heard = [key for key, value in cond_audio.items() if value != "None"] if isinstance(cond_audio, dict) else []
    if len(heard) != len(audio):
        raise RequestRejected(
            422,
            f"options.cond_audio: names {len(heard)} person(s) with audio but {len(audio)} audio file(s) were "
            'uploaded; person1, person2, ... take the audio files in order (a "None" person is silent and takes none)',
        )
    ordered = sorted(heard, key=lambda key: int(key.removeprefix("person")) if key[6:].isdigit() else math.inf)
    uploads = {key: str(upload.path) for key, upload in zip(ordered, audio, strict=False)}
    data = {
        **{key: value for key, value in official.items() if key not in ("cond_image", "cond_video")},
        "cond_image": str(image.path),  # the upload, image or video: its field decides below
        "cond_audio": {key: uploads.get(key, "None") for key in cond_audio},
    }
    try:
        job = from_official_json(data, image.path.parent)
    except JobError as error:
        raise RequestRejected(422, f"options.{error}") from None
    except ValidationError as error:
        raise RequestRejected(422, _describe(error)) from None
    fields = job.model_dump(exclude_unset=True)
    fields.pop("image")
    return {image.field: str(image.path), **fields}


def build_job(options: dict[str, Any], image: Upload, audio: list[Upload], config: ServingConfig) -> GenerationJob:
    """The job a request asks for, over the configured defaults, with its files decoded and checked."""
    if not audio:
        raise RequestRejected(422, "audio: missing; upload one audio file per person, in person order")
    if image.field == "video" and (config.model_dir / "model_index.json").is_file():
        family = model_family(config.model_dir)
        if family != "infinitetalk":
            raise RequestRejected(
                422, f"video: dubbing a video needs an InfiniteTalk model; this service's is {family}"
            )
    options = dict(options)
    fast = options.pop("fast", False)
    if not isinstance(fast, bool):
        raise RequestRejected(422, f"options.fast: must be true or false, got {fast!r}")
    if _OFFICIAL_MARKERS & set(options):
        if "boxes" in options:
            raise RequestRejected(422, "options.boxes: an official input gives its regions as bbox, not boxes")
        # Keys that are not ours go to the converter, which ignores (and logs) those generation does not use.
        official_keys = [key for key in options if key in _OFFICIAL_KEYS or key not in GenerationJob.model_fields]
        official = {key: options.pop(key) for key in official_keys}
        fields = _official_fields(official, image, audio)
    else:
        fields = {image.field: str(image.path), "persons": _persons_from_boxes(options.pop("boxes", None), audio)}
    uploaded = sorted({"image", "video", "persons"} & set(options))
    if uploaded:
        raise RequestRejected(422, f"options: {uploaded} come from the uploaded files, not from the options")
    configured = sorted(CONFIGURED_FIELDS & set(options))
    if configured:
        raise RequestRejected(422, f"options: {configured} come from the deployment's config, not from a request")

    generation = config.generation
    profile = {}
    if fast:
        if generation.fast_lora is None:
            raise RequestRejected(
                422,
                "options.fast: this deployment has no distillation LoRA (generation.fast_lora), which the few-step "
                "profile needs (text guidance 1 without it makes poor videos); submit without fast",
            )
        profile = {**generation.fast, "loras": [list(generation.fast_lora)]}
    merged = {**generation.defaults, **profile, **fields, **options}
    try:
        job = GenerationJob.model_validate(merged)
    except ValidationError as error:
        raise RequestRejected(422, _describe(error)) from None
    _check_limits(job, config.limits)
    _check_media(job, image, audio, config.limits)
    return job


def _check_limits(job: GenerationJob, limits: Limits) -> None:
    for field, text in [*(("prompt", text) for text in job.prompt_texts), ("negative_prompt", job.negative_prompt)]:
        length = len(text)
        if length > limits.max_prompt_chars:
            raise RequestRejected(
                422,
                f"options.{field}: {length} characters, over the limit of {limits.max_prompt_chars} "
                "(limits.max_prompt_chars)",
            )
    if job.steps > limits.max_steps:
        raise RequestRejected(
            422, f"options.steps: {job.steps}, over the limit of {limits.max_steps} (limits.max_steps)"
        )
    if job.frame_num > limits.max_frame_num:
        raise RequestRejected(
            422, f"options.frame_num: {job.frame_num}, over the limit of {limits.max_frame_num} (limits.max_frame_num)"
        )
    if job.resolution is not None and job.resolution[0] * job.resolution[1] > limits.max_resolution_pixels:
        raise RequestRejected(
            422,
            f"options.resolution: {job.resolution[0]}x{job.resolution[1]} pixels, over the limit of "
            f"{limits.max_resolution_pixels} (limits.max_resolution_pixels)",
        )


def _video_size(video: Upload) -> tuple[int, int]:
    """(width, height) of an uploaded video whose first frame decodes."""
    try:
        height, width = read_video_frames(video.path, num_frames=1).shape[1:3]
    except MediaError as error:
        raise RequestRejected(422, video.describe(error)) from None
    return width, height


def _check_media(job: GenerationJob, image: Upload, audio: list[Upload], limits: Limits) -> None:
    """Decodes the image (or a video's first frame) and every audio file; checks the boxes against the image and the
    speech's length."""
    if image.field == "video":
        width, height = _video_size(image)
        if width * height > limits.max_image_pixels:
            raise RequestRejected(
                422,
                f"video: {width}x{height} pixels, over the limit of {limits.max_image_pixels} "
                "(limits.max_image_pixels)",
            )
    else:
        width, height = _image_size(image, limits)
    _check_boxes_and_audio(job, audio, limits, width, height)


def _image_size(image: Upload, limits: Limits) -> tuple[int, int]:
    """(width, height) of an uploaded image as a viewer shows it upright."""
    try:
        with Image.open(image.path) as opened:
            opened.verify()  # the file's structure and checksums, without decoding every pixel
        with Image.open(image.path) as opened:  # a verified image cannot be read further: open it again
            width, height = stored_size = opened.size
            # PIL decodes a whole PNG to look for EXIF after its pixels (tens of ms for a photo): only when the file
            # holds an eXIf chunk at all. Boxes are in pixels of the upright image.
            has_exif = opened.format != "PNG" or b"eXIf" in image.path.read_bytes()
            if has_exif and opened.getexif().get(_EXIF_ORIENTATION) in _SIDEWAYS:
                width, height = height, width
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise RequestRejected(422, image.describe(MediaError(f"not an image ({error})"))) from None
    if width * height > limits.max_image_pixels:
        raise RequestRejected(
            422,
            f"image: {width}x{height} pixels, over the limit of {limits.max_image_pixels} (limits.max_image_pixels)",
        )
    try:  # after the pixel limit: a header may declare a size its data does not hold
        check_image_pixels(image.path, image.label, *stored_size)
    except UploadProblem as problem:
        raise RequestRejected(422, str(problem)) from None
    return width, height


def _check_boxes_and_audio(job: GenerationJob, audio: list[Upload], limits: Limits, width: int, height: int) -> None:
    for index, person in enumerate(job.persons):
        if person.box is not None:
            try:
                validate_box(person.box, (height, width), f"options.boxes[{index}] (person {index + 1})")
            except ValueError as error:
                raise RequestRejected(422, str(error)) from None

    try:
        seconds = [speech_seconds(upload.path, upload.label) for upload in audio]
    except UploadProblem as problem:
        raise RequestRejected(422, str(problem)) from None
    speech_s = sum(seconds) if job.audio_type == "add" else max(seconds)
    if speech_s > limits.max_audio_seconds:
        raise RequestRejected(
            422,
            f"audio: the speech lasts {speech_s:.1f} s ({job.audio_type}), over the limit of "
            f"{limits.max_audio_seconds:g} s (limits.max_audio_seconds)",
        )
