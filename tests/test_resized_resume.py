"""A checkpoint resumes on another number of workers with the exact optimizer state (training/checkpointing.py).

Real DeepSpeed on the tiny training model, built as the training loop builds it (`build_engine`), in gloo process
groups of local processes: two workers train a few steps, checkpoint and go on two more steps (the uninterrupted
reference); one worker resumes from that checkpoint, takes the next step on the same two samples (two accumulated
micro-batches) and checkpoints; two workers resume from that one and take the step after. Checked, for ZeRO 1 in
fp32 and ZeRO 2 in bf16 (the stage configs' precision): every trainable parameter's fp32 master weight and AdamW
moments right after each resized resume equal the saved ones exactly, so does AdamW's step, and after each resumed
step they equal the uninterrupted run's exactly (the mean of two samples' gradients is the same float whether two
workers average them or one accumulates halves).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port, transformer_inputs
from training.config import TrainingConfig

pytestmark = pytest.mark.slow  # starts DeepSpeed in three groups of local processes

STEPS = 3  # before the first checkpoint
SAMPLES = 2  # the global batch
MOMENTS = ("exp_avg", "exp_avg_sq")


def _config(model_dir: Path, zero_stage: int, precision: str) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "model": {"preset": "tiny", "model_dir": str(model_dir), "precision": precision},
            "optimizer": {"lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.01},
            "deepspeed": {"zero_stage": zero_stage},
            "schedule": {"global_batch_size": SAMPLES, "micro_batch_size": 1},
            "cluster": {"num_workers": 2, "min_workers": 1},
        }
    )


def _train_step(engine, step: int, rank: int, world_size: int, dtype: torch.dtype) -> None:
    """Optimizer step `step` over the global batch's samples of this rank (the same samples whatever the world)."""
    per_worker = SAMPLES // world_size
    for index in range(rank * per_worker, (rank + 1) * per_worker):
        inputs = {
            key: value.to(dtype) for key, value in transformer_inputs((3, 4, 4), seed=1000 * step + index).items()
        }
        engine.backward(engine(**inputs).sample.square().mean())
        engine.step()


def _full_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every trainable parameter's fp32 master weight and AdamW moments, whole (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {
        name: {"fp32": safe_get_full_fp32_param(param)}
        | {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}
        for name, param in engine.module.named_parameters()
        if param.requires_grad
    }


def _adam_steps(engine) -> list[float]:
    """AdamW's step count of each of ZeRO's partitions on this rank."""
    return [float(state["step"]) for state in engine.optimizer.optimizer.state.values()]


def _partition_names(checkpoint: Path) -> list[set[str]]:
    """The parameters with a fragment in each rank's ZeRO partition of a checkpoint."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS

    from training.checkpointing import TAG

    saved = [torch.load(path, weights_only=False) for path in sorted((checkpoint / TAG).glob("*_optim_states.pt"))]
    return [{name for group in part[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS] for name in group} for part in saved]


def _worker(rank: int, world_size: int, port: int, config_json: str, work: Path, phase: str) -> None:
    import torch.distributed as dist

    from training.checkpointing import load, save
    from training.loop import build_engine
    from training.model import DTYPES, build_training_model

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))  # what DeepSpeed reads
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # as training/loop.py
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    config = TrainingConfig.model_validate_json(config_json)
    engine = build_engine(build_training_model(config.model, "cpu", seed=0), config, world_size)
    dtype = DTYPES[config.model.precision]
    record = {}
    if phase == "first":
        for step in range(1, STEPS + 1):
            _train_step(engine, step, rank, world_size, dtype)
        save(engine, work / phase, STEPS, {}, config)
        record["saved"], record["adam_steps"] = _full_state(engine), _adam_steps(engine)
        for step in range(STEPS + 1, STEPS + 3):
            _train_step(engine, step, rank, world_size, dtype)
            record[f"reference_{step}"] = _full_state(engine)
    else:
        step, _ = load(engine, work / ("first" if phase == "shrunk" else "shrunk"))
        record["resumed_at"], record["restored"], record["adam_steps"] = step, _full_state(engine), _adam_steps(engine)
        _train_step(engine, step + 1, rank, world_size, dtype)
        record["trained"] = _full_state(engine)
        save(engine, work / phase, step + 1, {}, config)
    if rank == 0:
        torch.save(record, work / f"{phase}.pt")
    dist.destroy_process_group()


def _assert_equal_states(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, state in expected.items():
        for key, value in state.items():
            assert torch.equal(actual[name][key], value), (name, key)


@pytest.mark.parametrize(("zero_stage", "precision"), [(1, "fp32"), (2, "bf16")])
def test_resized_resumes_restore_the_optimizer_state_and_train_on_as_the_uninterrupted_run(
    zero_stage, precision, tiny_model_dir, tmp_path
):
    import torch.multiprocessing as mp

    config = _config(tiny_model_dir, zero_stage, precision).model_dump_json()
    for phase, world_size in (("first", 2), ("shrunk", 1), ("grown", 2)):
        mp.spawn(_worker, args=(world_size, free_port(), config, tmp_path, phase), nprocs=world_size)
    first, shrunk, grown = (torch.load(tmp_path / f"{phase}.pt") for phase in ("first", "shrunk", "grown"))

    # The moments are under test: every parameter has some by the checkpoint, and one is split between the two
    # workers' partitions (merged from both on the shrink, set in both on the growth).
    assert len(partitions := _partition_names(tmp_path / "first")) == 2 and set.intersection(*partitions)
    assert all(state[key].any() for state in first["saved"].values() for key in MOMENTS)
    assert first["adam_steps"] == [STEPS] * len(first["adam_steps"])
    assert shrunk["resumed_at"] == STEPS and grown["resumed_at"] == STEPS + 1
    _assert_equal_states(shrunk["restored"], first["saved"])
    _assert_equal_states(grown["restored"], shrunk["trained"])
    assert set(shrunk["adam_steps"]) == {STEPS} and set(grown["adam_steps"]) == {STEPS + 1}
    _assert_equal_states(shrunk["trained"], first[f"reference_{STEPS + 1}"])
    _assert_equal_states(grown["trained"], first[f"reference_{STEPS + 2}"])
