"""Generation: a reference image, one audio stream per person and a prompt -> a talking video with its sound.

    pipeline = MultiTalkPipeline.from_model_dir("models/multitalk", device="cuda", dtype=torch.bfloat16)
    result = pipeline.generate(load_job("job.json"), "video.mp4")

Everything that can be wrong with a job (image, audio, boxes, lengths) is checked in `prepare` before any model
runs. Sampling follows the reference MultiTalk pipeline: shifted flow-matching Euler steps, text + audio guidance,
and in streaming mode clip after clip, each conditioned on the last motion frames of the previous one (re-noised
and pasted into the latent at every step) and colour-matched to the reference image.

A long job streams: each clip's frames go to the video encoder as the clip is decoded (memory holds one clip, not
the video), and a `ClipStore` given to `generate` keeps every finished clip with what the next one needs
(`ClipState`), so that a retry after a crash resumes after the last finished clip, with the same video.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import resample_poly

from .audio import (
    SAMPLE_RATE,
    VIDEO_FPS,
    AudioError,
    compose_persons,
    load_audio_track,
    loudness_normalize,
    mix_tracks,
    to_mono_16k,
)
from .color import match_colors
from .components import MultiTalkComponents, encode_image, encode_prompt, load_components, vae_decode, vae_encode
from .conditioning import condition_channels, given_latent_frames, paste_given_frames
from .config import get_preset
from .faces import FaceDetector, build_face_detector
from .guidance import TEACACHE_COEFFICIENTS, APGState, GuidanceScales, GuidedDenoiser, StepCache
from .jobs import GenerationJob
from .lora import merge_lora
from .media import MediaError, load_image, write_video
from .offload import offload_transformer_blocks
from .quantization import Quantization, quantize_transformer
from .regions import (
    Box,
    default_halves,
    draw_regions_preview,
    locate_persons,
    reference_resize_masks,
    region_masks,
    resize_and_center_crop,
    target_size,
    validate_box,
)
from .sampling import euler_step, shifted_timesteps
from .wav2vec import audio_windows

logger = logging.getLogger(__name__)


class GenerationError(ValueError):
    """A job that cannot be generated; the message names the field and the problem."""


class GenerationCancelled(RuntimeError):
    """The caller's cancellation check fired between two steps."""


@dataclass(frozen=True)
class Progress:
    clip: int  # 1-based
    clips: int
    step: int  # steps done in this clip
    steps: int

    @property
    def percent(self) -> float:
        return 100.0 * ((self.clip - 1) * self.steps + self.step) / (self.clips * self.steps)


@dataclass(frozen=True)
class ClipState:
    """Where a job stands after one of its clips: everything the clips after it depend on."""

    clip: int  # 0-based index of the finished clip
    clips: int  # clips of the job
    motion: np.ndarray  # its last motion_frames frames, uint8 [m, H, W, 3]: the next clip is conditioned on them
    noise_state: torch.Tensor  # the job's noise generator after the clip (all clips draw from one, seeded once)
    cache_computed: int  # step-cache forwards computed and skipped up to this clip
    cache_skipped: int


class ClipStore(Protocol):
    """Keeps a job's finished clips, so that a retry resumes after the last one instead of starting over (serving
    keeps them with the job in its storage: serving/clips.py)."""

    def last(self) -> ClipState | None:
        """The state after the last finished clip; None when no clip is stored."""

    def frames(self, clip: int) -> np.ndarray:
        """The new frames of a finished clip, uint8 [n, H, W, 3] (as `MultiTalkPipeline.stream` yielded them)."""

    def save(self, state: ClipState, frames: np.ndarray) -> None:
        """Stores a finished clip: its state and its new frames."""


@dataclass
class PreparedJob:
    """A validated job with its inputs decoded: what sampling needs, and nothing loaded twice."""

    job: GenerationJob
    image: np.ndarray  # resized and centre-cropped to (height, width), uint8 RGB
    boxes: list[Box]  # person regions in source pixels
    region_source: str  # "boxes", "faces", "faces+halves" or "halves"
    masks: np.ndarray  # [P + 1, height, width] person regions then background, aligned with `image`
    speech: list[np.ndarray]  # per person, 16 kHz mono at -23 LUFS, laid out by audio_type
    mix: np.ndarray  # the original-quality mix [channels, samples] for the output
    mix_rate: int
    num_frames: int  # video frames the output will have

    @property
    def num_persons(self) -> int:
        return len(self.speech)


