"""The input of one generation job: our schema, the official MultiTalk / InfiniteTalk input JSON, and loading either
from a file."""

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import check_clip_frames
from .regions import official_bbox_to_box

logger = logging.getLogger(__name__)

# `multitalk_14B.sample_neg_prompt` in MeiGen-AI/MultiTalk wan/configs/wan_multitalk_14B.py (the English one).
REFERENCE_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)

# The reference's --sample_shift defaults per resolution.
_DEFAULT_SHIFT = {"480p": 7.0, "720p": 11.0}

# Keys of the official input JSON that generation from local audio files does not use. MultiTalk's names the
# reference image cond_image; InfiniteTalk's names a video to dub, or an image, cond_video.
_OFFICIAL_KEYS = {"prompt", "cond_image", "cond_video", "audio_type", "cond_audio", "bbox"}
# The extensions InfiniteTalk's reference (wan/utils/utils.py is_video) reads cond_video as a video by.
_VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".flv", ".wmv", ".webm", ".mpeg", ".mpg"}

# Each family's default motion frames: the reference CLIs' --motion_frame (MultiTalk 25, InfiniteTalk 9).
DEFAULT_MOTION_FRAMES = {"multitalk": 25, "infinitetalk": 9}


class JobError(ValueError):
    """A job file or official input that cannot be used; the message names the file and the field."""


class PersonInput(BaseModel):
    """One person in the image and the speech that drives them."""

    model_config = ConfigDict(extra="forbid")

    audio: str | None = Field(
        min_length=1,
        description="Path of this person's speech audio; null: the person is silent (a zero stream as long as the "
        "longest other person's speech, as the official input's \"None\").",
    )
    box: tuple[float, float, float, float] | None = Field(
        default=None, description="Where this person is in the image: [x0, y0, x1, y1] in source pixels."
    )

    @field_validator("box")
    @classmethod
    def _box_is_not_empty(cls, box: tuple[float, float, float, float] | None):
        if box is not None and not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(f"box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {list(box)}")
        return box


class PromptAt(BaseModel):
    """One entry of a prompt schedule: the prompt in force from start_s on (until the next entry's start)."""

    model_config = ConfigDict(extra="forbid")

    start_s: float = Field(ge=0, description="Seconds into the video from which this prompt holds.")
    prompt: str = Field(description="Text describing the scene from start_s on.")


