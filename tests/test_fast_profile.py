"""The fast profile is the reference's few-step recipe (MeiGen-AI/MultiTalk README: with a FusionX / lightx2v
distillation LoRA, text guidance 1, audio guidance 2, shift 2, 4-8 steps; without a LoRA, text 5 / audio 4): a
deployment gives it with its configured LoRA, or refuses it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generation import GenerationError, MultiTalkPipeline
from multitalk_model.jobs import GenerationJob
from serving.config import ServingConfig
from serving.submission import RequestRejected, Upload, build_job

# The reference README's recipe for the distillation LoRAs (its --sample_text_guide_scale 1
# --sample_audio_guide_scale 2 --sample_shift 2, 4-8 steps).
REFERENCE_FAST = {"text_guidance": 1.0, "audio_guidance": 2.0, "shift": 2.0}


@pytest.fixture
def uploads(tmp_path) -> tuple[Upload, Upload]:
    speech = tmp_path / "speech.wav"
    write_wav(speech, synthesize_speech(2.0), 16000)
    image = tmp_path / "face.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
    return (
        Upload(field="image", filename=image.name, path=image, size=image.stat().st_size),
        Upload(field="audio 1", filename=speech.name, path=speech, size=speech.stat().st_size),
    )


def _config(tmp_path: Path, **generation) -> ServingConfig:
    return ServingConfig(
        model_dir=str(tmp_path), api_keys=["key"], storage_uri=str(tmp_path / "files"), generation=generation
    )


def test_a_fast_job_without_a_configured_lora_is_refused_saying_so(tmp_path, uploads):
    image, speech = uploads
    with pytest.raises(RequestRejected, match=r"no distillation LoRA \(generation.fast_lora\)") as refused:
        build_job({"fast": True}, image, [speech], _config(tmp_path))
    assert refused.value.status == 422
    assert build_job({}, image, [speech], _config(tmp_path)).loras == []  # the standard profile still runs


def test_the_fast_profile_is_the_reference_recipe_with_the_configured_lora(tmp_path, uploads):
    image, speech = uploads
    config = _config(tmp_path, fast_lora=["loras/fusionx.safetensors", 0.8]).with_absolute_paths(tmp_path)

    job = build_job({"fast": True}, image, [speech], config)

    assert {field: getattr(job, field) for field in REFERENCE_FAST} == REFERENCE_FAST
    assert 4 <= job.steps <= 8
    assert job.loras == [(str(tmp_path / "loras/fusionx.safetensors"), 0.8)]
    standard = build_job({}, image, [speech], config)
    assert (standard.text_guidance, standard.audio_guidance, standard.loras) == (5.0, 4.0, [])


def test_a_request_cannot_name_server_side_loras(tmp_path, uploads):
    image, speech = uploads
    with pytest.raises(RequestRejected, match=r"\['loras'\] come from the deployment's config"):
        build_job({"loras": [["/etc/passwd", 1.0]]}, image, [speech], _config(tmp_path))


def test_a_job_lora_is_merged_for_that_job_and_the_loaded_weights_come_back_exactly(tmp_path, shared_media):
    pipeline = MultiTalkPipeline.from_model_dir(build_tiny_model_dir(tmp_path / "model"))
    transformer = pipeline.components.transformer
    loaded = {name: value.clone() for name, value in transformer.state_dict().items()}
    weight = transformer.blocks[0].ffn.net[2].weight  # the original format's blocks.0.ffn.2
    generator = torch.Generator().manual_seed(0)
    up, down = (
        torch.randn(weight.shape[0], 2, generator=generator),
        torch.randn(2, weight.shape[1], generator=generator),
    )
    lora = tmp_path / "lora.safetensors"
    save_file(
        {"diffusion_model.blocks.0.ffn.2.lora_up.weight": up, "diffusion_model.blocks.0.ffn.2.lora_down.weight": down},
        lora,
    )
    job = GenerationJob.model_validate(
        {
            "image": str(shared_media / "one_person_studio.png"),
            "persons": [{"audio": str(shared_media / "one_person_studio.wav")}],
            "steps": 1,
            "frame_num": 5,
            "motion_frames": 1,
            "resolution": (32, 32),
            "loras": [(str(lora), 0.5)],
        }
    )

    pipeline.sample(pipeline.prepare(job))
    torch.testing.assert_close(weight, loaded["blocks.0.ffn.net.2.weight"] + 0.5 * up @ down)

    pipeline.sample(pipeline.prepare(job.model_copy(update={"loras": []})))
    for name, value in transformer.state_dict().items():
        assert torch.equal(value, loaded[name]), name

    with pytest.raises(GenerationError, match="loras.0: no such file"):
        pipeline.prepare(job.model_copy(update={"loras": [(str(tmp_path / "missing.safetensors"), 1.0)]}))
