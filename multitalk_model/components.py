"""The parts of a MultiTalk model, loaded from one local model directory, and the encoders the pipeline calls.

A model directory is a diffusers-format Wan2.1-I2V folder plus the audio parts:

    model_index.json        diffusers' pipeline index (names the component classes); its "family" says which
                            sampler the audio weights were trained for: "multitalk" (the default) or "infinitetalk"
    text_encoder/           UMT5EncoderModel (umT5-XXL)
    tokenizer/              its tokenizer (anything AutoTokenizer loads)
    image_encoder/          CLIPVisionModel (ViT-H/14; a CLIPVisionModelWithProjection checkpoint loads too)
    image_processor/        CLIPImageProcessor (its image_mean / image_std normalise the frame CLIP sees)
    vae/                    AutoencoderKLWan
    scheduler/              the diffusers scheduler config saved with it (FlowMatchEulerDiscrete, UniPCMultistep, ...)
    wav2vec2/               Wav2Vec2Model + Wav2Vec2FeatureExtractor (chinese-wav2vec2-base)
    transformer/            one of three forms:
        (1) a MultiTalkTransformer3DModel saved with save_pretrained (its config.json holds the audio fields):
            what `build_tiny` and training exports write; self-contained, the audio files below are not read.
        (2) diffusers' plain Wan2.1-I2V transformer (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers), completed by the
            official-format audio weights below.
        (3) the original-format Wan2.1-I2V folder (Wan-AI/Wan2.1-I2V-14B-480P: WanModel config.json,
            diffusion_pytorch_model-*.safetensors + index json), or a link to it, with the audio weights below or
            among its own shards. Only its transformer is read: its T5/CLIP/VAE .pth files are not, so the encoders
            must still be the diffusers-format folders above. Its image width is the image encoder's hidden size.
    multitalk.safetensors   official-format audio weights (MultiTalk; InfiniteTalk's file has the same keys), or
    multitalk.json          {"audio_weights": path (relative to this folder; default "multitalk.safetensors"),
                             "audio_config": {MultiTalkConfig audio fields, e.g. "audio_channels": 768}}: for forms
                            (2) and (3), whose config.json does not record the audio branch (default: the released
                            MultiTalk's).

Loading reads local paths only, never a hub. The VAE, the image encoder and wav2vec2 run in float32, as the
reference does; the transformer loads shard by shard in the requested dtype, its norms, time embedding and
modulation kept in float32 as diffusers keeps them.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffusers
import ftfy
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerBase,
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
)
from transformers.image_processing_utils import BaseImageProcessor

from .checkpoints import build_model, load_weights
from .config import AUDIO_FIELDS, WAN_FIXED_ARGS, MultiTalkConfig
from .transformer import MultiTalkTransformer3DModel
from .wav2vec import Wav2VecEncoder

SUBFOLDERS = (
    "text_encoder",
    "tokenizer",
    "image_encoder",
    "image_processor",
    "vae",
    "scheduler",
    "transformer",
    "wav2vec2",
)
LAYOUT = "a MultiTalk model directory holds model_index.json and " + ", ".join(f"{name}/" for name in SUBFOLDERS)
AUDIO_WEIGHTS = "multitalk.safetensors"
# Model families: one transformer and weight layout, trained for different samplers (generation.py, infinitetalk.py).
FAMILIES = ("multitalk", "infinitetalk")
AUDIO_MANIFEST = "multitalk.json"
TransformerForm = Literal["multitalk", "wan", "original"]  # forms (1), (2) and (3) of the module docstring
_KEY_FORMATS: dict[str, str] = {"multitalk": "diffusers", "wan": "diffusers", "original": "original"}


@dataclass
class ConditionEncoders:
    """The frozen encoders of the conditions, as generation and training both use them (see `load_encoders`)."""

    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    image_encoder: CLIPVisionModel
    image_processor: BaseImageProcessor
    text_len: int  # umT5 context length the transformer reads


@dataclass
class MultiTalkComponents(ConditionEncoders):
    """Everything one MultiTalk generation needs; of the scheduler, the pipeline reads only the config."""

    transformer: MultiTalkTransformer3DModel
    audio_encoder: Wav2VecEncoder
    scheduler: SchedulerMixin
    config: MultiTalkConfig
    family: str = "multitalk"  # which sampler the audio weights were trained for: one of FAMILIES


def load_encoders(
    model_dir: str | Path,
    device: str | torch.device,
    dtype: torch.dtype,
    text_len: int,
    text_encoder_device: str | torch.device | None = None,
) -> ConditionEncoders:
    """The frozen condition encoders of a model directory: the VAE and CLIP in float32 (as the reference), umT5 in
    `dtype` on `text_encoder_device` (default `device`). Training and generation load them here, so both see the
    same conditions."""
    model_dir = Path(model_dir)
    vae = AutoencoderKLWan.from_pretrained(model_dir / "vae", torch_dtype=torch.float32, local_files_only=True)
    text_encoder = UMT5EncoderModel.from_pretrained(model_dir / "text_encoder", dtype=dtype, local_files_only=True)
    image_encoder = CLIPVisionModel.from_pretrained(
        model_dir / "image_encoder", dtype=torch.float32, local_files_only=True
    )
    text_encoder_device = text_encoder_device or device
    for module, on in ((vae, device), (text_encoder, text_encoder_device), (image_encoder, device)):
        module.requires_grad_(False).eval().to(on)
    return ConditionEncoders(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True),
        image_encoder=image_encoder,
        image_processor=CLIPImageProcessor.from_pretrained(model_dir / "image_processor", local_files_only=True),
        text_len=text_len,
    )


def load_components(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder_device: str | torch.device | None = None,
) -> MultiTalkComponents:
    """Loads a model directory (layout in the module docstring); the text encoder may live on its own device."""
    model_dir = Path(model_dir)
    _check_layout(model_dir)
    family = model_family(model_dir)
    text_config = UMT5Config.from_pretrained(model_dir / "text_encoder", local_files_only=True)
    image_config = CLIPVisionConfig.from_pretrained(model_dir / "image_encoder", local_files_only=True)
    audio_config = Wav2Vec2Config.from_pretrained(model_dir / "wav2vec2", local_files_only=True)
    config, sources = _transformer_source(model_dir, image_dim=image_config.hidden_size)
    # Fail before loading any weights when an encoder's width does not fit the transformer.
    mismatches = [
        f"{found_in} is {found} but transformer/ has {field} {getattr(config, field)}"
        for found_in, found, field in [
            ("text_encoder/ d_model", text_config.d_model, "text_dim"),
            ("image_encoder/ hidden_size", image_config.hidden_size, "image_dim"),
            ("wav2vec2/ hidden_size", audio_config.hidden_size, "audio_channels"),
            ("wav2vec2/ num_hidden_layers", audio_config.num_hidden_layers, "audio_layers"),
        ]
        if found != getattr(config, field)
    ]
    if mismatches:
        raise ValueError(f"{model_dir}: the encoders do not fit the transformer: " + "; ".join(mismatches))

    transformer = load_weights(build_model(config, "meta"), sources, dtype=dtype, device=device)
    encoders = load_encoders(model_dir, device, dtype, config.text_len, text_encoder_device)
    return MultiTalkComponents(
        **vars(encoders),
        transformer=transformer.eval(),
        audio_encoder=Wav2VecEncoder.from_pretrained(model_dir / "wav2vec2", device=device, dtype=torch.float32),
        scheduler=load_scheduler(model_dir / "scheduler"),
        config=config,
        family=family,
    )


def transformer_form(model_dir: str | Path) -> TransformerForm:
    """Which of the three forms of the module docstring a model directory's transformer/ is, from its config.json."""
    config_file = Path(model_dir) / "transformer" / "config.json"
    values = _read_json(config_file)
    class_name = values.get("_class_name")
    if class_name == MultiTalkTransformer3DModel.__name__:
        return "multitalk"
    if class_name == "WanTransformer3DModel":
        return "wan"
    if "dim" in values and "num_heads" in values:
        return "original"
    raise ValueError(
        f"{config_file}: _class_name {class_name!r} is neither MultiTalkTransformer3DModel, WanTransformer3DModel "
        "nor an original-format WanModel config"
    )


