"""Stage 2: cut a source into shots and lay clip windows of `frame_num` frames at 25 fps inside them."""

from __future__ import annotations

import time

import decord
import numpy as np

from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import AUDIO_RATE, SAMPLE_FPS, RejectReason, clip_id
from pipelines.stages.base import INPUT_ERRORS, add_stage_time
from pipelines.storage import local_copy

_THUMBNAIL_SIZE = (64, 36)  # width, height: enough for colour histograms, cheap to decode
_HISTOGRAM_BINS = 16
_CHUNK_FRAMES = 500  # thumbnails decoded at once, to bound memory on hour-long sources


def shot_boundaries(histograms: np.ndarray, threshold: float) -> list[int]:
    """Frame indices that start a new shot: where the colour histogram jumps by more than `threshold` (0..1)."""
    distance = 0.5 * np.abs(np.diff(histograms, axis=0)).sum(axis=-1).mean(axis=-1)  # per channel, then mean
    return [int(i) + 1 for i in np.flatnonzero(distance > threshold)]


def clip_windows(shots: list[tuple[int, int]], frame_num: int, stride: int) -> list[int]:
    """Start frames of the windows of `frame_num` frames that fit inside a shot, `stride` frames apart."""
    return [start for first, end in shots for start in range(first, end - frame_num + 1, stride)]


class ShotStage:
    """flat_map: one source record in, one record per new clip window out (or the source's reject)."""

    name = "shots"
    num_cpus = 1.0

    def __init__(self, config: CurationConfig, done_clip_ids: frozenset[str] = frozenset()) -> None:
        self.frame_num = config.clips.frame_num
        self.stride = config.clips.stride or config.clips.frame_num
        self.threshold = config.clips.shot_threshold
        self.done_clip_ids = done_clip_ids

    def __call__(self, row: dict) -> list[dict]:
        source: Clip = row["clip"]
        if source.rejected:
            return [row]
        started = time.perf_counter()
        try:
            histograms = self._histograms(source)
        except INPUT_ERRORS as error:
            source.reject(self.name, RejectReason.UNREADABLE, f"{type(error).__name__}: {error}")
            return [row]
        finally:
            add_stage_time(source, self.name, time.perf_counter() - started)
        cuts = [0, *shot_boundaries(histograms, self.threshold), len(histograms)]
        starts = clip_windows(list(zip(cuts, cuts[1:], strict=False)), self.frame_num, self.stride)
        if not starts:
            detail = f"no shot holds {self.frame_num} frames ({len(cuts) - 1} shots)"
            source.reject(self.name, RejectReason.TOO_SHORT, detail)
            return [row]
        clips = []
        for start in starts:
            identity = clip_id(source.source_hash, start, self.frame_num)
            if identity in self.done_clip_ids:
                continue  # committed by an earlier run
            clips.append({"clip": self._window(source, identity, start)})
        for window in clips:  # the source's time so far, shared by its windows
            window["clip"].stage_seconds = {name: value / len(clips) for name, value in source.stage_seconds.items()}
        return clips

    def _histograms(self, source: Clip) -> np.ndarray:
        """[T, 3, bins] normalised colour histograms of the source resampled to 25 fps."""
        width, height = _THUMBNAIL_SIZE
        # Fetched through the per-node cache: this task may run on another node than the probe did.
        reader = decord.VideoReader(str(local_copy(source.source)), width=width, height=height, num_threads=1)
        fps = reader.get_avg_fps() or source.source_fps
        num_frames = int(len(reader) / fps * SAMPLE_FPS)
        # The frame on screen at t = i / 25 (a small slack keeps exact multiples on their own frame).
        indices = np.minimum(np.floor(np.arange(num_frames) / SAMPLE_FPS * fps + 1e-6).astype(int), len(reader) - 1)
        histograms = []
        for first in range(0, num_frames, _CHUNK_FRAMES):
            frames = reader.get_batch(indices[first : first + _CHUNK_FRAMES].tolist()).asnumpy()
            pixels = frames.reshape(len(frames), -1, 3) // (256 // _HISTOGRAM_BINS)
            counts = np.stack(
                [np.apply_along_axis(np.bincount, 1, pixels[..., c], minlength=_HISTOGRAM_BINS) for c in range(3)],
                axis=1,
            )
            histograms.append(counts / pixels.shape[1])
        return np.concatenate(histograms)

    def _window(self, source: Clip, identity: str, start: int) -> Clip:
        audio = None
        if source.source_audio is not None:
            samples_per_frame = AUDIO_RATE // SAMPLE_FPS
            first, length = start * samples_per_frame, self.frame_num * samples_per_frame
            audio = np.zeros(length, dtype=np.float32)
            piece = source.source_audio[first : first + length]
            audio[: len(piece)] = piece
        # A new record, not a copy of the source's: windows must share no mutable field (scores, words...).
        return Clip(
            source=source.source, kind=source.kind, caption=source.caption, source_hash=source.source_hash,
            source_fps=source.source_fps, source_duration_s=source.source_duration_s,
            clip_id=identity, start_frame=start, num_frames=self.frame_num, audio=audio,
        )  # fmt: skip
