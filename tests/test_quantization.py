"""torchao int8 weight-only quantisation of the blocks' linear layers: a quality guard on the tiny model, and the
options around it (offload, regional compile) generating what the plain pipeline generates."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_parallel import make_inputs, tiny_transformer
from torch import nn

from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generation import MultiTalkPipeline
from multitalk_model.jobs import GenerationJob
from multitalk_model.quantization import quantizable, quantize_transformer

# The guard: the int8 forward within 2% (relative L2) of the float32 forward; measured on the tiny model: ~0.5%.
INT8_TOLERANCE = 0.02


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("case", [((3, 4, 4), 1, [1]), ((3, 6, 10), 2, [2, 1])], ids=["one person", "two persons"])
@torch.no_grad()
def test_int8_forward_stays_within_the_tolerance_of_float32(case):
    inputs = make_inputs(*case)
    model = tiny_transformer()
    expected = model(**inputs).sample
    quantize_transformer(model, "int8")
    actual = model(**inputs).sample
    assert 0 < relative_error(actual, expected) < INT8_TOLERANCE  # quantised (not equal), and close


def test_int8_quantises_the_wan_linears_and_leaves_the_audio_branch_and_norms_alone():
    model = tiny_transformer()
    quantize_transformer(model, "int8")
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        is_plain = type(module.weight) is nn.Parameter and module.weight.dtype == torch.float32
        assert is_plain != quantizable(module, name), name
    assert any(quantizable(module, name) for name, module in model.named_modules())
    for name, param in model.named_parameters():
        if ".attn_audio." in name or "audio_adapter." in name or "norm" in name:
            assert type(param) is nn.Parameter and param.dtype == torch.float32, name


def test_fp8_needs_a_gpu():
    with pytest.raises(ValueError, match="fp8 quantisation needs a GPU"):
        quantize_transformer(tiny_transformer(), "fp8")


@pytest.fixture(scope="module")
def model_and_job(tmp_path_factory) -> tuple[Path, GenerationJob]:
    root = tmp_path_factory.mktemp("quantized")
    model_dir = build_tiny_model_dir(root / "model")
    Image.new("RGB", (112, 64), (120, 90, 60)).save(root / "image.png")
    write_wav(root / "speech.wav", synthesize_speech(0.8, seed=1), 16000)
    job = {"image": str(root / "image.png"), "persons": [{"audio": str(root / "speech.wav")}], "prompt": "a man talks"}
    job.update(steps=2, frame_num=9, motion_frames=5, resolution=(64, 112), seed=3)
    return model_dir, GenerationJob.model_validate(json.loads(json.dumps(job)))


@pytest.fixture(scope="module")
def plain_frames(model_and_job):
    model_dir, job = model_and_job
    pipeline = MultiTalkPipeline.from_model_dir(model_dir)
    return pipeline.sample(pipeline.prepare(job))[0]


def test_int8_generation_runs_end_to_end(model_and_job, plain_frames):
    model_dir, job = model_and_job
    pipeline = MultiTalkPipeline.from_model_dir(model_dir, quantization="int8")
    frames = pipeline.sample(pipeline.prepare(job))[0]
    assert frames.shape == plain_frames.shape
    # Random weights make noise, but the same noise: int8 moves the mean grey level by little.
    assert abs(frames.astype(float) - plain_frames.astype(float)).mean() < 8.0


def test_group_offloaded_pipeline_generates_the_plain_frames(model_and_job, plain_frames):
    model_dir, job = model_and_job
    pipeline = MultiTalkPipeline.from_model_dir(model_dir, low_memory=True)
    block = pipeline.components.transformer.blocks[0]
    assert "group_offloading" in block._diffusers_hook.hooks, "the blocks are offloaded by diffusers' hooks"
    frames = pipeline.sample(pipeline.prepare(job))[0]
    assert (frames == plain_frames).all()
