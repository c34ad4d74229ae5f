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

import numpy as np
import torch
import torch.nn.functional as F

from .audio import SAMPLE_RATE, VIDEO_FPS
from .color import match_colors
from .components import encode_image, encode_prompt, vae_decode, vae_encode
from .generation import (
    GenerationCancelled,
    GenerationError,
    MultiTalkPipeline,
    PreparedJob,
    Progress,
    _condition_mask,
    _to_uint8,
    plan_clips,
)
from .guidance import APGState, GuidanceScales, GuidedDenoiser, StepCache
from .jobs import GenerationJob
from .media import MediaError, probe_media, read_video_frames
from .regions import resize_and_center_crop
from .sampling import euler_step, shifted_timesteps

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latent, t) -> the guided velocity


def reference_frame_indices(clip_starts: list[int], source_frames: int) -> list[int]:
    """Each clip's reference frame in the source (25 fps frames): the frame at the clip's start, the last frame
    once the source has ended (the reference's extract_specific_frames(video, audio_start_idx))."""
    if source_frames < 1:
        raise ValueError(f"a source video has at least one frame, got {source_frames}")
    return [min(start, source_frames - 1) for start in clip_starts]


def audio_frames_needed(last_clip_end: int, audio_frames: int) -> int:
    """Audio feature frames the clips read: past the audio's end, the reference appends the last
    last_clip_end - audio_frames + 3 frames reversed, so that the last frames' windows (t + 2) stay inside."""
    return last_clip_end + 3 if last_clip_end >= audio_frames else audio_frames


def paste_clean(latent: torch.Tensor, motion_latent: torch.Tensor) -> torch.Tensor:
    """The latent [B, C, T, h, w] with its first latent frames replaced by the clean motion latents."""
    latent = latent.clone()
    latent[:, :, : motion_latent.shape[2]] = motion_latent.to(latent)
    return latent


def denoise_clip(
    latent: torch.Tensor,
    motion_latent: torch.Tensor,
    timesteps: torch.Tensor,
    velocity: Velocity,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Euler steps over `timesteps` with the clean motion latents pasted before and after every step.

    (The reference also pastes re-noised motion latents before the first step and after every step, each at once
    overwritten by the clean ones: their values never reach the model, so they are not made here.)
    """
    for step in range(len(timesteps) - 1):
        if before_step is not None:
            before_step(step)
        latent = paste_clean(latent, motion_latent)
        latent = euler_step(latent, velocity(latent, timesteps[step]), timesteps[step], timesteps[step + 1])
        latent = paste_clean(latent, motion_latent)
        if after_step is not None:
            after_step(step)
    return latent


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


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> [3, T, H, W] in [-1, 1]."""
    return torch.tensor(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


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

    @torch.no_grad()
    def sample(
        self,
        prepared: PreparedJob,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, float]:
        """The job's frames, uint8 [num_frames, H, W, 3], and the share of forwards the step cache skipped."""
        job, c, device = prepared.job, self.components, self.device
        starts = plan_clips(prepared.num_frames, job.frame_num, job.motion_frames, job.mode == "streaming")
        audio_frames = int(len(prepared.speech[0]) / SAMPLE_RATE * VIDEO_FPS)
        audio = self._audio_features(prepared, audio_frames_needed(starts[-1] + job.frame_num, audio_frames))
        references = self.reference_frames(prepared, starts)
        with self._on_device(c.text_encoder):
            text, negative_text = encode_prompt(c, [job.prompt, job.negative_prompt], device).split(1)
        masks = self._latent_masks(prepared.masks) if prepared.num_persons > 1 else None
        timesteps = shifted_timesteps(job.steps, job.resolved_shift).to(device)
        scales = GuidanceScales(text=job.text_guidance, audio=job.audio_guidance)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        height, width = prepared.image.shape[:2]
        latent_shape = (16, (job.frame_num - 1) // 4 + 1, height // 8, width // 8)
        # Only frame 0, the clip's reference frame, is marked as given.
        condition_mask = _condition_mask(1, job.frame_num, *latent_shape[2:]).to(device)

        motion = _pixels(references[0][None])  # the first clip's motion frame is its reference frame
        frames: list[np.ndarray] = []
        cache_computed = cache_skipped = 0
        for clip_index, (clip_start, reference) in enumerate(zip(starts, references, strict=True)):
            with self._on_device(c.image_encoder):
                image_states = encode_image(c, reference)
            with self._on_device(c.vae):
                padded = F.pad(_pixels(reference[None]), (0, 0, 0, 0, 0, job.frame_num - 1))
                condition_latent = vae_encode(c, padded[None].to(device))
                motion_latent = vae_encode(c, motion[None].to(device))
            y = torch.cat([condition_mask, condition_latent], 1)
            step_cache = (
                StepCache(job.step_cache_threshold, self._cache_coefficients(job)) if job.step_cache_threshold else None
            )
            denoiser = GuidedDenoiser(
                c.transformer,
                scales,
                text,
                negative_text,
                image_states.to(device),
                audio[:, :, clip_start : clip_start + job.frame_num].to(device),
                masks,
                apg=APGState() if job.use_apg else None,
                step_cache=step_cache,
            )

            def velocity(latent: torch.Tensor, t: torch.Tensor, denoiser=denoiser, y=y) -> torch.Tensor:
                return denoiser(torch.cat([latent, y.to(latent.dtype)], 1), t)

            def check_cancelled(step: int, clip: int = clip_index) -> None:
                if cancelled is not None and cancelled():
                    raise GenerationCancelled(f"cancelled at clip {clip + 1}, step {step + 1}")

            def report(step: int, clip: int = clip_index) -> None:
                if progress is not None:
                    progress(Progress(clip + 1, len(starts), step + 1, job.steps))

            latent = torch.randn(1, *latent_shape, generator=generator).to(device)
            with self._on_device(c.transformer):
                latent = denoise_clip(latent, motion_latent, timesteps, velocity, check_cancelled, report)
            if step_cache is not None:
                cache_computed, cache_skipped = cache_computed + step_cache.computed, cache_skipped + step_cache.skipped

            with self._on_device(c.vae):
                video = vae_decode(c, latent)[0].float().clamp(-1, 1).cpu()  # [3, F, H, W]
            clip_frames = _to_uint8(video.permute(1, 2, 3, 0))
            if job.color_correction > 0:  # towards the first reference frame, in every clip (as the reference)
                clip_frames = match_colors(clip_frames, references[0], job.color_correction)
            frames.append(clip_frames if clip_index == 0 else clip_frames[job.motion_frames :])
            motion = _pixels(clip_frames[-job.motion_frames :])
        total = cache_computed + cache_skipped
        return np.concatenate(frames)[: prepared.num_frames], (cache_skipped / total if total else 0.0)


__all__ = [
    "InfiniteTalkPipeline",
    "audio_frames_needed",
    "denoise_clip",
    "paste_clean",
    "reference_frame_indices",
    "video_frame_count",
]