def transformer_weights(model_dir: str | Path) -> tuple[Path, str]:
    """The base transformer's weights of a model directory as a `load_weights` source: (transformer/, key format)."""
    return Path(model_dir) / "transformer", _KEY_FORMATS[transformer_form(model_dir)]


def model_family(model_dir: str | Path) -> str:
    """The family model_index.json names ("multitalk" when it names none); any other value is an error."""
    index_file = Path(model_dir) / "model_index.json"
    family = _read_json(index_file).get("family", "multitalk")
    if family not in FAMILIES:
        raise ValueError(f"{index_file}: family {family!r} is not one of {', '.join(FAMILIES)}")
    return family


@torch.no_grad()
def encode_prompt(components: ConditionEncoders, prompts: list[str], device: str | torch.device) -> torch.Tensor:
    """umT5 states of the prompts, [B, text_len, text_dim] on `device`, zero past each prompt's tokens.

    As diffusers' WanImageToVideoPipeline._get_t5_prompt_embeds: prompts cleaned (ftfy, HTML entities, whitespace),
    tokenised with end-of-sequence and padded or truncated to text_len (512); the text encoder's dtype is kept.
    """
    text_len = components.text_len
    tokens = components.tokenizer(
        [_clean_prompt(prompt) for prompt in prompts],
        padding="max_length",
        max_length=text_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    encoder = components.text_encoder
    mask = tokens.attention_mask.to(encoder.device)
    states = encoder(tokens.input_ids.to(encoder.device), mask).last_hidden_state
    # umT5 leaves states at the padding positions; Wan (the reference and diffusers) feeds zeros there.
    return states.masked_fill(~mask.bool()[..., None], 0.0).to(device)


@torch.no_grad()
def encode_image(components: ConditionEncoders, image: np.ndarray) -> torch.Tensor:
    """CLIP states of one RGB uint8 image [H, W, 3]: the penultimate layer [1, 257, image_dim].

    The whole frame, as the reference's CLIPModel.visual feeds it (wan/modules/clip.py): the frame as a [-1, 1]
    tensor squashed to the encoder's square input by bicubic interpolation (no crop: a wide two-person frame keeps
    both persons, a portrait keeps head and feet), mapped back to [0, 1] and normalised with the processor's CLIP
    mean and std.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} of shape {list(image.shape)}")
    encoder, processor = components.image_encoder, components.image_processor
    side = encoder.config.image_size
    frame = (torch.tensor(image).permute(2, 0, 1)[None].float() / 255 - 0.5) * 2  # [1, 3, H, W] in [-1, 1]
    frame = F.interpolate(frame, size=(side, side), mode="bicubic", align_corners=False)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    pixels = (frame * 0.5 + 0.5 - mean) / std
    outputs = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype), output_hidden_states=True)
    return outputs.hidden_states[-2]


@torch.no_grad()
def vae_encode(components: ConditionEncoders, video: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, F, H, W] in [-1, 1] -> normalised posterior mean [B, 16, (F - 1) / 4 + 1, H / 8, W / 8]."""
    vae = components.vae
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, F, H, W], got shape {list(video.shape)}")
    frames, height, width = video.shape[2:]
    if (frames - 1) % temporal or height % spatial or width % spatial:
        raise ValueError(
            f"video of {frames} frames of {height}x{width}: the VAE needs {temporal}n+1 frames and sides "
            f"divisible by {spatial}"
        )
    latent = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
    mean, inverse_std = _latent_statistics(vae, latent)
    return (latent - mean) * inverse_std


