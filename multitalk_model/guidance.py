"""Text + audio classifier-free guidance for one denoising step: passes, combination, APG and a step cache.

Passes (as the reference wan/multitalk.py runs them):
    cond        text,          every audio stream
    drop_text   negative text, every audio stream
    uncond      negative text, one silent stream
    drop_audio  text,          one silent stream      (only when the text scale is 1: 2 passes per step)

The reference's null audio is a single zero stream, so the silent passes take the single-person path (no
localisation, no L-RoPE) even for multi-person clips. `GuidedDenoiser` runs all passes of a step in one batched
transformer forward: the transformer's `audio_streams` gives each sample its own stream count with the same
result as separate forwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .transformer import BlockStackInputs, MultiTalkTransformer3DModel

# Polynomials (highest degree first) that rescale the relative change of the timestep projection into an
# estimate of the output's change: the reference's TeaCache coefficients for this signal (its use_ret_steps mode),
# by resolution bucket. Fitted for Wan2.1; they mean nothing for other weights (tiny models use the raw change).
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "multitalk-480": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "multitalk-720": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}

_SILENT_PASSES = frozenset({"uncond", "drop_audio"})
_NEGATIVE_TEXT_PASSES = frozenset({"drop_text", "uncond"})


@dataclass(frozen=True)
class GuidanceScales:
    """Guidance strengths: text 1 switches to the 2-pass (cond, drop_audio) scheme of the few-step LoRAs."""

    text: float = 5.0
    audio: float = 4.0


def guidance_passes(scales: GuidanceScales) -> list[str]:
    """The passes one step runs, in batch order."""
    if math.isclose(scales.text, 1.0):
        return ["cond", "drop_audio"]
    return ["cond", "drop_text", "uncond"]


@dataclass
class APGState:
    """Adaptive projected guidance (arXiv 2410.02416) with its momentum buffers, one per guidance difference.

    The buffers carry over the steps of one clip: start a new state for every clip, as the reference does.
    """

    momentum: float = -0.75
    norm_threshold: float = 55.0
    eta: float = 0.0
    running: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def update(self, name: str, diff: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor:
        """APG of one guidance difference `[B, ...]`, per sample (the reference's adaptive_projected_guidance)."""
        if name in self.running:
            diff = diff + self.momentum * self.running[name]
        self.running[name] = diff
        dims = tuple(range(1, diff.ndim))
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(diff), self.norm_threshold / norm)
        # Split off the component along the conditional prediction, in float64 as the reference does.
        direction = F.normalize(pred_cond.double().flatten(1), dim=1).view_as(pred_cond)
        parallel = (diff.double() * direction).sum(dim=dims, keepdim=True) * direction
        orthogonal = diff.double() - parallel
        return orthogonal.to(diff.dtype) + self.eta * parallel.to(diff.dtype)


def combine(preds: dict[str, torch.Tensor], scales: GuidanceScales, apg: APGState | None = None) -> torch.Tensor:
    """The guided velocity from the passes' predictions (keyed by pass name)."""
    expected = guidance_passes(scales)
    if sorted(preds) != sorted(expected):
        raise ValueError(f"guidance scales {scales} need predictions for {expected}, got {sorted(preds)}")
    cond = preds["cond"]
    if "drop_audio" in preds:
        drop_audio = preds["drop_audio"]
        if apg is None:
            return drop_audio + scales.audio * (cond - drop_audio)
        return cond + (scales.audio - 1) * apg.update("audio", cond - drop_audio, cond)
    drop_text, uncond = preds["drop_text"], preds["uncond"]
    if apg is None:
        return uncond + scales.text * (cond - drop_text) + scales.audio * (drop_text - uncond)
    # e_u + s_t (e_c - e_dt) + s_a (e_dt - e_u) rewritten around e_c, with each difference through APG.
    return (
        cond
        + (scales.text - 1) * apg.update("text", cond - drop_text, cond)
        + (scales.audio - 1) * apg.update("audio", drop_text - uncond, cond)
    )


