"""The InfiniteTalk sampler: image to video, and video dubbing (a source video's people speaking new audio).

InfiniteTalk (MeiGen-AI/InfiniteTalk, arXiv 2508.14033) has MultiTalk's transformer and weight layout; its weights
were trained for another sampler, which `InfiniteTalkPipeline.sample` follows (wan/multitalk.py
`generate_infinitetalk`):

- clips advance by frame_num - motion_frames (9 by default) as MultiTalk's streaming mode does, until the audio ends;
- every clip is conditioned on one reference frame only (mask on frame 0): the source video's frame at the clip's
  start (the last frame once the video has ended), or the image for every clip; CLIP sees that frame too;
- the clean latents of the motion frames (the first clip: the reference frame; later clips: the last motion frames of
  the previous clip) are pasted over the noisy latent before and after every step, not re-noised.

A model directory whose model_index.json says "family": "infinitetalk" loads into this pipeline
(`MultiTalkPipeline.from_model_dir`). The output is as long as the audio (capped at max_duration_s), 25 fps, with
the persons' audio as its sound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .audio import SAMPLE_RATE, VIDEO_FPS
from .components import vae_encode
from .conditioning import paste_given_frames
from .generation import (
    GenerationError,
    MultiTalkPipeline,
    PreparedJob,
    Progress,
    _ClipCondition,
    _to_pixels,
    plan_clips,
)
from .jobs import GenerationJob
from .media import MediaError, probe_media, read_video_frames
from .regions import resize_and_center_crop


def reference_frame_indices(clip_starts: list[int], source_frames: int) -> list[int]:
    """Each clip's reference frame in the source (25 fps frames): the frame at the clip's start, the last frame
    once the source has ended (the reference's extract_specific_frames(video, audio_start_idx)).

    The reference indexes the source's own frames: the same frames for a 25 fps source; for another rate (a 30 fps
    phone video) it would drift from the clip's time, so the source is read on the 25 fps timeline instead."""
    if source_frames < 1:
        raise ValueError(f"a source video has at least one frame, got {source_frames}")
    return [min(start, source_frames - 1) for start in clip_starts]


def audio_frames_needed(last_clip_end: int, audio_frames: int) -> int:
    """Audio feature frames the clips read: past the audio's end, the reference appends the last
    last_clip_end - audio_frames + 3 frames reversed, so that the last frames' windows (t + 2) stay inside."""
    return last_clip_end + 3 if last_clip_end >= audio_frames else audio_frames


def paste_clean(latent: torch.Tensor, motion_latent: torch.Tensor, motion_frames: int) -> torch.Tensor:
    """The latent [B, C, T, h, w] with the latent frames of its first `motion_frames` frames set to the clean
    motion latents: the shared paste (conditioning.py) at time 0."""
    return paste_given_frames(latent, motion_latent, motion_frames, 0.0, torch.zeros_like(motion_latent))


@dataclass(frozen=True)
class _InfiniteTalkClip(_ClipCondition):
    """A clip's condition (frame 0: its reference frame) and the motion frames pasted clean around every step."""

    motion_latent: torch.Tensor  # [1, C, motion latent frames, h, w]
    motion_frames: int  # video frames they hold: 1 (the reference frame) in the first clip, then motion_frames


def video_frame_count(path: str, fps: int = VIDEO_FPS) -> int:
    """Frames a video has when read at `fps` (read_video_frames' timeline), decoding only its last second."""
    info = probe_media(path)
    estimate = math.floor(info.num_frames / info.fps * fps)
    start = max(0, estimate - fps)
    while True:
        try:
            return start + len(read_video_frames(path, fps, start_s=start / fps))
        except MediaError:
            if start == 0:
                raise
            start = max(0, start - 4 * fps)  # the header's length overshot the decodable frames


