"""Sequence- and guidance-parallel generation on 2 CPU ranks (gloo, real processes) equals the single process."""

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multitalk_model.checkpoints import build_model
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generation import GenerationCancelled, MultiTalkPipeline
from multitalk_model.guidance import GuidanceScales, GuidedDenoiser
from multitalk_model.jobs import GenerationJob
from multitalk_model.media import read_video_frames
from serving.device_group import DeviceGroup
from serving.parallel import (
    apply_guidance_parallel,
    apply_sequence_parallel,
    remove_guidance_parallel,
    remove_sequence_parallel,
)
from tests.helpers import transformer_inputs

TINY = get_preset("tiny")
RANKS = 2
# name: (latent T, H, W, persons, stream counts of the batch). Tokens per latent frame: H/2 * W/2.
SEQUENCE_CASES = {
    # 3 frames of 16 tokens over 2 ranks of 24: frame 1 (tokens 16-31) is split between the ranks.
    "one person, frame split": ((3, 8, 8), 1, [1]),
    "two persons, frame split": ((3, 8, 8), 2, [2]),
    # 45 tokens: padded to 2 x 23, and frame 1 (tokens 15-29) split as well.
    "two persons, padded": ((3, 6, 10), 2, [2]),
    # The batched guidance forward: one sample localises two persons, the other takes the one-stream path.
    "two persons beside a silent pass": ((3, 6, 10), 2, [2, 1]),
}


def make_inputs(latent: tuple[int, int, int], persons: int, streams: list[int]) -> dict[str, torch.Tensor]:
    inputs = transformer_inputs(latent, persons=persons, batch=len(streams), seed=persons + latent[2])
    if persons == 1:
        inputs["region_masks"] = None
    return {**inputs, "audio_streams": torch.tensor(streams)}


def tiny_transformer():
    torch.manual_seed(0)
    return build_model(TINY, "cpu").eval()


def join_group(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, RANKS, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=RANKS)


def run_on_ranks(worker, out_dir: Path) -> list[dict]:
    """Runs worker(rank, port, out_dir) in RANKS fresh processes; returns what each saved to out_dir/rank{r}.pt."""
    store = dist.TCPStore("127.0.0.1", 0, RANKS, is_master=True, wait_for_workers=False)
    mp.spawn(worker, args=(store.port, out_dir), nprocs=RANKS)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(RANKS)]


def parallel_worker(rank: int, port: int, out_dir: Path) -> None:
    """Every case single-process, then parallel, on one rank of the group (one spawn for all: start-up is slow)."""
    join_group(rank, port)
    model = tiny_transformer()
    seen_by_block0: list[torch.Size] = []
    model.blocks[0].register_forward_hook(lambda module, args, output: seen_by_block0.append(output.shape))
    results = {
        "sequence": sequence_parallel_results(model, seen_by_block0),
        "guidance": guidance_parallel_results(model, seen_by_block0),
    }
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@torch.no_grad()
def sequence_parallel_results(model, seen_by_block0: list[torch.Size]) -> dict[str, dict]:
    results = {}
    for name, (latent, persons, streams) in SEQUENCE_CASES.items():
        inputs = make_inputs(latent, persons, streams)
        single = model(**inputs).sample
        apply_sequence_parallel(model)
        parallel = model(**inputs).sample
        block_tokens = seen_by_block0[-1][1]
        remove_sequence_parallel(model)
        restored = model(**inputs).sample
        results[name] = {"single": single, "parallel": parallel, "restored": restored, "block_tokens": block_tokens}
    return results


def guidance_parallel_results(model, seen_by_block0: list[torch.Size]) -> dict[str, torch.Tensor | list[int]]:
    inputs = make_inputs((3, 8, 8), persons=2, streams=[2])
    denoiser = GuidedDenoiser(
        model,
        GuidanceScales(text=1.0, audio=4.0),  # 2 passes: cond and drop_audio, one per rank
        text=inputs["encoder_hidden_states"],
        negative_text=torch.randn(1, 5, TINY.text_dim, generator=torch.Generator().manual_seed(3)),
        image=inputs["encoder_hidden_states_image"],
        audio=inputs["audio"],
        region_masks=inputs["region_masks"],
    )
    seen_by_block0.clear()
    single = denoiser(inputs["hidden_states"], 700.0)
    apply_guidance_parallel(model)
    parallel = denoiser(inputs["hidden_states"], 700.0)
    remove_guidance_parallel(model)
    return {"single": single, "parallel": parallel, "block_batch": [shape[0] for shape in seen_by_block0]}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(parallel_worker, tmp_path_factory.mktemp("ranks"))


def test_sequence_parallel_forward_equals_the_single_process_forward(rank_results):
    for rank, results in enumerate(rank_results):
        for name, result in results["sequence"].items():
            message = f"rank {rank}, {name}"
            torch.testing.assert_close(result["parallel"], result["single"], rtol=1e-5, atol=1e-5, msg=message)
            torch.testing.assert_close(result["restored"], result["single"], rtol=0, atol=0, msg=message)
            (frames, height, width), _, _ = SEQUENCE_CASES[name]
            tokens = frames * (height // 2) * (width // 2)
            assert result["block_tokens"] == -(-tokens // RANKS), f"{message}: the blocks run on the rank's chunk"


def test_guidance_parallel_step_equals_the_batched_single_process_step(rank_results):
    for results in rank_results:
        result = results["guidance"]
        torch.testing.assert_close(result["parallel"], result["single"], rtol=1e-5, atol=1e-5)
        assert result["block_batch"] == [2, 1], "the single process runs both passes in one batch, each rank one"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def job(shared_media) -> GenerationJob:
    # Text guidance 1: 2 passes per step, which the guidance-parallel group puts one per rank.
    persons = [{"audio": str(shared_media / f"two_people_car_person{i}.WAV")} for i in (1, 2)]
    return GenerationJob.model_validate(
        {
            "image": str(shared_media / "two_people_car.png"),
            "persons": persons,
            "prompt": "two people talk in a car",
            "steps": 2,
            "frame_num": 17,
            "motion_frames": 5,
            "resolution": (64, 112),
            "seed": 7,
            "text_guidance": 1.0,
        }
    )


@pytest.fixture(scope="module")
def single_process_video(model_dir, job, tmp_path_factory) -> np.ndarray:
    result = MultiTalkPipeline.from_model_dir(model_dir).generate(job, tmp_path_factory.mktemp("single") / "video.mp4")
    return read_video_frames(result.path)


@pytest.mark.parametrize("mode", ["sequence", "guidance"])
def test_device_group_of_two_generates_the_single_process_video(
    local_ray, model_dir, job, single_process_video, tmp_path, mode
):
    group = DeviceGroup(model_dir, num_devices=RANKS, mode=mode, use_gpu=False, poll_interval_s=0.05)
    try:
        # A cancellation stops every rank at the same step, so the group stays in step for the next job.
        with pytest.raises(GenerationCancelled, match="step 1"):
            group.generate(job, tmp_path / "cancelled.mp4", cancelled=lambda: True)
        seen = []
        result = group.generate(job, tmp_path / "video.mp4", progress=seen.append)
    finally:
        group.shutdown()

    frames = read_video_frames(result.path)
    assert result.path == tmp_path / "video.mp4" and frames.shape == single_process_video.shape
    assert np.abs(frames.astype(float) - single_process_video.astype(float)).mean() < 1.0  # grey levels
    assert [(p.clip, p.step) for p in seen] == [(1, 1), (1, 2)]
