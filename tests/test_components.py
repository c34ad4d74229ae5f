"""Model directories: the tiny one build_tiny writes, the three transformer forms, and the encoders on top."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from safetensors.torch import save_file

from multitalk_model.checkpoints import _original_name, build_model, export_audio_weights
from multitalk_model.components import (
    AUDIO_FIELDS,
    encode_image,
    encode_prompt,
    load_components,
    vae_decode,
    vae_encode,
)
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.fixtures.tiny_model import main as build_tiny_main
from multitalk_model.transformer import model_kwargs
from multitalk_model.wav2vec import audio_windows

TINY = get_preset("tiny")
TINY_AUDIO_CONFIG = {field: getattr(TINY, field) for field in AUDIO_FIELDS}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def components(tiny_dir):
    return load_components(tiny_dir)


@pytest.fixture(scope="module")
def diffusers_wan(components) -> WanImageToVideoPipeline:
    """diffusers' own Wan I2V pipeline over the same encoders: the behaviour the helpers must match."""
    return WanImageToVideoPipeline(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        vae=components.vae,
        scheduler=components.scheduler,
        image_processor=components.image_processor,
        image_encoder=components.image_encoder,
    )


def linked_model_dir(tiny_dir: Path, root: Path, leave_out: set[str]) -> Path:
    """A model directory sharing the tiny one's parts, except those left out."""
    root.mkdir()
    for entry in tiny_dir.iterdir():
        if entry.name not in leave_out:
            (root / entry.name).symlink_to(entry)
    return root


def transformer_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, TINY.in_channels, 2, 4, 4, generator=gen),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 9, TINY.text_dim, generator=gen),
        "encoder_hidden_states_image": torch.randn(1, 257, TINY.image_dim, generator=gen),
        "audio": torch.randn(1, 1, 5, TINY.audio_window, TINY.audio_layers, TINY.audio_channels, generator=gen),
    }


def test_build_tiny_writes_identical_files_for_a_seed(tiny_dir, tmp_path):
    build_tiny_main(["--out", str(tmp_path / "again"), "--seed", "0"])
    again = tmp_path / "again"
    files = sorted(path.relative_to(tiny_dir) for path in tiny_dir.rglob("*") if path.is_file())
    assert Path("transformer/diffusion_pytorch_model.safetensors") in files
    assert files == sorted(path.relative_to(again) for path in again.rglob("*") if path.is_file())
    for name in files:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_tiny_components_feed_each_other_with_the_documented_shapes(components):
    assert components.config == TINY
    assert components.scheduler.config.shift == 7.0
    text = encode_prompt(components, ["a woman talking to the camera"], "cpu")
    image = encode_image(components, np.full((96, 128, 3), 127, dtype=np.uint8))
    latent = vae_encode(components, torch.rand(1, 3, 5, 64, 64) * 2 - 1)
    assert text.shape == (1, 512, 32) and image.shape == (1, 257, 32) and latent.shape == (1, 16, 2, 8, 8)

    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    features = components.audio_encoder(wave, num_frames=5)  # [5, 12, 32]
    audio = audio_windows(features, TINY.audio_window)[None, None]
    mask = torch.zeros(1, 4, *latent.shape[2:])
    hidden_states = torch.cat([torch.randn_like(latent), mask, latent], dim=1)
    with torch.no_grad():
        velocity = components.transformer(hidden_states, torch.tensor([999.0]), text, image, audio).sample
    assert velocity.shape == latent.shape

    video = vae_decode(components, velocity)
    assert video.shape == (1, 3, 5, 64, 64)
    assert video.min() >= -1 and video.max() <= 1


def test_encode_prompt_matches_diffusers_and_zeroes_states_past_each_prompt(components, diffusers_wan):
    prompts = ["a man talking to the camera", "  two &amp;amp; people,\n café  "]
    embeds = encode_prompt(components, prompts, "cpu")
    with torch.no_grad():
        expected = diffusers_wan._get_t5_prompt_embeds(prompts, max_sequence_length=512, device="cpu")
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)

    cleaned = ["a man talking to the camera", "two & people, café"]
    lengths = [len(components.tokenizer(prompt).input_ids) for prompt in cleaned]
    assert (embeds != 0).any(-1).sum(1).tolist() == lengths
    # A prompt's states do not depend on the other prompts of its batch (the padding is masked).
    torch.testing.assert_close(encode_prompt(components, prompts[1:], "cpu")[0], embeds[1], rtol=1e-5, atol=1e-6)


