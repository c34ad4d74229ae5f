"""Test sets: the clips an evaluation generates and scores, each with its ground-truth video, the first frame it is
generated from, one audio stream per person, its caption and (for several persons) the persons' boxes.

Two sources: curation's held-out split (a folder with manifest.parquet and shards, `OUTPUT/test` of a curation run
whose config sets `split`), or a plain manifest of videos (.jsonl or .csv) with one row per clip: `path` (the
ground-truth video, absolute or relative to the manifest), optional `id`, `audio` (a list of per-person audio files;
default: the video's own track, one person), `caption` and `boxes` (one [x0, y0, x1, y1] per person, first-frame
pixels). Both are written out as plain files under the evaluation's output, so workers need nothing else.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from multitalk_model.media import read_video_frames
from platform_common.samples import JSON_KEY, MANIFEST_FILE, MP4_KEY, ClipMetadata, person_audio_key

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")


class TestSetError(ValueError):
    """A test set that cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class TestClip:
    clip_id: str
    reference_image: str  # the ground truth's first frame (PNG): what generation starts from
    audio: list[str]  # one stream per person, left to right
    ground_truth: str | None = None  # the real video (None when scoring videos that have none)
    caption: str | None = None
    boxes: list[list[float]] | None = None  # per person, [x0, y0, x1, y1] on reference_image

    @property
    def n_person(self) -> int:
        return len(self.audio)

    def as_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> TestClip:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


def load_test_set(location: str | Path, work_dir: str | Path) -> list[TestClip]:
    """The clips of a curated test folder or a manifest of videos, their files laid out under `work_dir`."""
    location, work_dir = Path(location), Path(work_dir)
    if location.is_dir():
        if not (location / MANIFEST_FILE).is_file():
            raise TestSetError(f"{location}: a test folder must hold {MANIFEST_FILE} (curation's test split)")
        return _curated(location, work_dir)
    if location.suffix in (".jsonl", ".csv"):
        return _listed(location, work_dir)
    raise TestSetError(f"{location}: neither a curated test folder nor a manifest of videos (.jsonl, .csv)")


def videos_in(folder: str | Path) -> list[Path]:
    """The videos of a folder (not recursive), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TestSetError(f"{folder}: not a folder of videos")
    videos = sorted(path for path in folder.iterdir() if path.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise TestSetError(f"{folder}: holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    return videos


def video_as_clip(video: Path, work_dir: Path) -> TestClip:
    """A video scored on its own: against its own audio track, its first frame as the reference."""
    return TestClip(video.stem, _first_frame(video, work_dir / video.stem), [str(video)])


def _first_frame(video: str | Path, clip_dir: Path) -> str:
    path = clip_dir / "reference.png"
    if not path.is_file():
        clip_dir.mkdir(parents=True, exist_ok=True)
        first = read_video_frames(video, num_frames=1)[0]
        partial = path.with_name(".reference.png.partial")
        Image.fromarray(first).save(partial, format="PNG")
        partial.replace(path)
    return str(path)


def _write_once(path: Path, data: bytes) -> str:
    if not path.is_file():
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(data)
        partial.replace(path)
    return str(path)


def _curated(folder: Path, work_dir: Path) -> list[TestClip]:
    rows = pq.read_table(folder / MANIFEST_FILE).to_pylist()
    clips = []
    for shard in sorted({row["shard"] for row in rows}):
        with tarfile.open(folder / shard) as archive:
            members: dict[str, dict[str, bytes]] = {}
            for member in archive:
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = archive.extractfile(member).read()
        for key in sorted(members):
            sample = members[key]
            metadata = ClipMetadata.model_validate_json(sample[JSON_KEY])
            if not metadata.persons or person_audio_key(0) not in sample:
                continue  # image-to-video clips have no audio to drive a talking video
            clip_dir = work_dir / key
            clip_dir.mkdir(parents=True, exist_ok=True)
            ground_truth = _write_once(clip_dir / "ground_truth.mp4", sample[MP4_KEY])
            audio = [
                _write_once(clip_dir / person_audio_key(p), sample[person_audio_key(p)])
                for p in range(len(metadata.persons))
            ]
            boxes = [person.bbox_xyxy for person in metadata.persons] if len(metadata.persons) > 1 else None
            clips.append(
                TestClip(key, _first_frame(ground_truth, clip_dir), audio, ground_truth, metadata.caption, boxes)
            )
    if not clips:
        raise TestSetError(f"{folder}: no clip with audio in the test split")
    return clips


def _listed(manifest: Path, work_dir: Path) -> list[TestClip]:
    text = manifest.read_text()
    try:
        rows = (
            list(csv.DictReader(io.StringIO(text)))
            if manifest.suffix == ".csv"
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as error:
        raise TestSetError(f"{manifest}: not JSON lines ({error})") from error
    clips, seen = [], set()
    for number, row in enumerate(rows, start=1):
        where = f"{manifest}: row {number}"
        if not row.get("path"):
            raise TestSetError(f"{where}: has no 'path'")
        video = _resolve(manifest, row["path"], f"{where}: path")
        audio = row.get("audio") or [str(video)]
        if isinstance(audio, str):
            audio = json.loads(audio) if audio.startswith("[") else [audio]
        audio = [str(_resolve(manifest, path, f"{where}: audio")) for path in audio]
        key = str(row.get("id") or video.stem)
        if key in seen:
            raise TestSetError(f"{where}: clip id {key!r} appears twice (give rows an 'id')")
        seen.add(key)
        boxes = row.get("boxes")
        if isinstance(boxes, str):
            boxes = json.loads(boxes)
        if boxes is not None and len(boxes) != len(audio):
            raise TestSetError(f"{where}: {len(boxes)} boxes for {len(audio)} audio streams")
        caption = row.get("caption") or None
        clips.append(TestClip(key, _first_frame(video, work_dir / key), audio, str(video), caption, boxes))
    if not clips:
        raise TestSetError(f"{manifest}: lists no videos")
    return clips


def _resolve(manifest: Path, path: str, what: str) -> Path:
    resolved = Path(path) if Path(path).is_absolute() else manifest.parent / path
    if not resolved.is_file():
        raise TestSetError(f"{what}: {resolved} does not exist")
    return resolved.resolve()
