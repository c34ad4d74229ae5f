"""The released weights get the inputs the reference code gives them: each check compares against a computation
written from MeiGen-AI/MultiTalk (wan/modules/clip.py, wan/modules/multitalk_model.py, generate_multitalk.py,
wan/multitalk.py) on tiny inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multitalk_model.audio import SAMPLE_RATE, load_audio_track, loudness_normalize, to_mono_16k
from multitalk_model.components import encode_image, load_components
from multitalk_model.config import REFERENCE_DEFAULTS, MultiTalkConfig, get_preset
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generation import MultiTalkPipeline
from multitalk_model.jobs import GenerationJob, JobError, load_job

# ---------------------------------------------------------------------------------------- 1. CLIP geometry


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def components(model_dir):
    return load_components(model_dir)


def reference_clip_visual(components, frame: np.ndarray) -> torch.Tensor:
    """CLIPModel.visual on the condition frame: the frame as the reference builds cond_image (/255, then
    (x - 0.5) * 2; [1, C, 1, H, W]), each video transposed to [1, C, H, W] and squashed to the model's square
    image_size with bicubic interpolation (align_corners=False), .mul_(0.5).add_(0.5), T.Normalize with the CLIP
    mean/std, then the vision transformer up to its penultimate block (use_31_block: transformer[:-1])."""
    cond_image = torch.from_numpy(frame).permute(2, 0, 1)[None, :, None].float()
    cond_image = (cond_image / 255 - 0.5) * 2
    model = components.image_encoder
    size = (model.config.image_size,) * 2
    videos = torch.cat(
        [
            F.interpolate(u.transpose(0, 1), size=size, mode="bicubic", align_corners=False)
            for u in cond_image[:, :, -1:]
        ]
    )
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # open_clip's, in clip.py
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    videos = (videos.mul_(0.5).add_(0.5) - mean) / std
    with torch.no_grad():
        x = model.pre_layrnorm(model.embeddings(videos))
        for block in model.encoder.layers[:-1]:
            x = block(x, None)
            x = x[0] if isinstance(x, tuple) else x
    return x


@pytest.mark.parametrize("height, width", [(48, 96), (96, 40)])  # a wide two-person frame, a portrait
def test_clip_sees_the_whole_frame_as_the_reference(components, height, width):
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

    ours = encode_image(components, frame)

    torch.testing.assert_close(ours, reference_clip_visual(components, frame), rtol=1e-5, atol=1e-5)


def test_clip_embedding_changes_with_the_sides_of_a_wide_frame(components):
    """A centre crop never sees the persons at the sides of a 1:2 frame; the whole-frame input does."""
    frame = np.full((48, 96, 3), 128, np.uint8)
    sides = frame.copy()
    sides[:, :16], sides[:, -16:] = 255, 0

    assert not torch.allclose(encode_image(components, frame), encode_image(components, sides), atol=1e-4)


# ------------------------------------------------------------------------ 3. original-format config.json

# The config.json of Wan-AI/Wan2.1-I2V-14B-480P (the original-format release the reference loads), as published.
WAN21_I2V_14B_480P_CONFIG = """{
  "_class_name": "WanModel",
  "_diffusers_version": "0.30.0",
  "dim": 5120,
  "eps": 1e-06,
  "ffn_dim": 13824,
  "freq_dim": 256,
  "in_dim": 36,
  "model_type": "i2v",
  "num_heads": 40,
  "num_layers": 40,
  "out_dim": 16,
  "text_len": 512
}
"""


def test_the_released_wan21_i2v_config_reads_with_the_reference_defaults():
    config = MultiTalkConfig.from_reference(WAN21_I2V_14B_480P_CONFIG)

    assert config == get_preset("multitalk-14b")
    assert config.text_dim == 4096  # absent from the file: the reference WanModel's default


def test_every_reference_argument_is_accepted_and_defaults_as_there():
    # WanModel.__init__ in wan/modules/multitalk_model.py: its arguments and defaults, restated from the source.
    reference_signature = {
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
        "weight_init": True,
    }
    assert REFERENCE_DEFAULTS == reference_signature
    defaults = MultiTalkConfig.from_reference({})
    assert (defaults.dim, defaults.num_layers, defaults.in_channels, defaults.text_dim) == (2048, 32, 16, 4096)
    assert MultiTalkConfig.from_reference(reference_signature) == defaults
    with pytest.raises(ValueError, match=r"unknown WanModel arguments \['txt_dim'\]"):
        MultiTalkConfig.from_reference({"dim": 5120, "txt_dim": 4096})


def test_a_model_directory_with_the_released_config_json_reads_it(tmp_path):
    from multitalk_model.components import _transformer_source

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(WAN21_I2V_14B_480P_CONFIG)

    config, sources = _transformer_source(tmp_path, image_dim=1280)

    assert config == get_preset("multitalk-14b") and sources == [(tmp_path / "transformer", "original")]


# -------------------------------------------------------------------------- 4. a person without audio


def reference_audio_prepare_multi(left, right, audio_type):
    """generate_multitalk.py audio_prepare_multi on the prepared (16 kHz, -23 LUFS) arrays; None for "None"."""
    if left is None:
        left = np.zeros(right.shape[0])
    elif right is None:
        right = np.zeros(left.shape[0])
    if audio_type == "para":
        return left, right
    return (
        np.concatenate([left[: left.shape[0]], np.zeros(right.shape[0])]),
        np.concatenate([np.zeros(left.shape[0]), right[: right.shape[0]]]),
    )


@pytest.fixture(scope="module")
def pipeline(components):
    return MultiTalkPipeline(components)


@pytest.mark.parametrize("silent", ["person1", "person2"])
@pytest.mark.parametrize("audio_type", ["add", "para"])
def test_an_official_input_with_a_none_person_gives_a_silent_stream(
    pipeline, shared_media, tmp_path, silent, audio_type
):
    speech = shared_media / "two_people_car_person1.WAV"
    cond_audio = {"person1": str(speech), "person2": str(speech)} | {silent: "None"}
    official = {
        "prompt": "two people in a car",
        "cond_image": str(shared_media / "two_people_car.png"),
        "audio_type": audio_type,
        "cond_audio": cond_audio,
        "bbox": {"person1": [0, 0, 200, 300], "person2": [0, 300, 200, 600]},
    }
    path = tmp_path / "official.json"
    path.write_text(json.dumps(official))

    job = load_job(path)
    prepared = pipeline.prepare(job.model_copy(update={"resolution": (64, 112)}))

    heard = loudness_normalize(to_mono_16k(*load_audio_track(speech)))
    tracks = [None if cond_audio[key] == "None" else heard for key in ("person1", "person2")]
    expected = reference_audio_prepare_multi(*tracks, audio_type)
    assert job.persons[int(silent[-1]) - 1].audio is None
    for ours, reference in zip(prepared.speech, expected, strict=True):
        np.testing.assert_allclose(ours, reference, atol=1e-6)
    assert prepared.num_frames == min(int(len(expected[0]) / SAMPLE_RATE * 25), job.frame_num)  # clip mode


def test_a_submission_of_an_official_input_with_a_none_person_takes_one_upload(shared_media, tmp_path):
    from serving.api import _stored_spec
    from serving.config import ServingConfig
    from serving.submission import RequestRejected, Upload, build_job

    def upload(path: Path, field: str) -> Upload:
        return Upload(field=field, filename=path.name, path=path, size=path.stat().st_size)

    image = upload(shared_media / "two_people_car.png", "image")
    speech = upload(shared_media / "two_people_car_person2.WAV", "audio 1")
    config = ServingConfig(model_dir=str(tmp_path), api_keys=["key"], storage_uri=str(tmp_path / "files"))
    options = {"cond_image": "car.png", "cond_audio": {"person1": "None", "person2": "right.wav"}}

    job = build_job(options, image, [speech], config)
    spec, files = _stored_spec(job, image, [speech])

    assert [person.audio for person in job.persons] == [None, str(speech.path)]
    assert [person["audio"] for person in spec["persons"]] == [None, "inputs/audio1.WAV"]
    assert files["inputs/audio1.WAV"] == speech.path
    with pytest.raises(RequestRejected, match="names 1 person\\(s\\) with audio but 2 audio file\\(s\\)"):
        build_job(options, image, [speech, speech], config)


def test_every_person_silent_is_rejected(shared_media, tmp_path):
    path = tmp_path / "official.json"
    official = {"cond_image": str(shared_media / "two_people_car.png"), "cond_audio": {"person1": "None"}}
    path.write_text(json.dumps(official))
    with pytest.raises(JobError, match="every person is silent"):
        load_job(path)


# -------------------------------------------------------------------- 6. the reference's fixed halves


def reference_human_masks(src_h: int, src_w: int, target_hw: tuple[int, int], lat_hw: tuple[int, int]):
    """wan/multitalk.py for two persons without bbox: the halves with face_scale 0.05 margins and the background,
    resize_and_centercrop on the tensor (legacy nearest to cover, torchvision's center_crop), nearest to the
    latent grid, > 0."""
    face_scale = 0.05
    x_min, x_max = int(src_h * face_scale), int(src_h * (1 - face_scale))
    human_mask1, human_mask2 = torch.zeros([src_h, src_w]), torch.zeros([src_h, src_w])
    lefty_min, lefty_max = int((src_w // 2) * face_scale), int((src_w // 2) * (1 - face_scale))
    righty_min = int((src_w // 2) * face_scale + (src_w // 2))
    righty_max = int((src_w // 2) * (1 - face_scale) + (src_w // 2))
    human_mask1[x_min:x_max, lefty_min:lefty_max] = 1
    human_mask2[x_min:x_max, righty_min:righty_max] = 1
    background_mask = torch.where(human_mask1 + human_mask2 > 0, torch.tensor(0), torch.tensor(1))
    masks = torch.stack([human_mask1, human_mask2, background_mask])

    target_h, target_w = target_hw
    scale = max(target_h / src_h, target_w / src_w)
    final_h, final_w = math.ceil(scale * src_h), math.ceil(scale * src_w)
    resized = F.interpolate(masks[None].float(), size=(final_h, final_w), mode="nearest")
    top, left = int(round((final_h - target_h) / 2.0)), int(round((final_w - target_w) / 2.0))
    cropped = resized[:, :, top : top + target_h, left : left + target_w]
    return (F.interpolate(cropped, size=lat_hw, mode="nearest").squeeze() > 0).float()


@pytest.mark.parametrize("resolution", [(64, 112), (112, 64), (480, 832)])
def test_halves_reproduce_the_reference_masks(pipeline, shared_media, resolution):
    job = GenerationJob.model_validate(
        {
            "image": str(shared_media / "two_people_car.png"),
            "persons": [{"audio": str(shared_media / f"two_people_car_person{i}.WAV")} for i in (1, 2)],
            "regions": "halves",
            "resolution": resolution,
        }
    )
    prepared = pipeline.prepare(job)
    source = load_job_image_size(job.image)
    height, width = resolution

    expected = reference_human_masks(*source, resolution, (height // 8, width // 8))

    assert prepared.region_source == "halves"
    assert torch.equal(pipeline._latent_masks(prepared.masks)[0], expected)


def test_faces_stay_the_default_regions():
    assert GenerationJob.model_fields["regions"].default == "faces"
    with pytest.raises(ValueError, match="regions"):
        GenerationJob.model_validate({"image": "a.png", "persons": [{"audio": "a.wav"}], "regions": "thirds"})


def load_job_image_size(path: str) -> tuple[int, int]:
    from multitalk_model.media import load_image

    return load_image(path).shape[:2]
