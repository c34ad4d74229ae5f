"""Typed configuration of the MultiTalk transformer and its presets.

`MultiTalkConfig` is the one description of an architecture: the model is built from it, the FLOP and parameter
accounting reads it, and `from_reference` reads the constructor config of the original implementation (the
`config` metadata of the golden files, the `config.json` of the released checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# Arguments of diffusers' WanTransformer3DModel that MultiTalkConfig does not carry, with the only value supported.
WAN_FIXED_ARGS: dict[str, Any] = {"qk_norm": "rms_norm_across_heads", "pos_embed_seq_len": None}


def _audio_field(default: Any) -> Any:
    """A field of the audio branch: a diffusers Wan config.json does not record it (see `AUDIO_FIELDS`)."""
    return field(default=default, metadata={"audio_branch": True})


# The constructor arguments of the reference WanModel (MeiGen-AI/MultiTalk and InfiniteTalk,
# wan/modules/multitalk_model.py) with their defaults there: a config.json may leave any of them out.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "model_type": "i2v",
    "patch_size": (1, 2, 2),
    "text_len": 512,
    "in_dim": 16,
    "dim": 2048,
    "ffn_dim": 8192,
    "freq_dim": 256,
    "text_dim": 4096,
    "out_dim": 16,
    "num_heads": 16,
    "num_layers": 32,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
    "audio_window": 5,
    "intermediate_dim": 512,
    "output_dim": 768,
    "context_tokens": 32,
    "vae_scale": 4,
    "norm_input_visual": True,
    "norm_output_audio": True,
    "weight_init": True,  # initialisation only: no effect on loaded weights
}


@dataclass(frozen=True)
class MultiTalkConfig:
    """Wan2.1-I2V diffusion transformer plus the MultiTalk audio branch."""

    num_layers: int = 40
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    image_dim: int = 1280  # CLIP vision hidden size (ViT-H/14: 1280)
    in_channels: int = 36  # 16 noisy latent + 4 mask + 16 condition latent
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    # Audio branch. The adapter reads, per video frame, a window of `audio_window` wav2vec frames of
    # `audio_layers` stacked hidden states of size `audio_channels`.
    audio_window: int = _audio_field(5)
    audio_layers: int = _audio_field(12)
    audio_channels: int = _audio_field(768)
    audio_intermediate_dim: int = _audio_field(512)
    audio_dim: int = _audio_field(768)  # size of one audio context token
    audio_tokens: int = _audio_field(32)  # audio context tokens per latent frame and person
    vae_scale: int = _audio_field(4)  # video frames per latent frame (temporal VAE stride)
    norm_input_visual: bool = _audio_field(True)  # LayerNorm before the audio cross-attention
    norm_output_audio: bool = _audio_field(True)  # LayerNorm on the adapter's tokens
    text_len: int = 512  # umT5 context length; diffusers' Wan attention splits image/text tokens by it

    def __post_init__(self) -> None:
        if self.audio_window % 2 != 1:
            raise ValueError(f"audio_window must be odd (a window centred on the frame), got {self.audio_window}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for rotary embeddings, got {self.attention_head_dim}")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def wan_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of diffusers' WanTransformer3DModel for the base (image-to-video) model."""
        wan = {name: value for name, value in self.to_dict().items() if name not in AUDIO_FIELDS and name != "text_len"}
        # I2V: the image tokens get their own key/value projections, of the model width.
        return {**wan, **WAN_FIXED_ARGS, "added_kv_proj_dim": self.dim}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MultiTalkConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MultiTalkConfig fields: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_reference(cls, reference: dict[str, Any] | str) -> MultiTalkConfig:
        """Reads the original implementation's constructor config (WanModel of MeiGen-AI/MultiTalk): every argument
        it takes, each missing one at its default there (a released Wan2.1-I2V config.json records only some).
        Keys starting with "_" (diffusers' _class_name, _diffusers_version) are metadata and ignored."""
        given = json.loads(reference) if isinstance(reference, str) else dict(reference)
        unknown = sorted(key for key in given if not key.startswith("_") and key not in REFERENCE_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown WanModel arguments {unknown}; known: {', '.join(REFERENCE_DEFAULTS)}")
        ref = {**REFERENCE_DEFAULTS, **{key: value for key, value in given.items() if not key.startswith("_")}}
        if ref["model_type"] != "i2v":
            raise ValueError(f"MultiTalk is an image-to-video model; config has model_type={ref['model_type']!r}")
        if not ref["qk_norm"]:
            raise ValueError("configs without qk_norm are not supported (every released Wan2.1-I2V model has it)")
        if tuple(ref["window_size"]) != (-1, -1):
            raise ValueError(f"local attention windows are not supported, config has window_size={ref['window_size']}")
        dim, heads = ref["dim"], ref["num_heads"]
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {heads}")
        return cls(
            num_layers=ref["num_layers"],
            num_attention_heads=heads,
            attention_head_dim=dim // heads,
            ffn_dim=ref["ffn_dim"],
            freq_dim=ref["freq_dim"],
            text_dim=ref["text_dim"],
            in_channels=ref["in_dim"],
            out_channels=ref["out_dim"],
            patch_size=tuple(ref["patch_size"]),
            cross_attn_norm=ref["cross_attn_norm"],
            eps=ref["eps"],
            audio_window=ref["audio_window"],
            audio_intermediate_dim=ref["intermediate_dim"],
            audio_dim=ref["output_dim"],
            audio_tokens=ref["context_tokens"],
            vae_scale=ref["vae_scale"],
            norm_input_visual=ref["norm_input_visual"],
            norm_output_audio=ref["norm_output_audio"],
            text_len=ref["text_len"],
        )

    def to_reference(self) -> dict[str, Any]:
        """The original implementation's constructor config for this architecture."""
        return {
            "model_type": "i2v",
            "patch_size": list(self.patch_size),
            "text_len": self.text_len,
            "in_dim": self.in_channels,
            "dim": self.dim,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "text_dim": self.text_dim,
            "out_dim": self.out_channels,
            "num_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "window_size": [-1, -1],
            "qk_norm": True,
            "cross_attn_norm": self.cross_attn_norm,
            "eps": self.eps,
            "audio_window": self.audio_window,
            "intermediate_dim": self.audio_intermediate_dim,
            "output_dim": self.audio_dim,
            "context_tokens": self.audio_tokens,
            "vae_scale": self.vae_scale,
            "norm_input_visual": self.norm_input_visual,
            "norm_output_audio": self.norm_output_audio,
        }


# MultiTalkConfig fields of the audio branch: what a base Wan2.1 config.json lacks and multitalk.json may set.
AUDIO_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(MultiTalkConfig) if f.metadata.get("audio_branch")
)


