"""Label Rotary Position Embedding (L-RoPE): binds each audio stream to the video tokens of its person.

Audio tokens of person i carry the centre label of person i's band; each video token carries a label inside the
band of the person it attends to most (or the background label), so the 1D rotary embedding of the audio
cross-attention makes a token's affinity to an audio stream depend on whether both share a band.

Bands are kept well apart: person i owns [20 i, 20 i + 4] (audio label 20 i + 2) and the background sits at 12,
between the first two persons. Adjacent bands (0-4, 4-8, ...) are known to break the binding.
"""

from __future__ import annotations

import torch

BAND_SPACING = 20.0
BAND_WIDTH = 4.0
BACKGROUND_LABEL = 12.0
ROPE_BASE = 10000.0


def person_band(person: int) -> tuple[float, float]:
    """The label band [low, high] of person `person` (0-based)."""
    low = BAND_SPACING * person
    return low, low + BAND_WIDTH


def audio_labels(num_persons: int, tokens_per_person: int, device: torch.device | None = None) -> torch.Tensor:
    """Labels of one latent frame's audio tokens: persons concatenated in order, each at its band centre."""
    centres = torch.tensor([sum(person_band(p)) / 2 for p in range(num_persons)], device=device)
    return centres.repeat_interleave(tokens_per_person)


def video_labels(class_scores: torch.Tensor) -> torch.Tensor:
    """Per-token labels from the localisation scores.

    class_scores: [B, L, P + 1], how much each video token attends to each person's region and (last) the
    background. Each token takes the class with the highest score; a person's score is min-max scaled over all
    tokens of the sample into that person's band, the background is the constant BACKGROUND_LABEL.
    """
    num_persons = class_scores.shape[-1] - 1
    scores = class_scores.float()
    person_scores = scores[..., :num_persons]
    low = person_scores.amin(dim=1, keepdim=True)
    high = person_scores.amax(dim=1, keepdim=True)
    bands = torch.tensor([person_band(p) for p in range(num_persons)], device=scores.device)
    scaled = (person_scores - low) / (high - low + 1e-8) * (bands[:, 1] - bands[:, 0]) + bands[:, 0]
    background = torch.full_like(scores[..., :1], BACKGROUND_LABEL)
    labels = torch.cat([scaled, background], dim=-1)
    return labels.gather(-1, scores.argmax(dim=-1, keepdim=True)).squeeze(-1)


def apply_label_rope(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1D rotary embedding by (fractional) label on interleaved pairs, computed in fp32.

    x: [B, S, H, D]; labels: [B, S] or [S]. Pair (x[2i], x[2i+1]) rotates by label * base^(-2i/D), the
    convention of the original implementation. A label of 0 is the identity.
    """
    head_dim = x.shape[-1]
    freqs = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim)
    angles = labels.float()[..., None] * freqs  # [B, S, D/2] or [S, D/2]
    angles = angles[..., None, :]  # broadcast over heads
    cos, sin = angles.cos(), angles.sin()
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1).flatten(-2)
    return rotated.type_as(x)