@dataclass(frozen=True)
class GenerationResult:
    path: Path
    num_frames: int
    duration_s: float
    clips: int
    boxes: list[Box]
    region_source: str
    seconds: float
    step_cache_skipped: float  # share of pass forwards the step cache skipped (0 without it)
    resumed_clips: int  # clips a retry took from its ClipStore instead of generating them


@dataclass(frozen=True)
class _JobConditions:
    """What every clip of a job is conditioned on."""

    clip_texts: list[torch.Tensor]  # per clip [1, text_len, text_dim]: the prompt in force at the clip's first frame
    negative_text: torch.Tensor
    audio: torch.Tensor  # [1, P, frames, window, layers, channels] for the whole job
    region_masks: torch.Tensor | None  # [1, P + 1, h, w] on the latent grid; None for one person


@dataclass(frozen=True)
class _ClipCondition:
    """One clip's given frames, encoded."""

    given_frames: int  # video frames given: 1 (the reference image) or the motion frames of the previous clip
    image_states: torch.Tensor  # CLIP of the last given frame [1, 257, image_dim]
    latent: torch.Tensor  # VAE latent of the given frames then grey frames [1, C, T, h, w]
    paste: bool  # whether the given frames are also pasted into the noisy latent (every clip but the first)


@dataclass(frozen=True)
class _StepHooks:
    """The caller's cancellation check before each step and progress report after it."""

    clip: int  # 1-based
    clips: int
    steps: int
    progress: Callable[[Progress], None] | None
    cancelled: Callable[[], bool] | None

    def before(self, step: int) -> None:
        if self.cancelled is not None and self.cancelled():
            raise GenerationCancelled(f"cancelled at clip {self.clip}, step {step + 1}")

    def after(self, step: int) -> None:
        if self.progress is not None:
            self.progress(Progress(self.clip, self.clips, step + 1, self.steps))


def plan_clips(num_frames: int, frame_num: int, motion_frames: int, streaming: bool) -> list[int]:
    """Start frame of each clip: one clip, or clips advancing by frame_num - motion_frames until the audio ends."""
    if not streaming:
        return [0]
    starts, stride = [0], frame_num - motion_frames
    while starts[-1] + frame_num < num_frames:
        starts.append(starts[-1] + stride)
    return starts