def check_clip_frames(value: int, *, minimum: int = 5) -> int:
    """A frame count of 4n + 1 (at least `minimum`): the VAE folds 4 frames into one latent frame after the first.

    Every clip length (generation jobs, curation windows, training samples) and the motion frames are checked here.
    """
    if value < minimum or value % 4 != 1:
        raise ValueError(f"must be 4n + 1 and at least {minimum} (the VAE's temporal stride), got {value}")
    return value


PRESETS: dict[str, MultiTalkConfig] = {
    # CPU tests and the demo: a few hundred thousand parameters, with a tiny wav2vec2 (12 layers of 32).
    "tiny": MultiTalkConfig(
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=16,
        ffn_dim=128,
        freq_dim=32,
        text_dim=32,
        image_dim=32,
        audio_channels=32,
        audio_intermediate_dim=32,
        audio_dim=48,
        audio_tokens=4,
    ),
    # CPU benchmarks: big enough that attention and the linears dominate a step (dim 512, 4 layers), 64-token prompts.
    "cpu-bench": MultiTalkConfig(
        num_layers=4,
        num_attention_heads=8,
        attention_head_dim=64,
        ffn_dim=1408,
        freq_dim=256,
        text_dim=256,
        image_dim=256,
        audio_channels=64,
        audio_intermediate_dim=128,
        audio_dim=256,
        audio_tokens=8,
        text_len=64,
    ),
    # Wan2.1-I2V-14B-480P + MultiTalk audio (chinese-wav2vec2-base: 12 layers of 768).
    "multitalk-14b": MultiTalkConfig(),
}


def get_preset(name: str) -> MultiTalkConfig:
    """The named preset; the error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


__all__ = ["AUDIO_FIELDS", "MultiTalkConfig", "PRESETS", "WAN_FIXED_ARGS", "check_clip_frames", "get_preset"]
