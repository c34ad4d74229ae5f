"""Training's parts without Ray: the model as training starts it, the objective, the data streams, ZeRO-3 on two
local processes, and the config. The runs on Ray Train are in test_training_ray.py.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import WanTransformer3DModel

from multitalk_model.checkpoints import build_model
from multitalk_model.config import get_preset
from tests.helpers import free_port, transformer_inputs
from training.config import ConfigError, ModelConfig, ObjectiveConfig, load_config
from training.data import AI2V, I2V, ClipBatch, interleave, split_shards
from training.model import build_training_model, check_trainable
from training.objective import drop_conditions

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "tiny-cpu.yaml"
TINY = get_preset("tiny")


def test_step_zero_reproduces_the_base_image_to_video_model(tiny_model_dir):
    model = build_training_model(ModelConfig(preset="tiny", model_dir=str(tiny_model_dir), precision="fp32"), "cpu", 0)
    base = WanTransformer3DModel(**TINY.wan_kwargs())
    missing, unexpected = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) <= set(model.audio_parameter_names())
    # The full text context: the plain Wan model does not pad it to text_len as ours does.
    inputs = transformer_inputs((3, 6, 6), persons=2, batch=2, text_tokens=TINY.text_len)
    inputs["timestep"] = torch.tensor([100.0, 900.0])
    audio, masks = inputs.pop("audio"), inputs.pop("region_masks")

    with torch.no_grad():
        ours = model.eval()(**inputs, audio=audio, region_masks=masks).sample
        reference = base.eval()(**inputs).sample

    assert torch.equal(ours, reference)


def test_a_fresh_audio_branch_zeroes_only_the_output_projections(tiny_model_dir):
    model = build_training_model(ModelConfig(preset="tiny", model_dir=str(tiny_model_dir), precision="fp32"), "cpu", 0)

    for block in model.blocks:
        assert not block.attn_audio.to_out.weight.any() and not block.attn_audio.to_out.bias.any()
        assert block.attn_audio.to_q.weight.abs().sum() > 0
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == set(model.audio_parameter_names())


def test_startup_check_fails_when_a_frozen_parameter_would_get_gradients(tiny_model_dir):
    model = build_training_model(ModelConfig(preset="tiny", model_dir=str(tiny_model_dir), precision="fp32"), "cpu", 0)
    model.blocks[0].ffn.net[2].weight.requires_grad_(True)

    with pytest.raises(RuntimeError, match=r"outside the audio branch would get gradients: blocks\.0\.ffn\.net\.2\."):
        check_trainable(model)


def _zero3_rank(rank: int, port: int, out_dir: Path) -> None:
    """One of two ranks: the tiny model's one- and two-person forwards before and under ZeRO-3, then one step."""
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")  # what DeepSpeed reads of a launcher
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(TINY, "cpu").train()
    audio = [param for name, param in model.named_parameters() if name in set(model.audio_parameter_names())]
    model.requires_grad_(False)
    for param in audio:
        param.requires_grad_(True)
    inputs = {persons: transformer_inputs((3, 8, 8), persons=persons, seed=1) for persons in (1, 2)}
    with torch.no_grad():
        before = {persons: model(**batch).sample for persons, batch in inputs.items()}
    config = {
        "train_batch_size": 2,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every weight
        "steps_per_print": 2**31 - 1,
    }
    optimizer = torch.optim.AdamW(audio, lr=1e-2)
    engine = deepspeed.initialize(
        model=model, model_parameters=audio, optimizer=optimizer, config=config, dist_init_required=False
    )[0]
    partitioned = all(param.data.numel() == 0 for param in audio)
    under_zero3 = {persons: engine(**batch).sample.detach() for persons, batch in inputs.items()}
    engine.backward(engine(**inputs[1]).sample.square().mean())
    engine.step()
    with torch.no_grad():
        trained = engine(**inputs[1]).sample
    result = {"partitioned": partitioned, "before": before, "zero3": under_zero3, "trained": trained}
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # starts DeepSpeed on two processes
def test_zero3_partitions_every_weight_and_the_forwards_and_a_step_still_work(tmp_path):
    """The one-person audio attention reads its projection weights inside its forward (folded into the audio keys and
    values): ZeRO-3 must gather them there too."""
    import torch.multiprocessing as mp

    mp.spawn(_zero3_rank, args=(free_port(), tmp_path), nprocs=2)

    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["partitioned"]
        for persons in (1, 2):
            torch.testing.assert_close(result["zero3"][persons], result["before"][persons])
        assert not torch.allclose(result["trained"], result["before"][1])  # the audio branch trained