@dataclass
class _PassCacheState:
    calls: int = 0
    accumulated: float = 0.0
    previous_signal: torch.Tensor | None = None
    residual: torch.Tensor | None = None


class StepCache:
    """TeaCache-style reuse of the block stack's residual (output - input), one state per guidance pass.

    Each pass accumulates, step after step, the relative L1 change of its timestep projection (the blocks'
    modulation input, the signal of the reference's TeaCache), rescaled by `coefficients` (a polynomial, highest
    degree first; None keeps the raw change, the default for tiny and CPU models, which have no fitted
    polynomial). While the sum stays below `threshold` the pass skips the blocks and adds its own cached residual;
    otherwise it runs them and restarts the sum. The first `warmup_steps` steps always run. States are keyed by
    pass name, so 2- and 3-pass guidance both stay consistent (the reference counts calls modulo 3 instead).
    Use one cache per clip.
    """

    def __init__(self, threshold: float, coefficients: Sequence[float] | None = None, warmup_steps: int = 5) -> None:
        if threshold < 0:
            raise ValueError(f"step cache threshold must be >= 0, got {threshold}")
        if warmup_steps < 1:
            raise ValueError(f"step cache warmup_steps must be >= 1 (the first step fills it), got {warmup_steps}")
        self.threshold = threshold
        self.warmup_steps = warmup_steps
        self._rescale = np.poly1d(coefficients) if coefficients else None
        self._states: dict[str, _PassCacheState] = {}
        self.computed = 0
        self.skipped = 0

    @property
    def passes(self) -> list[str]:
        """The passes the cache holds a state for."""
        return list(self._states)

    @property
    def skipped_fraction(self) -> float:
        """Share of the pass forwards so far whose blocks were skipped."""
        total = self.computed + self.skipped
        return self.skipped / total if total else 0.0

    def must_compute(self, name: str, signal: torch.Tensor) -> bool:
        """Records this step's signal for a pass; whether its blocks must run (else `reuse` its residual)."""
        state = self._states.setdefault(name, _PassCacheState())
        previous, state.previous_signal = state.previous_signal, signal.detach().float().clone()
        state.calls += 1
        if state.calls <= self.warmup_steps or state.residual is None:
            return True
        change = ((state.previous_signal - previous).abs().mean() / previous.abs().mean()).item()
        state.accumulated += float(self._rescale(change)) if self._rescale is not None else change
        return state.accumulated >= self.threshold

    def store(self, name: str, residual: torch.Tensor) -> None:
        """Keeps the residual of a pass whose blocks ran, and restarts its accumulated change."""
        state = self._states[name]
        state.residual = residual
        state.accumulated = 0.0
        self.computed += 1

    def reuse(self, name: str) -> torch.Tensor:
        """The cached residual of a pass whose blocks are skipped."""
        self.skipped += 1
        return self._states[name].residual


