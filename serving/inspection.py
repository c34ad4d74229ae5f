"""What an upload really contains, found by decoding it, not by trusting its name or its header.

A file's header may promise more than the file holds: a WAV cut short still declares its full data chunk, a PNG or
JPEG header states a size its pixel data does not fill, a video container declares frames it cannot deliver. Each
check here decodes the whole file and compares what it got with what the header declared, so that a request whose
files would fail (or silently produce less) in the generator is refused at submission with a 4xx naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import av
import soundfile as sf
from PIL import Image, UnidentifiedImageError

from multitalk_model.audio import VIDEO_FPS, AudioError, load_audio_track


class UploadProblem(ValueError):
    """An upload that does not hold what a job needs; the message names the file and what was found."""


# The shortest clip generation makes is 5 frames (frame_num is 4n + 1): the first frame and one latent frame of 4.
# Audio shorter than that cannot drive even one latent frame of lip motion.
MIN_SPEECH_FRAMES = 5
MIN_SPEECH_SECONDS = MIN_SPEECH_FRAMES / VIDEO_FPS
# Lossy codecs pad and prime their frames, and containers round durations: a file holding this much less than it
# declares is still whole.
_DURATION_SLACK_S = 0.05
_DURATION_SLACK_SHARE = 0.01


def _problem(label: str, problem: str) -> UploadProblem:
    return UploadProblem(f"{label}: {problem}")


def _wav_declared_frames(path: Path) -> tuple[int, int] | None:
    """(frames, rate) a RIFF/WAVE header declares in its fmt and data chunks; None for any other file."""
    with open(path, "rb") as file:
        head = file.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        rate = block_align = None
        while len(chunk := file.read(8)) == 8:
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"fmt ":
                fmt = file.read(size)
                if len(fmt) < 16:
                    return None
                rate, block_align = struct.unpack("<I", fmt[4:8])[0], struct.unpack("<H", fmt[12:14])[0]
                file.seek(size % 2, 1)
            elif name == b"data":
                # 0xFFFFFFFF (or 0) is what a writer that could not seek back leaves: no declared length.
                if rate is None or not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align, rate
            else:
                file.seek(size + size % 2, 1)
    return None


def _declared_audio_seconds(path: Path) -> float | None:
    """The audio length a file's header declares (WAV data chunk, FLAC/OGG stream info, container duration)."""
    wav = _wav_declared_frames(path)
    if wav is not None:
        return wav[0] / wav[1]
    try:
        info = sf.info(path)
        return info.frames / info.samplerate if info.frames > 0 else None
    except (sf.SoundFileError, RuntimeError):
        pass
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else None
    except av.FFmpegError:
        return None


def speech_seconds(path: Path, label: str) -> float:
    """Seconds of audio a file holds, decoded completely; refused when the file holds less than its header
    declares (truncated) or is too short to drive one clip's lip motion. `label` names the file in messages."""
    try:
        samples, rate = load_audio_track(path)
    except AudioError as error:
        raise _problem(label, str(error).replace(f"{path}: ", "")) from None
    held = samples.shape[1] / rate
    declared = _declared_audio_seconds(path)
    if declared is not None and held < declared - max(_DURATION_SLACK_S, _DURATION_SLACK_SHARE * declared):
        raise _problem(
            label, f"truncated: its header declares {declared:.3f} s of audio but the file holds {held:.3f} s"
        )
    if held < MIN_SPEECH_SECONDS:
        raise _problem(
            label,
            f"{held * 1000:.0f} ms of audio, shorter than the minimum of {MIN_SPEECH_SECONDS * 1000:.0f} ms "
            f"({MIN_SPEECH_FRAMES} frames at {VIDEO_FPS} fps: the first frame and one latent frame of lip motion)",
        )
    return held


def is_image(path: Path) -> bool:
    """Whether the file's content is a picture PIL recognises (by its bytes, whatever it is called)."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def check_image_pixels(path: Path, label: str, width: int, height: int) -> None:
    """Decodes every pixel of an image whose header declared width x height: one whose data does not fill what
    its header states is refused."""
    try:
        with Image.open(path) as opened:
            opened.load()
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise _problem(
            label, f"its header declares {width}x{height} pixels but its data does not hold them ({error})"
        ) from None


@dataclass(frozen=True)
class VideoContents:
    width: int
    height: int
    frames: int
    seconds: float


def inspect_video(path: Path, label: str) -> VideoContents:
    """Decodes a video upload completely: it needs a video stream whose frames are all there, at the size its
    header declares."""
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        raise _problem(label, f"not an image, nor a video ({error})") from None
    with container:
        if not container.streams.video:
            found = ", ".join(f"{len(streams)} {kind}" for kind, streams in _streams_by_kind(container).items())
            raise _problem(
                label, f"no video stream (found: {found or 'no streams'}); dubbing needs a video with a video stream"
            )
        stream = container.streams.video[0]
        declared_size = (stream.codec_context.width, stream.codec_context.height)
        declared_frames = stream.frames
        frames, last_time = 0, 0.0
        try:
            for frame in container.decode(stream):
                if (frame.width, frame.height) != declared_size:
                    raise _problem(
                        label,
                        f"its header declares {declared_size[0]}x{declared_size[1]} frames but frame {frames + 1} "
                        f"is {frame.width}x{frame.height}",
                    )
                frames += 1
                if frame.time is not None:
                    last_time = frame.time
        except av.FFmpegError as error:
            raise _problem(label, f"cannot decode frame {frames + 1} of the video ({error})") from None
    if frames == 0:
        raise _problem(label, "its video stream holds no decodable frame")
    if declared_frames and frames < declared_frames:
        raise _problem(label, f"truncated: its header declares {declared_frames} video frames but {frames} decode")
    return VideoContents(declared_size[0], declared_size[1], frames, last_time)


def _streams_by_kind(container: av.container.InputContainer) -> dict[str, list]:
    kinds: dict[str, list] = {}
    for stream in container.streams:
        kinds.setdefault(stream.type, []).append(stream)
    return kinds