def _batch(sources: list[str], persons: int = 1) -> ClipBatch:
    size = len(sources)
    return ClipBatch(
        keys=[f"clip{i}" for i in range(size)],
        epochs=[0] * size,
        sources=sources,
        stream=0,
        video=torch.zeros(size, 9, 16, 16, 3, dtype=torch.uint8),
        audio=torch.ones(size, persons, 9, 5, 12, 32, dtype=torch.float16),
        audio_streams=torch.tensor([persons if source == AI2V else 0 for source in sources]),
        region_masks=torch.ones(size, persons + 1, 2, 2),
        captions=["a caption"] * size,
    )


def test_i2v_clips_and_dropped_audio_see_one_silent_stream_as_the_null_audio_of_guidance():
    batch = _batch([AI2V] * 200 + [I2V] * 50, persons=2)
    config = ObjectiveConfig(text_dropout=0.2, audio_dropout=0.3, null_prompt="")

    captions, audio, streams = drop_conditions(batch, config, torch.Generator().manual_seed(0))

    silent = audio.flatten(1).abs().sum(1) == 0
    assert silent[200:].all() and (streams[200:] == 1).all()
    ai2v_silent = silent[:200]
    assert 0.2 < ai2v_silent.float().mean() < 0.4  # the audio dropout rate
    assert (streams[:200][ai2v_silent] == 1).all() and (streams[:200][~ai2v_silent] == 2).all()
    assert 0.12 < np.mean([caption == "" for caption in captions]) < 0.28  # the text dropout rate


def test_interleaving_keeps_the_i2v_ratio_in_every_window():
    mixed = list(zip(range(40), interleave(iter(["a"] * 100), iter(["i"] * 100), 0.25), strict=False))

    for start in range(0, 40, 4):
        assert [item for _, item in mixed[start : start + 4]].count("i") == 1


def test_streams_partition_the_shards_whatever_their_number():
    for shards in (["a", "b", "c", "d", "e"], ["a", "b"], ["a"]):
        owners = defaultdict(list)
        for stream in range(4):
            for part in split_shards(shards, stream, 4):
                for index in range(12):  # 12 samples per shard
                    if index % part.every == part.offset:
                        owners[(part.url, index)].append(stream)
        assert sorted(owners) == [(shard, index) for shard in shards for index in range(12)]
        assert all(len(streams) == 1 for streams in owners.values())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"data": {"num_frames": 8}}, "data.num_frames: Value error, must be 4n + 1"),
        ({"model": {"preset": "huge"}}, "model.preset: Value error, unknown preset 'huge'"),
        ({"optimizer": {"lrr": 1.0}}, "optimizer.lrr: Extra inputs are not permitted"),
        ({"schedule": {"global_batch_size": 6}}, "schedule.global_batch_size 6 is not a multiple of micro_batch"),
        ({"model": {"audio_weights": "/nonexistent/multitalk.safetensors"}}, "model.audio_weights: /nonexistent"),
    ],
)
def test_bad_config_fails_naming_the_field(tmp_path, fields, message):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["model"]["model_dir"] = str(tmp_path)
    for section, values in fields.items():
        config[section] = {**config[section], **values}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(path, data=str(tmp_path), output=str(tmp_path / "out"))
    assert str(path) in str(error.value)