class GenerationJob(BaseModel):
    """Everything one generation needs: inputs, sampling settings and long-video settings."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, min_length=1, description="Path of the reference image (the first frame).")
    video: str | None = Field(
        default=None,
        min_length=1,
        description="Path of a video to dub instead of an image (InfiniteTalk models): each clip's reference frame is "
        "the source frame at the clip's position; the output has the persons' new audio.",
    )
    persons: list[PersonInput] = Field(
        min_length=1, description="One entry per person; without boxes, persons count from the left."
    )
    prompt: str | list[PromptAt] = Field(
        default="",
        description="Text describing the scene, or a schedule [{start_s, prompt}] (first at 0 s): each streaming clip "
        "is conditioned on the prompt in force at its start.",
    )
    negative_prompt: str = Field(default=REFERENCE_NEGATIVE_PROMPT, description="Text the video should avoid.")
    audio_type: Literal["add", "para"] = Field(
        default="add", description="add: the persons speak in turn, one after the other; para: at the same time."
    )
    regions: Literal["faces", "halves"] = Field(
        default="faces",
        description="Person regions when no boxes are given: faces (detected faces grown into regions) or halves "
        "(the reference's fixed equal columns with 5% margins, its masks exactly: off-centre people fall outside).",
    )
    seed: int = Field(default=42, ge=0, description="Random seed of the initial noise.")
    steps: int = Field(default=40, ge=1, description="Number of sampling steps.")
    shift: float | None = Field(
        default=None, gt=0, description="Timestep shift of the flow-matching schedule; None = 7 for 480p, 11 for 720p."
    )
    text_guidance: float = Field(
        default=5.0, ge=0, description="Text classifier-free guidance scale (1 = 2 model passes per step, not 3)."
    )
    audio_guidance: float = Field(default=4.0, ge=0, description="Audio classifier-free guidance scale.")
    size: Literal["480p", "720p"] = Field(
        default="480p", description="Area bucket of the output; the aspect ratio follows the image."
    )
    resolution: tuple[int, int] | None = Field(
        default=None, description="Explicit output [height, width] in pixels, multiples of 16, instead of the bucket."
    )
    mode: Literal["clip", "streaming"] = Field(
        default="clip", description="clip: one clip of frame_num frames; streaming: clips chained to the audio's end."
    )
    frame_num: int = Field(default=81, ge=5, description="Frames per clip, 4n+1, at 25 fps.")
    motion_frames: int | None = Field(
        default=None,
        ge=1,
        description="Last frames of a clip that condition the next one in streaming mode, 4n+1; None = the model "
        "family's default (MultiTalk 25, InfiniteTalk 9).",
    )
    max_duration_s: float = Field(default=40.0, gt=0, description="Longest video streaming mode generates, in seconds.")
    color_correction: float = Field(
        default=1.0, ge=0, le=1, description="How strongly each clip's colours are matched to the image (0 = off)."
    )
    use_apg: bool = Field(default=False, description="Adaptive projected guidance, against colour drift.")
    loras: list[tuple[str, float]] = Field(
        default=[],
        description="LoRAs [path, scale] merged into the transformer for this job only, e.g. a few-step distillation "
        "LoRA (FusionX, lightx2v) with the reference's recipe: text_guidance 1, audio_guidance 2, shift 2, 4-8 steps.",
    )
    step_cache_threshold: float | None = Field(
        default=None, gt=0, description="Skip a step's model call when its input changed less than this; None = never."
    )

    @field_validator("resolution")
    @classmethod
    def _resolution_fits_the_latent_grid(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        # 8x VAE downsampling, then 2x2 patches: both sides must be multiples of 16.
        if value is not None and (value[0] % 16 or value[1] % 16 or min(value) < 16):
            raise ValueError(f"resolution must be [height, width] in multiples of 16, got {list(value)}")
        return value

    @field_validator("prompt")
    @classmethod
    def _schedule_starts_at_zero_and_increases(cls, value: str | list[PromptAt]) -> str | list[PromptAt]:
        if isinstance(value, str):
            return value
        starts = [entry.start_s for entry in value]
        if not starts or starts[0] != 0:
            raise ValueError(f"a prompt schedule must start with an entry at start_s 0, got starts {starts}")
        if any(later <= earlier for earlier, later in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"a prompt schedule's start_s must increase, got {starts}")
        return value

    @field_validator("frame_num")
    @classmethod
    def _frame_num_is_4n_plus_1(cls, value: int) -> int:
        return check_clip_frames(value)

    @field_validator("motion_frames")
    @classmethod
    def _motion_frames_is_4n_plus_1(cls, value: int | None) -> int | None:
        return value if value is None else check_clip_frames(value, minimum=1)

    @model_validator(mode="after")
    def _consistent(self) -> "GenerationJob":
        if (self.image is None) == (self.video is None):
            raise ValueError("give either image (image to video) or video (dubbing), not both or neither")
        if self.motion_frames is not None and self.motion_frames >= self.frame_num:
            raise ValueError(f"motion_frames must be < frame_num, got {self.motion_frames} >= {self.frame_num}")
        if all(person.audio is None for person in self.persons):
            raise ValueError("persons: every person is silent (audio null); at least one needs an audio file")
        with_box = [index + 1 for index, person in enumerate(self.persons) if person.box is not None]
        if with_box and len(with_box) != len(self.persons):
            raise ValueError(
                f"persons: {len(self.persons)} audio streams but {len(with_box)} person regions (boxes for person(s) "
                f"{with_box}); give a box for every person or for none"
            )
        return self

    def prompt_at(self, seconds: float) -> str:
        """The prompt in force `seconds` into the video."""
        if isinstance(self.prompt, str):
            return self.prompt
        return [entry.prompt for entry in self.prompt if entry.start_s <= seconds][-1]

    @property
    def prompt_texts(self) -> list[str]:
        """Every prompt text of the job (one, or each of a schedule's)."""
        return [self.prompt] if isinstance(self.prompt, str) else [entry.prompt for entry in self.prompt]

    def for_family(self, family: str) -> "GenerationJob":
        """The job with what it leaves to the model family (motion_frames) filled in and checked again."""
        if self.motion_frames is not None:
            return self
        return GenerationJob.model_validate({**self.model_dump(), "motion_frames": DEFAULT_MOTION_FRAMES[family]})

    @property
    def source(self) -> str:
        """The path of the visual input, image or video."""
        return self.image if self.image is not None else self.video

    @property
    def resolved_shift(self) -> float:
        """The timestep shift to sample with: `shift`, or the reference's default for `size`."""
        return self.shift if self.shift is not None else _DEFAULT_SHIFT[self.size]


def _resolve(path: str, base_dir: Path) -> str:
    return str(base_dir / Path(path).expanduser())


def _official_persons(data: dict[str, Any], base_dir: Path) -> list[dict[str, Any]]:
    """cond_audio {person1: path, ...} and bbox {person1: [y0, x0, y1, x1], ...} -> ordered person entries."""
    if "cond_audio" not in data:
        raise JobError('cond_audio: missing (one audio file per person: {"person1": "a.wav", ...})')
    cond_audio, bbox = data["cond_audio"], data.get("bbox") or {}
    if not isinstance(cond_audio, dict) or not cond_audio:
        raise JobError(f"cond_audio: must map person1, person2, ... to audio paths, got {cond_audio!r}")
    if not isinstance(bbox, dict):
        raise JobError(f"bbox: must map person1, person2, ... to [y0, x0, y1, x1], got {bbox!r}")
    for field, keys in (("cond_audio", cond_audio), ("bbox", bbox)):
        for key in keys:
            if not re.fullmatch(r"person[1-9][0-9]*", key):
                raise JobError(f"{field}.{key}: keys must be person1, person2, ...")
    unknown_boxes = sorted(set(bbox) - set(cond_audio))
    if unknown_boxes:
        raise JobError(f"bbox: {unknown_boxes} have no entry in cond_audio")

    persons = []
    for key in sorted(cond_audio, key=lambda name: int(name.removeprefix("person"))):
        audio = cond_audio[key]
        if not isinstance(audio, str) or not audio:
            raise JobError(f'cond_audio.{key}: must be an audio file path or "None" (silent), got {audio!r}')
        # The reference reads the string "None" as a person who stays silent.
        person: dict[str, Any] = {"audio": None if audio == "None" else _resolve(audio, base_dir)}
        if key in bbox:
            box = bbox[key]
            if not (isinstance(box, list | tuple) and len(box) == 4):
                raise JobError(f"bbox.{key}: must be [y0, x0, y1, x1], got {box!r}")
            person["box"] = official_bbox_to_box(box)
        persons.append(person)
    return persons


def _official_source(data: dict[str, Any], base_dir: Path) -> dict[str, str]:
    """MultiTalk's cond_image -> image; InfiniteTalk's cond_video -> video, or image when it names an image file."""
    present = [key for key in ("cond_image", "cond_video") if key in data]
    if len(present) != 1:
        raise JobError(
            "cond_image / cond_video: give exactly one (MultiTalk's reference image, or InfiniteTalk's video or "
            f"image), got {present or 'neither'}"
        )
    key = present[0]
    if not isinstance(data[key], str) or not data[key]:
        raise JobError(f"{key}: must be a file path, got {data[key]!r}")
    path = _resolve(data[key], base_dir)
    # InfiniteTalk's reference reads cond_video as a video when its extension is a video's, else as an image.
    is_video = key == "cond_video" and Path(path).suffix.lower() in _VIDEO_SUFFIXES
    return {"video" if is_video else "image": path}


def from_official_json(data: dict[str, Any], base_dir: Path) -> GenerationJob:
    """Convert the official MultiTalk or InfiniteTalk input JSON (cond_image or cond_video, cond_audio, bbox as
    [y0, x0, y1, x1]) into a job."""
    source = _official_source(data, base_dir)
    ignored = sorted(set(data) - _OFFICIAL_KEYS)
    if ignored:
        logger.warning("ignoring keys of the official input that generation does not use: %s", ", ".join(ignored))
    fields: dict[str, Any] = {**source, "persons": _official_persons(data, base_dir)}
    fields.update({key: data[key] for key in ("prompt", "audio_type") if key in data})
    return GenerationJob.model_validate(fields)


def _describe(error: ValidationError) -> str:
    """ValidationError -> "field: problem; field: problem" with pydantic's "Value error, " prefix dropped."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        field = ".".join(str(part) for part in item["loc"])
        problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)


def _check_files_exist(job: GenerationJob) -> None:
    audio = {f"persons.{index}.audio": person.audio for index, person in enumerate(job.persons) if person.audio}
    files = {"image" if job.image is not None else "video": job.source} | audio
    for field, file in files.items():
        if not Path(file).is_file():
            raise JobError(f"{field}: no such file {file}")


def load_job(path: Path) -> GenerationJob:
    """Read a job file in our schema or an official one (it has cond_image or cond_video), paths relative to the
    file's folder."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise JobError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(data, dict):
        raise JobError(f"{path}: must hold a JSON object, got {type(data).__name__}")

    base_dir = path.parent.absolute()
    try:
        if "cond_image" in data or "cond_video" in data:
            job = from_official_json(data, base_dir)
        else:
            job = GenerationJob.model_validate(data)
            resolved_persons = [
                person.model_copy(update={"audio": person.audio and _resolve(person.audio, base_dir)})
                for person in job.persons
            ]
            sources = {key: _resolve(getattr(job, key), base_dir) for key in ("image", "video") if getattr(job, key)}
            job = job.model_copy(update={**sources, "persons": resolved_persons})
        _check_files_exist(job)
    except ValidationError as error:
        raise JobError(f"{path}: {_describe(error)}") from None
    except JobError as error:
        raise JobError(f"{path}: {error}") from None
    return job