class InfiniteTalkPipeline(MultiTalkPipeline):
    """Generation for InfiniteTalk weights; `prepare` and `generate` are MultiTalk's, with a video as input too."""

    family = "infinitetalk"

    def _load_source(self, job: GenerationJob) -> np.ndarray:
        """The image, or the source video's first frame: where the person regions are found."""
        if job.video is None:
            return super()._load_source(job)
        try:
            return read_video_frames(job.video, VIDEO_FPS, num_frames=1)[0]
        except MediaError as error:
            raise GenerationError(f"video: {error}") from None

    def reference_frames(self, prepared: PreparedJob, clip_starts: list[int]) -> list[np.ndarray]:
        """Each clip's reference frame at the output size, uint8 [H, W, 3]."""
        job = prepared.job
        if job.video is None:
            return [prepared.image] * len(clip_starts)
        size = prepared.image.shape[:2]
        try:
            indices = reference_frame_indices(clip_starts, video_frame_count(job.video))
            frames = [
                read_video_frames(job.video, VIDEO_FPS, start_s=index / VIDEO_FPS, num_frames=1)[0] for index in indices
            ]
        except MediaError as error:
            raise GenerationError(f"video: {error}") from None
        return [resize_and_center_crop(frame, size) for frame in frames]

    def encode_clip(self, reference: np.ndarray, motion: torch.Tensor, frame_num: int) -> _InfiniteTalkClip:
        """A clip's condition: its reference frame uint8 [H, W, 3] (CLIP, VAE, mask on frame 0) and its motion
        frames [3, n, H, W] in [-1, 1], encoded alone (the first clip's, its reference frame, come with it)."""
        clip = self._encode_clip_condition(_to_pixels(reference)[:, None], frame_num, paste=True)
        motion_frames = motion.shape[1]
        if motion_frames == 1:  # the reference frame: the causal VAE encodes the first frame alone
            motion_latent = clip.latent[:, :, :1]
        else:
            with self._on_device(self.components.vae):
                motion_latent = vae_encode(self.components, motion[None].to(self.device))
        return _InfiniteTalkClip(**vars(clip), motion_latent=motion_latent, motion_frames=motion_frames)

    @staticmethod
    def _paste_given_frames(latent, clip: _InfiniteTalkClip, t, generator) -> torch.Tensor:
        """The motion latents, clean at every time. MultiTalk's denoising loop pastes before the first step and
        after every step: with clean latents that is the reference's paste before and after every step."""
        return paste_clean(latent, clip.motion_latent, clip.motion_frames)

    @torch.no_grad()
    def sample(
        self,
        prepared: PreparedJob,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, float]:
        """The job's frames, uint8 [num_frames, H, W, 3], and the share of forwards the step cache skipped."""
        job = prepared.job
        self._use_job_loras(job.loras)
        starts = plan_clips(prepared.num_frames, job.frame_num, job.motion_frames, job.mode == "streaming")
        audio_frames = int(len(prepared.speech[0]) / SAMPLE_RATE * VIDEO_FPS)
        conditions = self._job_conditions(
            prepared, starts, audio_frames_needed(starts[-1] + job.frame_num, audio_frames)
        )
        references = self.reference_frames(prepared, starts)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        motion = _to_pixels(references[0])[:, None]  # the first clip's motion frame is its reference frame
        frames: list[np.ndarray] = []
        cache_computed = cache_skipped = 0
        for clip_index, reference in enumerate(references):
            clip = self.encode_clip(reference, motion, job.frame_num)
            latent, computed, skipped = self._sample_clip(
                job, clip, clip_index, starts, conditions, generator, progress, cancelled
            )
            cache_computed, cache_skipped = cache_computed + computed, cache_skipped + skipped
            # Colour-matched to prepared.image, the first clip's reference frame, in every clip (as the reference).
            clip_frames = self._decode_clip(latent, prepared)
            frames.append(clip_frames if clip_index == 0 else clip_frames[job.motion_frames :])
            motion = _to_pixels(clip_frames[-job.motion_frames :])
        total = cache_computed + cache_skipped
        return np.concatenate(frames)[: prepared.num_frames], (cache_skipped / total if total else 0.0)


__all__ = [
    "InfiniteTalkPipeline",
    "audio_frames_needed",
    "paste_clean",
    "reference_frame_indices",
    "video_frame_count",
]