class GuidedDenoiser:
    """The guided velocity of one clip's denoising steps: all guidance passes of a step in one transformer forward.

    Conditions are per clip, batch 1: text / negative_text `[1, L, text_dim]`, image `[1, 257, image_dim]`, audio
    `[1, P, F, window, layers, channels]`, region_masks `[1, P + 1, H, W]` (needed when P > 1). With
    `batched=False` the passes run one after another with the reference's own inputs (a single zero stream for
    the silent passes). `apg` and `step_cache` keep state across steps: give each clip fresh ones.
    """

    def __init__(
        self,
        model: MultiTalkTransformer3DModel,
        scales: GuidanceScales,
        text: torch.Tensor,
        negative_text: torch.Tensor,
        image: torch.Tensor,
        audio: torch.Tensor,
        region_masks: torch.Tensor | None = None,
        apg: APGState | None = None,
        step_cache: StepCache | None = None,
        batched: bool = True,
    ) -> None:
        for name, tensor in (("text", text), ("negative_text", negative_text), ("image", image), ("audio", audio)):
            if tensor.shape[0] != 1:
                raise ValueError(f"GuidedDenoiser takes one clip: {name} has batch size {tensor.shape[0]}")
        if audio.ndim != 6:
            raise ValueError(f"audio must be [1, P, F, window, layers, channels], got shape {tuple(audio.shape)}")
        if audio.shape[1] > 1 and region_masks is None:
            raise ValueError(f"{audio.shape[1]} audio streams need region_masks [1, {audio.shape[1] + 1}, H, W]")
        self.model = model
        self.scales = scales
        self.passes = guidance_passes(scales)
        self.apg = apg
        self.step_cache = step_cache
        dtype = model.dtype
        texts = {"text": text.to(dtype), "negative": negative_text.to(dtype)}
        groups = [self.passes] if batched else [[name] for name in self.passes]
        self._groups = [
            (group, self._group_conditions(group, texts, image.to(dtype), audio.to(dtype), region_masks))
            for group in groups
        ]

    @torch.no_grad()
    def __call__(self, latent_input: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """The guided velocity (float32, `[1, out_channels, T, H, W]`) for the latent + condition channels at t."""
        latent_input = latent_input.to(self.model.dtype)
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=latent_input.device).reshape(1)
        preds: dict[str, torch.Tensor] = {}
        for group, conditions in self._groups:
            size = len(group)
            inputs = self.model.embed(latent_input.expand(size, -1, -1, -1, -1), timestep.expand(size), **conditions)
            velocity = self.model.finalize(self._run_blocks(group, inputs), inputs).float()
            preds.update(zip(group, velocity.split(1), strict=False))
        return combine(preds, self.scales, self.apg)

    def _run_blocks(self, group: list[str], inputs: BlockStackInputs) -> torch.Tensor:
        if self.step_cache is None:
            return self.model.run_blocks(inputs)
        # Every pass sees the same latent and timestep, so their decisions agree in practice; when they do not,
        # the whole batch runs (running is always exact) and every pass refreshes its residual.
        decisions = [self.step_cache.must_compute(name, inputs.timestep_proj[i]) for i, name in enumerate(group)]
        if not any(decisions):
            residual = torch.cat([self.step_cache.reuse(name) for name in group])
            return inputs.hidden_states + residual
        hidden_states = self.model.run_blocks(inputs)
        for name, residual in zip(group, (hidden_states - inputs.hidden_states).split(1), strict=False):
            self.step_cache.store(name, residual)
        return hidden_states

    @staticmethod
    def _group_conditions(
        group: list[str],
        texts: dict[str, torch.Tensor],
        image: torch.Tensor,
        audio: torch.Tensor,
        region_masks: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        """Transformer keyword arguments for a batch of passes, in group order."""
        size, persons = len(group), audio.shape[1]
        if size == 1 and group[0] in _SILENT_PASSES:  # alone: exactly the reference's single zero stream
            audio_batch, masks, streams = torch.zeros_like(audio[:, :1]), None, None
        else:
            # A silent pass keeps P (zero) streams but uses only the first: the same result as one zero stream.
            audio_batch = torch.cat([torch.zeros_like(audio) if name in _SILENT_PASSES else audio for name in group])
            masks = region_masks.expand(size, -1, -1, -1) if region_masks is not None else None
            counts = [1 if name in _SILENT_PASSES else persons for name in group]
            streams = torch.tensor(counts, device=audio.device) if min(counts) < persons else None
        pass_texts = [texts["negative" if name in _NEGATIVE_TEXT_PASSES else "text"] for name in group]
        # The transformer zero-pads the text to text_len, so padding to a common length first changes nothing.
        length = max(text.shape[1] for text in pass_texts)
        text_batch = torch.cat([F.pad(text, (0, 0, 0, length - text.shape[1])) for text in pass_texts])
        return {
            "encoder_hidden_states": text_batch,
            "encoder_hidden_states_image": image.expand(size, -1, -1),
            "audio": audio_batch,
            "region_masks": masks,
            "audio_streams": streams,
        }


__all__ = [
    "APGState",
    "GuidanceScales",
    "GuidedDenoiser",
    "StepCache",
    "TEACACHE_COEFFICIENTS",
    "combine",
    "guidance_passes",
]