@torch.no_grad()
def vae_decode(components: ConditionEncoders, latent: torch.Tensor) -> torch.Tensor:
    """Normalised latent [B, 16, T, h, w] -> video [B, 3, 4 (T - 1) + 1, 8 h, 8 w] in [-1, 1]: vae_encode's inverse."""
    vae = components.vae
    latent = latent.to(vae.device, vae.dtype)
    mean, inverse_std = _latent_statistics(vae, latent)
    return vae.decode(latent / inverse_std + mean, return_dict=False)[0]


def _latent_statistics(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and 1 / std, shaped to broadcast over [B, C, T, H, W] (as diffusers)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inverse_std


def _clean_prompt(text: str) -> str:
    """diffusers' Wan prompt_clean (the reference's too): fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def _check_layout(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory; {LAYOUT}")
    missing = [model_dir / "model_index.json"] if not (model_dir / "model_index.json").is_file() else []
    missing += [model_dir / name for name in SUBFOLDERS if not (model_dir / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{', '.join(map(str, missing))}: missing; {LAYOUT}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return values


def _transformer_source(model_dir: Path, image_dim: int) -> tuple[MultiTalkConfig, list[tuple[Path, str]]]:
    """The architecture and the weight sources ((path, key format) pairs) of transformer/, in any of its forms."""
    transformer_dir, key_format = transformer_weights(model_dir)
    config_file = transformer_dir / "config.json"
    values = _read_json(config_file)
    form = transformer_form(model_dir)
    if form == "multitalk":  # self-contained: its config.json holds exactly MultiTalkConfig's fields
        fields = {key: value for key, value in values.items() if not key.startswith("_")}
        return _checked(config_file, MultiTalkConfig.from_dict, fields), [(transformer_dir, key_format)]

    audio_weights, audio_config = _audio_weights(model_dir)
    if form == "wan":
        if audio_weights is None:
            raise FileNotFoundError(
                f"{model_dir / AUDIO_WEIGHTS}: missing; a diffusers Wan2.1 transformer/ needs the official audio "
                f"weights there or at the path {AUDIO_MANIFEST} names"
            )
        config = _config_from_wan(values, config_file, audio_config)
        return config, [(transformer_dir, key_format), (audio_weights, "original")]
    # Original format: the audio weights may be among its own shards. It fixes the CLIP (ViT-H/14) and so never
    # records its width.
    config = _checked(config_file, MultiTalkConfig.from_reference, values)
    config = dataclasses.replace(config, image_dim=image_dim, **audio_config)
    sources = [(transformer_dir, key_format)]
    return config, sources + ([(audio_weights, "original")] if audio_weights else [])


def _checked(config_file: Path, read: Any, values: dict[str, Any]) -> MultiTalkConfig:
    """`read(values)`, its errors naming the file."""
    try:
        return read(values)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: {error}") from error


def _audio_weights(model_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """The official-format audio weights beside a base transformer (None if absent) and the audio fields to use."""
    manifest = model_dir / AUDIO_MANIFEST
    if not manifest.is_file():
        weights = model_dir / AUDIO_WEIGHTS
        return (weights if weights.is_file() else None), {}
    values = _read_json(manifest)
    unknown = sorted(set(values) - {"audio_weights", "audio_config"})
    if unknown:
        raise ValueError(f"{manifest}: unknown keys {unknown}; known: audio_weights, audio_config")
    audio_config = values.get("audio_config", {})
    unknown = sorted(set(audio_config) - set(AUDIO_FIELDS))
    if unknown:
        raise ValueError(f"{manifest}: audio_config has unknown fields {unknown}; known: {', '.join(AUDIO_FIELDS)}")
    weights = model_dir / values.get("audio_weights", AUDIO_WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (the audio weights {manifest} names)")
    return weights, audio_config


def _config_from_wan(values: dict[str, Any], path: Path, audio_config: dict[str, Any]) -> MultiTalkConfig:
    """MultiTalkConfig from the config.json of a diffusers Wan transformer plus the audio fields."""
    values = {key: value for key, value in values.items() if not key.startswith("_")}
    for key, supported in WAN_FIXED_ARGS.items():
        value = values.pop(key, supported)
        if value != supported:
            raise ValueError(f"{path}: {key}={value!r} is not supported (Wan2.1-I2V has {supported!r})")
    added_kv_proj_dim = values.pop("added_kv_proj_dim", None)
    if values.get("image_dim") is None or added_kv_proj_dim is None:
        raise ValueError(f"{path}: not an image-to-video transformer (image_dim and added_kv_proj_dim must be set)")
    config = _checked(path, MultiTalkConfig.from_dict, {**values, **audio_config})
    if added_kv_proj_dim != config.dim:
        raise ValueError(f"{path}: added_kv_proj_dim {added_kv_proj_dim} must equal the model width {config.dim}")
    return config


def load_scheduler(scheduler_dir: Path) -> SchedulerMixin:
    """The scheduler class its config names, from diffusers."""
    config_file = scheduler_dir / "scheduler_config.json"
    class_name = _read_json(config_file).get("_class_name")
    scheduler_class = getattr(diffusers, str(class_name), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise ValueError(f"{config_file}: _class_name {class_name!r} is not a diffusers scheduler")
    return scheduler_class.from_pretrained(scheduler_dir, local_files_only=True)


__all__ = [
    "FAMILIES",
    "ConditionEncoders",
    "MultiTalkComponents",
    "encode_image",
    "encode_prompt",
    "load_components",
    "load_encoders",
    "load_scheduler",
    "transformer_form",
    "transformer_weights",
    "model_family",
    "vae_decode",
    "vae_encode",
]
