"""Video and image I/O through PyAV and PIL: probe, decode at a fixed frame rate, load images, write H.264 + AAC mp4."""

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Presentation times are compared with this slack so that float rounding of pts * time_base never moves a frame
# that lies exactly on an output time to the next slot (a 25 fps source read at 25 fps must map frame i to slot i).
_TIME_EPSILON_S = 1e-6


class MediaError(ValueError):
    """A media file is missing, unreadable or unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class MediaInfo:
    """What probe_media reads from a file's headers: the first video stream and the first audio stream, if any."""

    path: Path
    duration_s: float
    fps: float  # nominal frame rate (ffprobe's r_frame_rate); a file with dropped frames has fewer than duration * fps
    width: int
    height: int
    num_frames: int
    video_codec: str
    has_audio: bool
    audio_rate: int | None
    audio_channels: int | None
    audio_codec: str | None


def _open_container(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as error:
        raise MediaError(f"{path}: not a readable media file ({error})") from error


def _first_video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        raise MediaError(f"{path}: no video stream")
    return container.streams.video[0]


def probe_media(path: str | Path) -> MediaInfo:
    """Read the stream parameters of a video file without decoding it."""
    path = Path(path)
    with _open_container(path) as container:
        video = _first_video_stream(container, path)
        audio = container.streams.audio[0] if container.streams.audio else None
        if container.duration is not None:
            duration_s = container.duration / av.time_base
        elif video.duration is not None:
            duration_s = float(video.duration * video.time_base)
        else:
            raise MediaError(f"{path}: unknown duration")
        rate = video.guessed_rate or video.average_rate
        if not rate:
            raise MediaError(f"{path}: unknown frame rate")
        # Containers such as webm do not store a frame count: count the packets (demuxing only, no decoding).
        num_frames = video.frames or sum(1 for packet in container.demux(video) if packet.size)
        return MediaInfo(
            path=path,
            duration_s=duration_s,
            fps=float(rate),
            width=video.codec_context.width,
            height=video.codec_context.height,
            num_frames=num_frames,
            video_codec=video.codec_context.name,
            has_audio=audio is not None,
            audio_rate=audio.sample_rate if audio is not None else None,
            audio_channels=audio.channels if audio is not None else None,
            audio_codec=audio.codec_context.name if audio is not None else None,
        )


def _decoded_frames(container: av.container.InputContainer, video: av.VideoStream, start_s: float):
    """Yield the decoded frames of `video` from the last keyframe at or before `start_s` on."""
    target_pts = int(start_s / video.time_base)
    if start_s > 0:
        container.seek(target_pts, stream=video, backward=True, any_frame=False)
    frames = container.decode(video)
    first = next(frames, None)
    if first is not None and start_s > 0 and first.pts is not None and first.pts > target_pts:
        # Some demuxers land after the target; decode from the beginning instead of returning late frames.
        container.seek(0, stream=video, backward=True, any_frame=False)
        frames = container.decode(video)
        first = next(frames, None)
    if first is None:
        return
    yield first
    yield from frames


def _resample(decoded, fps: float, start_s: float, num_frames: int | None, nominal_frame_s: float):
    """Pick frames at t_i = start_s + i / fps; return them (RGB) and the end time of the last decoded frame."""
    # Output frame i shows what is on screen at t_i: the last frame whose pts <= t_i. This drops or repeats
    # source frames as needed (30 fps -> 25 fps, variable frame rate sources).
    shown, shown_rgb, shown_end_s = None, None, 0.0
    upcoming = next(decoded, None)
    output = []
    while upcoming is not None or shown is not None:
        if num_frames is not None and len(output) == num_frames:
            break
        t = start_s + len(output) / fps
        while upcoming is not None and upcoming.time <= t + _TIME_EPSILON_S:
            shown, shown_rgb, upcoming = upcoming, None, next(decoded, None)
            frame_s = float(shown.duration * shown.time_base) if shown.duration else nominal_frame_s
            shown_end_s = shown.time + frame_s
        if shown is None:
            # t lies before the first frame (streams often start a few ms late): show the first frame.
            shown, shown_rgb = upcoming, None
        if upcoming is None and t >= shown_end_s - _TIME_EPSILON_S:
            break
        if shown_rgb is None:
            shown_rgb = shown.to_ndarray(format="rgb24")
        output.append(shown_rgb)
    return output, shown_end_s


def read_video_frames(
    path: str | Path, fps: float = 25.0, start_s: float = 0.0, num_frames: int | None = None
) -> np.ndarray:
    """Decode RGB frames [T, H, W, 3] uint8 resampled to `fps` from `start_s` on (all remaining ones by default)."""
    path = Path(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    with _open_container(path) as container:
        video = _first_video_stream(container, path)
        video.thread_type = "AUTO"
        nominal_frame_s = 1.0 / float(video.guessed_rate or video.average_rate or fps)
        try:
            decoded = _decoded_frames(container, video, start_s)
            output, end_s = _resample(decoded, fps, start_s, num_frames, nominal_frame_s)
        except av.FFmpegError as error:
            raise MediaError(f"{path}: cannot decode the video ({error})") from error
    if num_frames is not None and len(output) < num_frames:
        raise MediaError(
            f"{path}: asked for {num_frames} frames at {fps} fps from {start_s} s, but the video ends at {end_s:.3f} s"
        )
    if not output:
        raise MediaError(f"{path}: no video frames from {start_s} s on (the video ends at {end_s:.3f} s)")
    return np.stack(output)


def load_image(path: str | Path) -> np.ndarray:
    """Load an image as H x W x 3 uint8 RGB, upright per its EXIF orientation, transparency composited on white."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            # Phone photos are stored sideways with an orientation tag: turn them the way a viewer shows them.
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise MediaError(f"{path}: not an image ({error})") from error


def _audio_layout(channels: int) -> str:
    layouts = {1: "mono", 2: "stereo"}
    if channels not in layouts:
        raise ValueError(f"audio must have 1 or 2 channels, got {channels}")
    return layouts[channels]


def _fit_audio(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad [channels, samples] audio to exactly `num_samples`, as planar float32 for the AAC encoder."""
    fitted = np.zeros((audio.shape[0], num_samples), dtype=np.float32)
    kept = min(num_samples, audio.shape[1])
    fitted[:, :kept] = audio[:, :kept]
    return fitted


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be [T, H, W, 3] with T >= 1, got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 in yuv420p needs an even width and height, got {width}x{height}")


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: int = 25,
    audio: np.ndarray | None = None,
    audio_rate: int | None = None,
    crf: int = 18,
) -> Path:
    """Write RGB frames as H.264 mp4 at exactly `fps`, with [channels, samples] audio as AAC cut to the video length.

    `frames` is one [T, H, W, 3] array, or an iterable of such chunks (a generator's clips) encoded as they come, so
    that a long video never has to be in memory at once.
    """
    path = Path(path)
    if fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    if audio is not None:
        if audio.ndim != 2:
            raise ValueError(f"audio must be [channels, samples], got shape {tuple(audio.shape)}")
        if not audio_rate or audio_rate < 1:
            raise ValueError(f"audio_rate must be given as a positive sample rate with audio, got {audio_rate}")
    chunks = [frames] if isinstance(frames, np.ndarray) else frames

    path.parent.mkdir(parents=True, exist_ok=True)
    # Encode next to the destination and rename at the end: a reader never sees a partial file, and the
    # rename stays on one file system.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        # faststart puts the index first so that browsers can play the result while it downloads.
        with av.open(str(temporary), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            video = audio_stream = None
            index = 0
            for chunk in chunks:
                _check_frames(chunk)
                if video is None:  # the first chunk gives the size
                    video = container.add_stream("libx264", rate=fps)
                    video.height, video.width = chunk.shape[1:3]
                    video.pix_fmt, video.options = "yuv420p", {"crf": str(crf)}
                    if audio is not None:
                        layout = _audio_layout(audio.shape[0])
                        audio_stream = container.add_stream("aac", rate=audio_rate, layout=layout)
                elif chunk.shape[1:3] != (video.height, video.width):
                    raise ValueError(
                        f"frames must all be {video.width}x{video.height}, got a chunk of "
                        f"{chunk.shape[2]}x{chunk.shape[1]}"
                    )
                for rgb in chunk:
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                    frame.pts, frame.time_base = index, Fraction(1, fps)
                    container.mux(video.encode(frame))
                    if audio_stream is not None:
                        # Encode the audio of each frame with it, so that the file interleaves audio and video in
                        # time order (a player streaming it needs both) instead of storing all video first; past
                        # the audio's end, silence.
                        first, end = round(index * audio_rate / fps), round((index + 1) * audio_rate / fps)
                        samples = av.AudioFrame.from_ndarray(
                            _fit_audio(audio[:, first:end], end - first), format="fltp", layout=audio_stream.layout.name
                        )
                        samples.sample_rate, samples.pts, samples.time_base = audio_rate, first, Fraction(1, audio_rate)
                        container.mux(audio_stream.encode(samples))
                    index += 1
                del chunk, rgb  # free the chunk (a clip's frames) before the next one is made
            if video is None:
                raise ValueError("frames must hold at least one frame, got no chunk")
            container.mux(video.encode())
            if audio_stream is not None:
                container.mux(audio_stream.encode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