def test_encode_image_matches_diffusers_penultimate_clip_layer_on_a_frame_of_clips_size(components, diffusers_wan):
    # diffusers' Wan crops the centre of other frames; encode_image squashes the whole frame as the reference
    # does (tests/test_reference_inputs.py). At CLIP's own size neither resizes: same layer, same normalisation.
    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = diffusers_wan.encode_image(PIL.Image.fromarray(image), device="cpu")
    torch.testing.assert_close(encode_image(components, image), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        encode_image(components, image.astype(np.float32))


def test_vae_encode_normalises_like_diffusers_and_vae_decode_inverts_it(components, diffusers_wan):
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        _, condition = diffusers_wan.prepare_latents(image, 1, 16, 16, 16, 5, torch.float32, "cpu")
    video = torch.cat([image[:, :, None], image.new_zeros(1, 3, 4, 16, 16)], dim=2)
    torch.testing.assert_close(vae_encode(components, video), condition[:, 4:], rtol=0, atol=0)  # after the mask

    latent = torch.randn(1, 16, 1, 2, 2)
    vae = components.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        expected = vae.decode(latent * std + mean).sample
    torch.testing.assert_close(vae_decode(components, latent), expected)

    with pytest.raises(ValueError, match="4n\\+1 frames"):
        vae_encode(components, video[:, :, :4])


def write_diffusers_wan(model, transformer_dir: Path) -> None:
    """Form (2): diffusers' plain Wan transformer holding the base weights."""
    base_kwargs = {k: v for k, v in model_kwargs(TINY).items() if k not in AUDIO_FIELDS and k != "text_len"}
    wan = WanTransformer3DModel(**base_kwargs)
    wan.load_state_dict({k: v for k, v in model.state_dict().items() if k in wan.state_dict()}, strict=True)
    wan.save_pretrained(transformer_dir)


def write_original_wan(model, transformer_dir: Path) -> None:
    """Form (3): an original-format Wan2.1 folder (WanModel config.json, named shards + index) with the base weights."""
    transformer_dir.mkdir()
    audio = set(model.audio_parameter_names())
    base = {_original_name(k)[0]: v.contiguous() for k, v in model.state_dict().items() if k not in audio}
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    save_file(base, str(transformer_dir / shard))
    index = {"metadata": {}, "weight_map": {key: shard for key in base}}
    (transformer_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (transformer_dir / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY.to_reference()}))


@pytest.mark.parametrize(
    ("write_base", "audio_weights"),
    [
        (write_diffusers_wan, None),  # the audio weights at the default place, multitalk.safetensors
        (write_diffusers_wan, "weights/infinitetalk.safetensors"),
        (write_original_wan, None),
    ],
    ids=["diffusers-wan", "diffusers-wan-named-audio-file", "original-wan"],
)
def test_base_wan_plus_official_audio_weights_loads_the_same_multitalk_model(
    tiny_dir, tmp_path, write_base, audio_weights
):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = build_model(TINY, "cpu").eval()
    model_dir = linked_model_dir(tiny_dir, tmp_path / "model", leave_out={"transformer"})
    write_base(model, model_dir / "transformer")
    manifest = {"audio_config": TINY_AUDIO_CONFIG}
    if audio_weights:
        manifest["audio_weights"] = audio_weights
    export_audio_weights(model, model_dir / (audio_weights or "multitalk.safetensors"))
    (model_dir / "multitalk.json").write_text(json.dumps(manifest))

    loaded = load_components(model_dir)
    assert loaded.config == TINY
    inputs = transformer_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.transformer(**inputs).sample, model(**inputs).sample)


def test_missing_subfolder_is_named(tiny_dir, tmp_path):
    model_dir = linked_model_dir(tiny_dir, tmp_path / "model", leave_out={"vae"})
    with pytest.raises(FileNotFoundError, match=r"model/vae: missing; a MultiTalk model directory holds"):
        load_components(model_dir)


def test_diffusers_wan_without_audio_weights_is_refused(tiny_dir, tmp_path):
    model_dir = linked_model_dir(tiny_dir, tmp_path / "model", leave_out={"transformer"})
    write_diffusers_wan(build_model(TINY, "cpu"), model_dir / "transformer")
    with pytest.raises(FileNotFoundError, match=r"multitalk.safetensors: missing; a diffusers Wan2.1 transformer/"):
        load_components(model_dir)


def test_encoder_that_does_not_fit_the_transformer_is_refused(tiny_dir, tmp_path):
    # Without multitalk.json the audio branch is the released one: 768-wide wav2vec2 features, not the tiny 32.
    model_dir = linked_model_dir(tiny_dir, tmp_path / "model", leave_out={"transformer"})
    model = build_model(TINY, "cpu")
    write_diffusers_wan(model, model_dir / "transformer")
    export_audio_weights(model, model_dir / "multitalk.safetensors")
    with pytest.raises(ValueError, match="wav2vec2/ hidden_size is 32 but transformer/ has audio_channels 768"):
        load_components(model_dir)
