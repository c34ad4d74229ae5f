"""The InfiniteTalk sampler: image to video, and video dubbing (a source video's people speaking new audio).

InfiniteTalk (MeiGen-AI/InfiniteTalk, arXiv 2508.14033) has MultiTalk's transformer and weight layout; its weights
were trained for another sampler, whose clip conditions `InfiniteTalkPipeline` gives (wan/multitalk.py
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
    _ClipCondition,
    _to_pixels,
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

    def _audio_frames_needed(self, prepared: PreparedJob, starts: list[int]) -> int:
        audio_frames = int(len(prepared.speech[0]) / SAMPLE_RATE * VIDEO_FPS)
        return audio_frames_needed(starts[-1] + prepared.job.frame_num, audio_frames)

    def _clip_conditioner(
        self, prepared: PreparedJob, starts: list[int]
    ) -> Callable[[int, np.ndarray | None], _InfiniteTalkClip]:
        """Each clip is conditioned on its own reference frame; its motion frames are the previous clip's last ones,
        for the first clip its reference frame. Colour matching aims at prepared.image, the first clip's reference
        frame, in every clip (as the reference)."""
        references = self.reference_frames(prepared, starts)
        frame_num = prepared.job.frame_num

        def encode(clip_index: int, motion: np.ndarray | None) -> _InfiniteTalkClip:
            given = _to_pixels(references[0])[:, None] if motion is None else _to_pixels(motion)
            return self.encode_clip(references[clip_index], given, frame_num)

        return encode


__all__ = [
    "InfiniteTalkPipeline",
    "audio_frames_needed",
    "paste_clean",
    "reference_frame_indices",
    "video_frame_count",
]
