"""The text encoder on the CPU (the reference's --t5_cpu): from the command line and the serving config through to
where the pipeline loads umT5, and the memory plan without its weights on the device.

The meta device stands in for the accelerator: a component loaded there is visibly not on the CPU, and no memory
is spent on it.
"""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from multitalk_model.components import encode_prompt
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generate import load_pipeline, parse_args
from multitalk_model.plan_memory import GiB, Options, parse_bytes, plan
from serving.config import ServingConfig
from serving.generator import build_runner


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def placements(pipeline) -> dict[str, torch.device]:
    components = pipeline.components
    return {
        "text_encoder": components.text_encoder.device,
        "transformer": next(components.transformer.parameters()).device,
        "vae": next(components.vae.parameters()).device,
        "image_encoder": next(components.image_encoder.parameters()).device,
    }


def test_the_command_line_flag_loads_umt5_on_the_cpu_and_the_rest_on_the_device(model_dir, tmp_path):
    common = ["--input", str(tmp_path / "job.json"), "--model-dir", str(model_dir), "--out", str(tmp_path / "v.mp4")]
    pipeline = load_pipeline(parse_args([*common, "--device", "meta", "--text-encoder-on-cpu"]))
    where = placements(pipeline)
    assert where.pop("text_encoder") == torch.device("cpu")
    assert set(where.values()) == {torch.device("meta")}
    # The prompt is encoded on the CPU and its states handed to the device.
    assert encode_prompt(pipeline.components, ["two people talk"], pipeline.device).device == torch.device("meta")

    default = load_pipeline(parse_args([*common, "--device", "meta"]))
    assert set(placements(default).values()) == {torch.device("meta")}


def test_the_serving_config_field_reaches_the_replicas_pipeline(model_dir):
    config = ServingConfig(model_dir=model_dir, device="meta", text_encoder_on_cpu=True)
    where = placements(build_runner(config))
    assert where.pop("text_encoder") == torch.device("cpu")
    assert set(where.values()) == {torch.device("meta")}


def test_the_plan_holds_no_text_encoder_weights_on_the_device():
    big, card = get_preset("multitalk-14b"), parse_bytes("48GiB")
    on_device = plan(Options(quantization="int8"), 1, card, big)
    on_cpu = plan(Options(quantization="int8", text_encoder_on_cpu=True), 1, card, big)
    # umT5-XXL in bf16: 5.7B parameters, 10.6 GiB.
    assert (on_device.weights - on_cpu.weights) / GiB == pytest.approx(10.6, abs=0.1)
    assert on_cpu.activations == on_device.activations
    # Sharded, the saving is the rank's share of umT5 only.
    sharded = [plan(Options(sharding=True, text_encoder_on_cpu=cpu), 4, card, big).weights for cpu in (False, True)]
    assert (sharded[0] - sharded[1]) / GiB == pytest.approx(10.6 / 4, abs=0.1)


def test_the_serving_config_accepts_int8_on_48gib_only_with_umt5_on_the_cpu(model_dir):
    fields = {"model_dir": model_dir, "device": "cuda", "dtype": "bfloat16", "gpu_memory": "48GiB"}
    with pytest.raises(ValidationError, match="cannot hold multitalk-14b at 480p with replicated, int8"):
        ServingConfig(**fields, quantization="int8")
    config = ServingConfig(**fields, quantization="int8", text_encoder_on_cpu=True)
    assert config.memory_plan().fits and config.memory_plan().options.text_encoder_on_cpu
