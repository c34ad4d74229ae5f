"""FSDP2 weight sharding on 2 CPU ranks (gloo, real processes): the sharded model computes what the whole one does.

Alone and combined with sequence or guidance parallel, the sharded transformer's forward equals the single-process
forward; the sharded text encoder's states equal the whole one's; a sharded pipeline (with sequence parallel)
generates the single-process frames, and so does a Ray device group configured to shard; each rank holds half of
the block and text-encoder weights.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist
from PIL import Image
from test_parallel import RANKS, TINY, join_group, make_inputs, run_on_ranks, tiny_transformer
from torch.distributed.device_mesh import init_device_mesh

from multitalk_model.components import encode_prompt
from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generation import MultiTalkPipeline
from multitalk_model.guidance import GuidanceScales, GuidedDenoiser
from multitalk_model.jobs import GenerationJob
from multitalk_model.media import read_video_frames
from serving.device_group import DeviceGroup
from serving.parallel import apply_guidance_parallel, apply_sequence_parallel
from serving.sharding import local_parameter_bytes, shard_transformer, shard_weights

LATENT, PERSONS, STREAMS = (3, 6, 10), 2, [2, 1]  # frame split across the ranks, padding, a one-stream sample


def sharding_worker(rank: int, port: int, out_dir: Path) -> None:
    join_group(rank, port)
    mesh = init_device_mesh("cpu", (RANKS,))
    inputs = make_inputs(LATENT, PERSONS, STREAMS)
    results = {}
    with torch.no_grad():
        # Frozen, as sharding freezes the model (a frozen model's CPU kernels may round differently, ~6e-7).
        single = tiny_transformer().requires_grad_(False)
        results["single"] = single(**inputs).sample
        whole_bytes = local_parameter_bytes(single)
        block_bytes = local_parameter_bytes(single.blocks)

        for parallel in ("none", "sequence", "guidance"):
            model = tiny_transformer()
            shard_transformer(model, mesh)
            if parallel == "sequence":
                apply_sequence_parallel(model)
            if parallel == "guidance":
                apply_guidance_parallel(model)
            results[parallel] = model(**inputs).sample
            # Gathered for the forward, freed after it: between forwards the rank holds only its shards.
            results[f"{parallel} bytes"] = local_parameter_bytes(model)
        results["whole bytes"], results["block bytes"] = whole_bytes, block_bytes

        results["denoiser"] = guided_steps(rank, mesh)
        results.update(pipeline_results(out_dir, mesh))
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def guided_steps(rank: int, mesh) -> dict[str, torch.Tensor]:
    """One guided step (2 passes) single-process and sharded + guidance parallel (one pass per rank)."""
    inputs = make_inputs((3, 8, 8), persons=2, streams=[2])
    negative_text = torch.randn(1, 5, TINY.text_dim, generator=torch.Generator().manual_seed(3))
    steps = {}
    for name in ("single", "sharded"):
        model = tiny_transformer().requires_grad_(False)  # frozen, as sharding freezes it
        if name == "sharded":
            shard_transformer(model, mesh)
            apply_guidance_parallel(model)
        denoiser = GuidedDenoiser(
            model,
            GuidanceScales(text=1.0, audio=4.0),
            text=inputs["encoder_hidden_states"],
            negative_text=negative_text,
            image=inputs["encoder_hidden_states_image"],
            audio=inputs["audio"],
            region_masks=inputs["region_masks"],
        )
        steps[name] = denoiser(inputs["hidden_states"], 700.0)
    return steps


def pipeline_results(out_dir: Path, mesh) -> dict:
    """The job's frames and prompt states from the whole pipeline, then sharded, then sharded + sequence parallel."""
    pipeline = MultiTalkPipeline.from_model_dir(out_dir.parent / "model")
    components = pipeline.components
    components.transformer.requires_grad_(False)  # as sharding freezes it: the same kernels before and after
    prompts = ["two people talk in a car", ""]
    prepared = pipeline.prepare(GenerationJob.model_validate_json((out_dir.parent / "job.json").read_text()))
    results = {
        "text whole": encode_prompt(components, prompts, "cpu"),
        "text whole bytes": local_parameter_bytes(components.text_encoder),
        "frames whole": torch.from_numpy(pipeline.sample(prepared)[0]),
    }
    shard_weights(components, mesh)
    results["text sharded"] = encode_prompt(components, prompts, "cpu")
    results["text sharded bytes"] = local_parameter_bytes(components.text_encoder)
    results["frames sharded"] = torch.from_numpy(pipeline.sample(prepared)[0])
    apply_sequence_parallel(components.transformer)
    results["frames sharded + sequence"] = torch.from_numpy(pipeline.sample(prepared)[0])
    return results


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    # A two-person job with its own image and speech, boxes given (no face detector): 2 steps of 17 frames.
    image = np.random.default_rng(0).integers(0, 256, (64, 112, 3), dtype=np.uint8)
    Image.fromarray(image).save(model_dir.parent / "image.png")
    persons = []
    for person in range(2):
        audio = model_dir.parent / f"person{person}.wav"
        write_wav(audio, synthesize_speech(1.0, seed=person, pitch_hz=110.0 + 60 * person), 16000)
        persons.append({"audio": str(audio), "box": [56 * person, 0, 56 * person + 56, 64]})
    job = {"image": str(model_dir.parent / "image.png"), "persons": persons, "prompt": "two people talk in a car"}
    job.update(steps=2, frame_num=17, motion_frames=5, resolution=(64, 112), seed=7, text_guidance=1.0)
    (model_dir.parent / "job.json").write_text(json.dumps(job))
    return model_dir