class MultiTalkPipeline:
    family = "multitalk"  # the model family this sampler is for (components.FAMILIES)

    def __init__(
        self,
        components: MultiTalkComponents,
        device: str | torch.device = "cpu",
        face_detector: FaceDetector | None = None,
        low_memory: bool = False,
        attention_backend: str | None = None,
        quantization: Quantization = "none",
        compile_blocks: bool = False,
        text_encoder_on_cpu: bool = False,
    ) -> None:
        """low_memory keeps the transformer's blocks on the CPU, each onloaded while it runs (diffusers' group
        offloading), and every other component on the CPU, moved to `device` only while it runs. quantization:
        torchao int8 / fp8 weights of the blocks' linear layers (quantization.py). compile_blocks: regional
        torch.compile, each block compiled once for all (`compile_repeated_blocks`). attention_backend: a diffusers
        attention dispatcher backend (flash, sage, native, ...). text_encoder_on_cpu: umT5 stays on the CPU and
        encodes the prompts there (the reference's --t5_cpu): its weights (11 GB for umT5-XXL) never take device
        memory, the prompt states move to `device`."""
        self.components = components
        self.device = torch.device(device)
        self.low_memory = low_memory
        self.text_encoder_on_cpu = text_encoder_on_cpu
        if text_encoder_on_cpu:
            components.text_encoder.to("cpu")
        self._face_detector = face_detector
        transformer = components.transformer
        quantize_transformer(transformer, quantization)
        if low_memory:
            offload_transformer_blocks(transformer, self.device)
        self._job_loras: tuple[tuple[str, float], ...] = ()  # merged for the current job
        self._weights_without_job_loras: dict[str, torch.Tensor] | None = None  # on the CPU, once one is merged
        if attention_backend is not None:
            transformer.set_attention_backend(attention_backend)
        if compile_blocks:
            transformer.compile_repeated_blocks(fullgraph=True)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        loras: list[tuple[str | Path, float]] = (),
        **kwargs,
    ) -> MultiTalkPipeline:
        """Loads a model directory (see components.py) into the pipeline of its family; LoRAs are merged."""
        low_memory = kwargs.get("low_memory", False)
        text_encoder_device = "cpu" if kwargs.get("text_encoder_on_cpu", False) else None
        components = load_components(
            model_dir, device="cpu" if low_memory else device, dtype=dtype, text_encoder_device=text_encoder_device
        )
        for path, scale in loras:
            merge_lora(components.transformer, path, scale)
        from .infinitetalk import InfiniteTalkPipeline  # its module builds on this one

        pipeline_class = {"multitalk": MultiTalkPipeline, "infinitetalk": InfiniteTalkPipeline}[components.family]
        return pipeline_class(components, device=device, **kwargs)

    # ----------------------------------------------------------------------------------------------- validation

    def prepare(self, job: GenerationJob) -> PreparedJob:
        """Checks and decodes every input of a job; raises GenerationError naming the field before any model work."""
        try:
            job = job.for_family(self.family)
        except ValueError as error:
            raise GenerationError(str(error)) from None
        source = self._load_source(job)
        source_hw = source.shape[:2]
        num_persons = len(job.persons)

        if all(person.box is not None for person in job.persons):
            boxes = [person.box for person in job.persons]
            for index, box in enumerate(boxes):
                try:
                    validate_box(box, source_hw, f"persons.{index}.box")
                except ValueError as error:
                    raise GenerationError(str(error)) from None
            region_source = "boxes"
        elif num_persons == 1:
            boxes, region_source = [(0.0, 0.0, float(source_hw[1]), float(source_hw[0]))], "whole image"
        elif job.regions == "halves":
            boxes, region_source = default_halves(source_hw, num_persons), "halves"
        else:
            boxes, region_source = locate_persons(source, num_persons, self.face_detector)
            if region_source != "faces":
                logger.warning(
                    "person regions for %s: %s (face detection did not find every person)", job.source, region_source
                )

        for index, (path, _) in enumerate(job.loras):
            if not Path(path).is_file():
                raise GenerationError(f"loras.{index}: no such file {path}")
        height, width = job.resolution or target_size(*source_hw, job.size)
        image = resize_and_center_crop(source, (height, width))
        masks = region_masks(boxes, source_hw) if num_persons > 1 else np.ones((2, *source_hw), np.float32)
        if region_source == "halves" and job.regions == "halves":  # asked for the reference's masks: its geometry
            masks = reference_resize_masks(masks, (height, width))
        else:
            masks = np.stack(
                [resize_and_center_crop(mask[..., None], (height, width), nearest=True)[..., 0] for mask in masks]
            )

        originals = _load_person_audio(job)
        speech = [loudness_normalize(to_mono_16k(samples, rate)) for samples, rate in originals]
        speech = compose_persons(speech, job.audio_type)
        mix, mix_rate = _original_mix(originals, job.audio_type)

        num_frames = int(len(speech[0]) / SAMPLE_RATE * VIDEO_FPS)
        if job.mode == "clip":
            num_frames = min(num_frames, job.frame_num)
        num_frames = min(num_frames, int(job.max_duration_s * VIDEO_FPS))
        if num_frames < 1:
            raise GenerationError(f"persons: the audio lasts {len(speech[0]) / SAMPLE_RATE:.3f} s, less than one frame")
        return PreparedJob(job, image, boxes, region_source, masks, speech, mix, mix_rate, num_frames)

    def _load_source(self, job: GenerationJob) -> np.ndarray:
        """The image the person regions are found on and the video starts from, uint8 RGB [H, W, 3]."""
        if job.video is not None:
            raise GenerationError(
                f"video: dubbing a video needs an InfiniteTalk model; this model directory's family is {self.family}"
            )
        try:
            return load_image(job.image)
        except MediaError as error:
            raise GenerationError(f"image: {error}") from None

    @property
    def face_detector(self) -> FaceDetector:
        if self._face_detector is None:
            self._face_detector = build_face_detector("auto")
        return self._face_detector

    # ------------------------------------------------------------------------------------------------ sampling

    def generate(
        self,
        job: GenerationJob,
        out_path: str | Path,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        preview_path: str | Path | None = None,
        clip_store: ClipStore | None = None,
    ) -> GenerationResult:
        """Generates the video of a job into out_path (mp4, 25 fps, H.264 + AAC of the original audio mix).

        Each clip's frames are encoded as soon as it is decoded. With a clip_store, every finished clip is saved
        there, and the clips it already holds (an earlier attempt's) are encoded from it and not generated again.
        """
        start = time.perf_counter()
        prepared = self.prepare(job)
        if preview_path is not None:
            draw_regions_preview(self._load_source(prepared.job), prepared.boxes, preview_path)
        resume = clip_store.last() if clip_store is not None else None
        last = resume

        def clip_frames() -> Iterator[np.ndarray]:
            nonlocal last
            for clip in range(resume.clip + 1 if resume is not None else 0):
                yield clip_store.frames(clip)
            for state, frames in self.stream(prepared, progress, cancelled, resume):
                if clip_store is not None:
                    clip_store.save(state, frames)
                last = state
                yield frames
                del frames  # encoded: freed before the next clip is generated

        samples = round(prepared.num_frames / VIDEO_FPS * prepared.mix_rate)
        path = write_video(out_path, clip_frames(), VIDEO_FPS, prepared.mix[:, :samples], prepared.mix_rate)
        cache_forwards = last.cache_computed + last.cache_skipped
        return GenerationResult(
            path=Path(path),
            num_frames=prepared.num_frames,
            duration_s=prepared.num_frames / VIDEO_FPS,
            clips=last.clips,
            boxes=prepared.boxes,
            region_source=prepared.region_source,
            seconds=time.perf_counter() - start,
            step_cache_skipped=last.cache_skipped / cache_forwards if cache_forwards else 0.0,
            resumed_clips=0 if resume is None else resume.clip + 1,
        )

    def sample(
        self,
        prepared: PreparedJob,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, float]:
        """The job's frames, uint8 [num_frames, H, W, 3], and the share of forwards the step cache skipped (the
        whole video in memory: `generate` streams it instead)."""
        states, frames = zip(*self.stream(prepared, progress, cancelled), strict=True)
        last = states[-1]
        total = last.cache_computed + last.cache_skipped
        return np.concatenate(frames), (last.cache_skipped / total if total else 0.0)

    def stream(
        self,
        prepared: PreparedJob,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        resume: ClipState | None = None,
    ) -> Iterator[tuple[ClipState, np.ndarray]]:
        """The job's clips one at a time: each one's state and its new frames, uint8 [n, H, W, 3] (the first clip's
        all, later ones' after their motion frames, the last one's up to the job's length). From the clip after
        `resume` when given: the same clips as an uninterrupted run, as the noise generator resumes where it was.

        Clip after clip: encode its condition (the reference, then the previous clip's last motion frames), denoise
        its latent, decode it. Nothing of a clip outlives the next one but its motion frames.
        """
        job = prepared.job
        with torch.no_grad():
            self._use_job_loras(job.loras)
            starts = plan_clips(prepared.num_frames, job.frame_num, job.motion_frames, job.mode == "streaming")
            conditions = self._job_conditions(prepared, starts, self._audio_frames_needed(prepared, starts))
            clip_condition = self._clip_conditioner(prepared, starts)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        motion, first, cache_computed, cache_skipped = None, 0, 0, 0
        if resume is not None:
            if resume.clips != len(starts) or not 0 <= resume.clip < len(starts):
                raise ValueError(
                    f"resume: clip {resume.clip + 1} of {resume.clips}, but the job has {len(starts)} clips"
                )
            generator.set_state(resume.noise_state)
            motion, first = resume.motion, resume.clip + 1
            cache_computed, cache_skipped = resume.cache_computed, resume.cache_skipped
        # No torch.no_grad() around the yields: its generator wrapper would keep the last clip alive.
        for clip_index in range(first, len(starts)):
            with torch.no_grad():
                clip = clip_condition(clip_index, motion)
                latent, computed, skipped = self._sample_clip(
                    job, clip, clip_index, starts, conditions, generator, progress, cancelled
                )
                clip_frames = self._decode_clip(latent, prepared)
            cache_computed, cache_skipped = cache_computed + computed, cache_skipped + skipped
            new_from = 0 if clip_index == 0 else starts[clip_index] + job.motion_frames  # the video's frame index
            new_frames = clip_frames if clip_index == 0 else clip_frames[job.motion_frames :]
            motion = clip_frames[-job.motion_frames :].copy()  # a copy: the rest of the clip is freed with it
            state = ClipState(clip_index, len(starts), motion, generator.get_state(), cache_computed, cache_skipped)
            del clip, latent, clip_frames
            yield state, new_frames[: prepared.num_frames - new_from]
            del new_frames  # the caller is done with them: only the motion frames outlive the clip

    def _audio_frames_needed(self, prepared: PreparedJob, starts: list[int]) -> int:
        """Audio feature frames the clips read: up to the end of the last clip."""
        return starts[-1] + prepared.job.frame_num

    def _clip_conditioner(
        self, prepared: PreparedJob, starts: list[int]
    ) -> Callable[[int, np.ndarray | None], _ClipCondition]:
        """(clip index, the previous clip's motion frames or None for the first) -> the clip's encoded condition:
        the reference image for the first clip, the motion frames (pasted into the latent too) for later ones."""
        job = prepared.job

        def encode(clip_index: int, motion: np.ndarray | None) -> _ClipCondition:
            given = _to_pixels(prepared.image)[:, None] if motion is None else _to_pixels(motion)
            return self._encode_clip_condition(given, job.frame_num, paste=clip_index > 0)

        return encode

    def _sample_clip(
        self,
        job: GenerationJob,
        clip: _ClipCondition,
        clip_index: int,
        starts: list[int],
        conditions: _JobConditions,
        generator: torch.Generator,
        progress: Callable[[Progress], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> tuple[torch.Tensor, int, int]:
        """One clip denoised from noise on its audio window and prompt: its latent, and the forwards the step cache
        computed and skipped. Each family's sampler chooses the clip's condition; this part is common to both."""
        clip_start = starts[clip_index]
        audio = conditions.audio[:, :, clip_start : clip_start + job.frame_num]
        threshold = job.step_cache_threshold
        step_cache = StepCache(threshold, self._cache_coefficients(job)) if threshold else None
        hooks = _StepHooks(clip_index + 1, len(starts), job.steps, progress, cancelled)
        text = conditions.clip_texts[clip_index]
        latent = self._denoise_clip(job, clip, text, conditions, audio, step_cache, generator, hooks)
        if step_cache is None:
            return latent, 0, 0
        return latent, step_cache.computed, step_cache.skipped

    def _job_conditions(self, prepared: PreparedJob, starts: list[int], frames_needed: int) -> _JobConditions:
        """What the clips of a job are conditioned on: the encoded prompts (a prompt schedule gives each clip the
        prompt in force at its first frame; each text is encoded once), the audio features and the region masks."""
        components, job = self.components, prepared.job
        clip_prompts = [job.prompt_at(start / VIDEO_FPS) for start in starts]
        texts = list(dict.fromkeys([*clip_prompts, job.negative_prompt]))
        with self._on_device(components.text_encoder):
            encoded = dict(zip(texts, encode_prompt(components, texts, self.device).split(1), strict=True))
        return _JobConditions(
            clip_texts=[encoded[prompt] for prompt in clip_prompts],
            negative_text=encoded[job.negative_prompt],
            audio=self._audio_features(prepared, frames_needed),
            region_masks=self._latent_masks(prepared.masks) if prepared.num_persons > 1 else None,
        )

    def _encode_clip_condition(self, condition: torch.Tensor, frame_num: int, paste: bool) -> _ClipCondition:
        """A clip's condition from its given frames [3, n, H, W] in [-1, 1]: CLIP of the last, VAE of them all."""
        components = self.components
        given_frames = condition.shape[1]
        with self._on_device(components.image_encoder):
            image_states = encode_image(components, _to_uint8(condition[:, -1]))
        with self._on_device(components.vae):
            padded = F.pad(condition, (0, 0, 0, 0, 0, frame_num - given_frames))  # grey frames after the given ones
            latent = vae_encode(components, padded[None].to(self.device))
        return _ClipCondition(given_frames, image_states.to(self.device), latent, paste)

    def _denoise_clip(
        self,
        job: GenerationJob,
        clip: _ClipCondition,
        text: torch.Tensor,
        conditions: _JobConditions,
        audio: torch.Tensor,
        step_cache: StepCache | None,
        generator: torch.Generator,
        hooks: _StepHooks,
    ) -> torch.Tensor:
        """Runs the guided Euler steps of one clip from noise; the given frames are pasted before and after each."""
        components = self.components
        timesteps = shifted_timesteps(job.steps, job.resolved_shift).to(self.device)
        denoiser = GuidedDenoiser(
            components.transformer,
            GuidanceScales(text=job.text_guidance, audio=job.audio_guidance),
            text,
            conditions.negative_text,
            clip.image_states,
            audio.to(self.device),
            conditions.region_masks,
            apg=APGState() if job.use_apg else None,
            step_cache=step_cache,
        )
        latent = torch.randn(clip.latent.shape, generator=generator).to(self.device)
        channels = condition_channels(clip.latent, clip.given_frames).to(latent.dtype)
        with self._on_device(components.transformer):
            latent = self._paste_given_frames(latent, clip, timesteps[0], generator)
            for step in range(job.steps):
                hooks.before(step)
                velocity = denoiser(torch.cat([latent, channels], 1), timesteps[step])
                latent = euler_step(latent, velocity, timesteps[step], timesteps[step + 1])
                latent = self._paste_given_frames(latent, clip, timesteps[step + 1], generator)
                hooks.after(step)
        return latent

    def _decode_clip(self, latent: torch.Tensor, prepared: PreparedJob) -> np.ndarray:
        """A clip's latent -> uint8 frames [F, H, W, 3], colour-matched to the reference image when asked."""
        with self._on_device(self.components.vae):
            video = vae_decode(self.components, latent)[0].float().clamp(-1, 1).cpu()  # [3, F, H, W]
        frames = _to_uint8(video.permute(1, 2, 3, 0))
        if prepared.job.color_correction > 0:
            frames = match_colors(frames, prepared.image, prepared.job.color_correction)
        return frames

    def _use_job_loras(self, loras: list[tuple[str, float]]) -> None:
        """Makes the transformer's weights the loaded ones plus exactly `loras`. Switching happens only when a job
        asks for other LoRAs than the previous one; the first switch keeps a CPU copy of the loaded weights, so
        that going back restores them exactly (subtracting a delta would not, in bfloat16)."""
        loras = tuple((str(path), float(scale)) for path, scale in loras)
        if loras == self._job_loras:
            return
        transformer = self.components.transformer
        with torch.no_grad():
            if self._weights_without_job_loras is None:
                self._weights_without_job_loras = {
                    name: value.detach().to("cpu", copy=True) for name, value in transformer.state_dict().items()
                }
            else:
                self._restore_loaded_weights()
        self._job_loras = ()
        try:
            for path, scale in loras:
                merge_lora(transformer, path, scale)
        except (OSError, ValueError) as error:
            self._restore_loaded_weights()
            raise GenerationError(f"loras: {path}: {error}") from None
        self._job_loras = loras

    @torch.no_grad()
    def _restore_loaded_weights(self) -> None:
        for name, value in self.components.transformer.state_dict().items():
            value.copy_(self._weights_without_job_loras[name])

    def _cache_coefficients(self, job: GenerationJob) -> tuple[float, ...] | None:
        """The reference's fitted TeaCache polynomial for the 14B model at this size; raw change for other models."""
        if self.components.config != get_preset("multitalk-14b"):
            return None
        return TEACACHE_COEFFICIENTS["multitalk-480" if job.size == "480p" else "multitalk-720"]

    def _audio_features(self, prepared: PreparedJob, frames_needed: int) -> torch.Tensor:
        """[1, P, frames_needed, window, layers, channels]: per-person wav2vec features, reflected past the end."""
        c = self.components
        speech_frames = int(len(prepared.speech[0]) / SAMPLE_RATE * VIDEO_FPS)
        # A clip longer than the audio still needs features for every frame: audio shorter than one clip is padded
        # with silence, not rejected.
        minimum = math.ceil(prepared.job.frame_num / VIDEO_FPS * SAMPLE_RATE)
        features = []
        with self._on_device(c.audio_encoder.model):
            for track in prepared.speech:
                track = np.pad(track, (0, max(0, minimum - len(track))))
                frames = max(speech_frames, int(len(track) / SAMPLE_RATE * VIDEO_FPS))
                encoded = c.audio_encoder(track, frames)
                features.append(audio_windows(_reflect_to(encoded, frames_needed), c.config.audio_window))
        return torch.stack(features)[None].to(self.components.transformer.dtype)

    def _latent_masks(self, masks: np.ndarray) -> torch.Tensor:
        """Pixel masks [P + 1, H, W] -> the latent grid [1, P + 1, H / s, W / s] (nearest, as the reference)."""
        pixels = torch.from_numpy(masks)[None].float()
        spatial = self.components.vae.config.scale_factor_spatial
        return F.interpolate(pixels, scale_factor=1 / spatial, mode="nearest").to(self.device)

    @staticmethod
    def _paste_given_frames(latent, clip: _ClipCondition, t, generator) -> torch.Tensor:
        """Later clips overwrite their motion frames' latents with the clean ones re-noised to time t; the first
        clip is conditioned on the reference image through the condition channels alone, as in the reference."""
        if not clip.paste:
            return latent
        shape = (*clip.latent.shape[:2], given_latent_frames(clip.given_frames), *clip.latent.shape[3:])
        noise = torch.randn(shape, generator=generator)
        return paste_given_frames(latent, clip.latent, clip.given_frames, t, noise)

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[None]:
        """In low-memory mode, moves a component to the device for the duration of its work, then back (the
        transformer's blocks move by themselves; a text encoder kept on the CPU stays there)."""
        kept_on_cpu = self.text_encoder_on_cpu and module is self.components.text_encoder
        if not self.low_memory or module is self.components.transformer or kept_on_cpu:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _load_person_audio(job: GenerationJob) -> list[tuple[np.ndarray, int]]:
    """Each person's audio (samples [channels, n], rate); a silent person gets zeros as long as the longest other
    track, as the reference gives a "None" person zeros of the other person's length."""
    loaded: dict[int, tuple[np.ndarray, int]] = {}
    for index, person in enumerate(job.persons):
        if person.audio is None:
            continue
        try:
            loaded[index] = load_audio_track(person.audio)
        except AudioError as error:
            raise GenerationError(f"persons.{index}.audio: {error}") from None
    samples, rate = max(loaded.values(), key=lambda track: track[0].shape[1] / track[1])
    silence = (np.zeros((1, samples.shape[1]), np.float32), rate)
    return [loaded.get(index, silence) for index in range(len(job.persons))]


def _original_mix(originals: list[tuple[np.ndarray, int]], audio_type: str) -> tuple[np.ndarray, int]:
    """The persons' original tracks laid out like the speech, at the highest rate and channel count among them."""
    rate = max(r for _, r in originals)
    channels = max(samples.shape[0] for samples, _ in originals)
    tracks = []
    for samples, track_rate in originals:
        if track_rate != rate:
            divisor = math.gcd(rate, track_rate)
            samples = resample_poly(samples, rate // divisor, track_rate // divisor, axis=1).astype(np.float32)
        if samples.shape[0] < channels:
            samples = np.repeat(samples[:1], channels, axis=0)
        tracks.append(samples)
    mix = mix_tracks(compose_persons(tracks, audio_type))
    peak = np.abs(mix).max(initial=0.0)
    return (mix / peak if peak > 1.0 else mix), rate  # simultaneous speakers may sum past full scale


def _reflect_to(features: torch.Tensor, frames: int) -> torch.Tensor:
    """Extends [T, ...] features to `frames` by reflecting the end, as the reference pads the last clip."""
    while features.shape[0] < frames:
        missing = frames - features.shape[0]
        features = torch.cat([features, features.flip(0)[:missing]])
    return features[:frames]


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels in [-1, 1] (channels last, or [3, H, W]) -> uint8, channels last."""
    if pixels.ndim == 3 and pixels.shape[0] == 3:
        pixels = pixels.permute(1, 2, 0)
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames, channels last ([H, W, 3] or [F, H, W, 3]) -> float pixels in [-1, 1], channels first."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1
    return pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels.permute(3, 0, 1, 2)