@pytest.fixture(scope="module")
def rank_results(model_dir) -> list[dict]:
    out_dir = model_dir.parent / "ranks"
    out_dir.mkdir()
    return run_on_ranks(sharding_worker, out_dir)


def test_sharded_transformer_forward_equals_the_whole_one(rank_results):
    for rank, results in enumerate(rank_results):
        # Sharding alone changes no arithmetic: the gathered weights are the weights.
        torch.testing.assert_close(results["none"], results["single"], rtol=0, atol=0, msg=f"rank {rank}")
        for parallel in ("sequence", "guidance"):
            message = f"rank {rank}, sharded + {parallel} parallel"
            torch.testing.assert_close(results[parallel], results["single"], rtol=1e-5, atol=1e-5, msg=message)
        steps = results["denoiser"]
        torch.testing.assert_close(steps["sharded"], steps["single"], rtol=1e-5, atol=1e-5, msg=f"rank {rank}")


def test_each_rank_holds_half_of_the_sharded_weights(rank_results):
    whole = rank_results[0]
    root_bytes = whole["whole bytes"] - whole["block bytes"]
    for parallel in ("none", "sequence", "guidance"):
        held = [results[f"{parallel} bytes"] - root_bytes for results in rank_results]
        # Between them the ranks hold every block weight once; each about half (FSDP2 splits each weight along its
        # first dimension, so a [1, 6, dim] modulation table sits whole on rank 0).
        assert sum(held) == whole["block bytes"]
        assert max(held) / (whole["block bytes"] / RANKS) == pytest.approx(1.0, abs=0.01)
    text_held = [results["text sharded bytes"] for results in rank_results]
    assert sum(text_held) == whole["text whole bytes"]
    assert max(text_held) / (whole["text whole bytes"] / RANKS) == pytest.approx(1.0, abs=0.01)


def test_sharded_text_encoder_encodes_as_the_whole_one(rank_results):
    for results in rank_results:
        torch.testing.assert_close(results["text sharded"], results["text whole"], rtol=0, atol=0)


def test_sharded_pipeline_generates_the_whole_pipelines_frames(rank_results):
    for rank, results in enumerate(rank_results):
        whole = results["frames whole"]
        assert whole.shape == (17, 64, 112, 3)
        torch.testing.assert_close(results["frames sharded"], whole, rtol=0, atol=0, msg=f"rank {rank}")
        # With sequence parallel the attention sums in another order: a grey level may round the other way.
        difference = (results["frames sharded + sequence"].int() - whole.int()).abs()
        assert difference.max() <= 1, f"rank {rank}"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=RANKS, include_dashboard=False)  # conftest turns Ray's token auth off
    yield
    ray.shutdown()


@pytest.mark.slow
def test_sharded_device_group_generates_the_single_process_video(local_ray, model_dir, tmp_path):
    job = GenerationJob.model_validate_json((model_dir.parent / "job.json").read_text())
    group = DeviceGroup(model_dir, num_devices=RANKS, mode="sequence", use_gpu=False, shard_weights=True)
    try:
        result = group.generate(job, tmp_path / "video.mp4")
    finally:
        group.shutdown()
    single = MultiTalkPipeline.from_model_dir(model_dir).generate(job, tmp_path / "single.mp4")
    frames, single_frames = read_video_frames(result.path), read_video_frames(single.path)
    assert frames.shape == single_frames.shape == (17, 64, 112, 3)
    assert np.abs(frames.astype(float) - single_frames.astype(float)).mean() < 1.0  # grey levels
