"""Training on real Ray Train + DeepSpeed (CPU, gloo, 2 workers) over shards curated from the shared media.

The tiny model overfits, frozen weights never change, a worker killed mid-run resumes from the last checkpoint and
finishes the planned steps without training a clip twice in the resumed epoch, checkpoints hold the audio branch
only, the exported weights load through the original-format converter, and stage 2 starts from stage 1's export and
trains two-person clips with each voice on its region. The shards come from pipelines/curate.py.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
import yaml
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from multitalk_model.audio import load_audio_track
from multitalk_model.checkpoints import build_model, load_weights
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from multitalk_model.media import read_video_frames, write_video
from multitalk_model.transformer import model_kwargs
from pipelines.config import load_config as load_curation_config
from pipelines.curate import run as curate
from training.checkpointing import TAG, trainable_state_dict
from training.config import ConfigError, DataConfig, ModelConfig, ObjectiveConfig, load_config
from training.data import AI2V, I2V, ClipBatch, ClipStream, CursorTracker, interleave, split_shards
from training.encoders import FrozenEncoders
from training.export import export_checkpoint
from training.metrics import LOSS_CURVE_FILE, METRICS_FILE, TENSORBOARD_DIR, read_metrics
from training.model import build_training_model, check_trainable, transformer_weights
from training.objective import drop_conditions, model_inputs, velocity_loss

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "tiny-cpu.yaml"
TINY = get_preset("tiny")
STAGE1_STEPS = 20
CHECKPOINT_EVERY = 8


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


def _curate(work: Path, name: str, rows: list[dict], frame_num: int, stride: int, wav2vec: Path, output: Path) -> None:
    (work / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "clips": {"frame_num": frame_num, "stride": stride},
        "faces": {"detect_every": 8, "num_cpus": 0.5},
        "audio": {"min_speech_s": 0.3},
        "speakers": {"min_speaking_s": 0.2},
        "wav2vec": {"model_path": str(wav2vec), "num_cpus": 0.5, "batch_size": 4},
        "shards": {"size": 3},
    }
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
    curate(load_curation_config(work / f"{name}.yaml", input=str(work / f"{name}.jsonl"), output=str(output)))


@pytest.fixture(scope="module")
def corpus(local_ray, shared_media, tmp_path_factory) -> Path:
    """Shards curated by pipelines/curate.py: single-speaker and multi-event clips, then two-person clips."""
    work = tmp_path_factory.mktemp("curation")
    output = work / "shards"
    wav2vec = build_tiny_wav2vec2(work / "wav2vec2")
    talking = [
        {"path": str(shared_media / "talking_woman_25fps.mp4"), "kind": "single", "caption": "a woman talking"},
        {"path": str(shared_media / "talking_man_25fps.mp4"), "kind": "single", "caption": "a man talking"},
        {"path": str(shared_media / "talking_man_30fps.mp4"), "kind": "multi_event", "caption": "a man in a room"},
    ]
    _curate(work, "talking", talking, frame_num=17, stride=17, wav2vec=wav2vec, output=output)
    # The 1.5 s around the turn of the conversation: every window of it holds both voices.
    source, start_s, num_frames = shared_media / "conversation_left_then_right.mp4", 4.3, 37
    frames = read_video_frames(source, 25, start_s, num_frames)
    audio, rate = load_audio_track(source)
    samples = audio[:, round(start_s * rate) : round((start_s + num_frames / 25) * rate)]
    turn = write_video(work / "turn.mp4", frames, 25, samples, rate)
    conversation = [{"path": str(turn), "kind": "dual", "caption": "two people talking"}]
    _curate(work, "conversation", conversation, frame_num=33, stride=4, wav2vec=wav2vec, output=output)
    return output


def _write_config(path: Path, model_dir: Path, **sections) -> Path:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["model"]["model_dir"] = str(model_dir)
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


def _train(config: Path, data: Path, output: Path, address: str, max_steps: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address}
    command = [sys.executable, str(REPO / "training" / "train.py"), "--config", str(config), "--data", str(data)]
    command += ["--output", str(output), "--max-steps", str(max_steps)]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _train_workers() -> list[psutil.Process]:
    """This test's Ray Train worker processes (not their data loader processes, which carry the same title)."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()) and "RayTrainWorker" not in " ".join(
                process.parent().cmdline()
            ):
                workers.append(process)
        except psutil.NoSuchProcess:
            continue
    return workers


def _registered(output: Path, run_name: str, step: int) -> bool:
    """Whether Ray Train has registered the step's checkpoint, so that a restarted worker group resumes from it."""
    snapshot = output / "ray" / run_name / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and f"checkpoint_{step:08d}" in snapshot.read_text()


@pytest.fixture(scope="module")
def stage1(local_ray, corpus, tiny_model_dir, tmp_path_factory) -> Path:
    """Stage 1 on single-speaker + multi-event shards; one worker is killed after the first checkpoint."""
    work = tmp_path_factory.mktemp("stage1")
    config = _write_config(
        work / "stage1.yaml",
        tiny_model_dir,
        data={"ai2v_kinds": ["single"], "log_sample_keys": True},
        schedule={"checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 5},
        cluster={"run_name": "stage1"},
    )
    output = work / "out"
    log = work / "train.log"
    process = _train(config, corpus, output, local_ray, STAGE1_STEPS, log)
    deadline = time.monotonic() + 400
    while not _registered(output, "stage1", CHECKPOINT_EVERY) and process.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    assert process.poll() is None, log.read_text()[-4000:]
    workers = _train_workers()
    assert len(workers) == 2, [w.cmdline() for w in workers]
    workers[-1].send_signal(signal.SIGKILL)
    assert process.wait(timeout=400) == 0, log.read_text()[-4000:]
    return output


# ------------------------------------------------------------------------------------ model and objective


def test_step_zero_reproduces_the_base_image_to_video_model(tiny_model_dir):
    model = build_training_model(ModelConfig(preset="tiny", model_dir=str(tiny_model_dir), precision="fp32"), "cpu", 0)
    names = inspect.signature(WanTransformer3DModel.__init__).parameters
    base = WanTransformer3DModel(**{k: v for k, v in model_kwargs(TINY).items() if k in names})
    missing, unexpected = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) <= set(model.audio_parameter_names())
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, TINY.in_channels, 3, 6, 6, generator=gen),
        "timestep": torch.tensor([100.0, 900.0]),
        "encoder_hidden_states": torch.randn(2, TINY.text_len, TINY.text_dim, generator=gen),
        "encoder_hidden_states_image": torch.randn(2, 257, TINY.image_dim, generator=gen),
    }
    masks = torch.zeros(2, 3, 6, 6)
    masks[:, 0, 1:, :3], masks[:, 1, 1:, 3:], masks[:, 2, :1] = 1, 1, 1
    audio = torch.randn(2, 2, 9, TINY.audio_window, TINY.audio_layers, TINY.audio_channels, generator=gen)

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
    generator = torch.Generator().manual_seed(1)
    inputs = {
        persons: {
            "hidden_states": torch.randn(1, TINY.in_channels, 3, 8, 8, generator=generator),
            "timestep": torch.full((1,), 500.0),
            "encoder_hidden_states": torch.randn(1, 7, TINY.text_dim, generator=generator),
            "encoder_hidden_states_image": torch.randn(1, 257, TINY.image_dim, generator=generator),
            "audio": torch.randn(
                1, persons, 9, TINY.audio_window, TINY.audio_layers, TINY.audio_channels, generator=generator
            ),
            "region_masks": torch.stack([torch.ones(8, 8).tril(), torch.ones(8, 8).triu(1), torch.zeros(8, 8)])[None]
            if persons == 2 else None,
        }
        for persons in (1, 2)
    }  # fmt: skip
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


def test_zero3_partitions_every_weight_and_the_forwards_and_a_step_still_work(tmp_path):
    """The one-person audio attention reads its projection weights inside its forward (folded into the audio keys and
    values): ZeRO-3 must gather them there too."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_zero3_rank, args=(port, tmp_path), nprocs=2)

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


# ----------------------------------------------------------------------------------------------- data


def _epoch_keys(batches, epoch: int) -> list[str]:
    """The clip ids of the batches up to the first one of a later epoch."""
    keys = []
    for batch in batches:
        if batch.epochs[0] > epoch:
            return keys
        keys += batch.keys
    return keys


def test_a_resumed_stream_trains_the_rest_of_its_epoch_exactly_once(corpus):
    config = DataConfig(
        path=str(corpus), ai2v_kinds=["single"], i2v_ratio=0, num_frames=9, max_area=2304, num_workers=0
    )

    def stream(cursor=None) -> ClipStream:
        return ClipStream(config, TINY, 1, seed=0, rank=0, world_size=1, cursor=cursor)

    uninterrupted = _epoch_keys(iter(stream()), epoch=0)
    tracker = CursorTracker(1)
    batches = iter(stream())
    for _ in range(3):
        tracker.advance(next(batches))
    saved = json.loads(json.dumps(tracker.state_dict()))  # as it travels in a checkpoint

    resumed = _epoch_keys(iter(stream(CursorTracker.from_state_dict(saved, 1).streams)), epoch=0)

    trained = sorted(tracker.streams[0][AI2V].keys)
    assert len(trained) == 3 and len(uninterrupted) > 3
    assert sorted(trained + resumed) == sorted(uninterrupted) == sorted(set(uninterrupted))


# -------------------------------------------------------------------------------- stage 1 (with a kill)


def test_loss_falls_clearly_within_the_planned_steps(stage1):
    losses = [record["loss"] for record in read_metrics(stage1 / METRICS_FILE)]

    assert len(losses) == STAGE1_STEPS
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:3])


def test_no_frozen_parameter_changed(stage1):
    final = read_metrics(stage1 / METRICS_FILE)[-1]

    assert final["step"] == STAGE1_STEPS and final["frozen_tensors_changed"] == 0


def _sample_log(output: Path) -> dict[tuple[int, int], dict]:
    """(rank, step) -> the record of the attempt that counted (the last one written)."""
    records = {}
    for path in sorted((output / "samples").glob("rank*.jsonl")):
        rank = int(re.search(r"rank(\d+)", path.name).group(1))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[(rank, record["step"])] = record
    return records


def test_killed_worker_resumes_from_the_last_checkpoint_and_finishes_the_planned_steps(stage1):
    records = _sample_log(stage1)
    checkpoints = sorted(path.name for path in (stage1 / "ray" / "stage1").glob("checkpoint_0*"))

    assert sorted(records) == [(rank, step) for rank in range(2) for step in range(1, STAGE1_STEPS + 1)]
    for rank in range(2):  # the steps after the last checkpoint ran in a new worker process
        before = {records[(rank, step)]["pid"] for step in range(1, CHECKPOINT_EVERY + 1)}
        after = {records[(rank, step)]["pid"] for step in range(CHECKPOINT_EVERY + 1, STAGE1_STEPS + 1)}
        assert len(before) == len(after) == 1 and before != after
    steps = sorted({*range(CHECKPOINT_EVERY, STAGE1_STEPS + 1, CHECKPOINT_EVERY), STAGE1_STEPS})
    assert checkpoints == [f"checkpoint_{step:08d}" for step in steps]


def test_no_clip_is_trained_twice_in_the_resumed_epoch(stage1):
    steps_of = defaultdict(list)  # (rank, source, epoch) -> [(step, clip id)]
    for (rank, step), record in _sample_log(stage1).items():
        for key, epoch, source in record["clips"]:
            steps_of[(rank, source, epoch)].append((step, key))
    # Epochs the checkpoint cut in two: started before it, finished after the restart.
    resumed = [
        clips
        for clips in steps_of.values()
        if min(step for step, _ in clips) <= CHECKPOINT_EVERY < max(step for step, _ in clips)
    ]

    assert resumed
    for clips in steps_of.values():
        keys = [key for _, key in clips]
        assert len(keys) == len(set(keys)), clips


def test_checkpoint_holds_the_audio_branch_only(stage1, tiny_model_dir):
    checkpoint = stage1 / "ray" / "stage1" / f"checkpoint_{STAGE1_STEPS:08d}"
    audio_names = set(build_model(TINY, "meta").audio_parameter_names())
    audio_numel = sum(p.numel() for n, p in build_model(TINY, "meta").named_parameters() if n in audio_names)

    model_states = torch.load(checkpoint / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert set(model_states["module"]) == audio_names
    assert set(trainable_state_dict(checkpoint)) == audio_names
    optimizer_numel = 0
    for path in (checkpoint / TAG).glob("zero_pp_rank_*_optim_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        optimizer_numel += sum(t.numel() for t in state["single_partition_of_fp32_groups"])
    assert optimizer_numel == audio_numel  # the fp32 partitions of all ranks: the audio branch, once


def test_exported_audio_weights_load_through_the_original_format_converter_with_the_same_outputs(
    stage1, tiny_model_dir, tmp_path
):
    checkpoint = stage1 / "ray" / "stage1" / f"checkpoint_{STAGE1_STEPS:08d}"
    exported = export_checkpoint(checkpoint, tmp_path / "multitalk.safetensors")
    final = load_file(stage1 / "multitalk.safetensors")
    assert all(torch.equal(final[key], tensor) for key, tensor in load_file(exported).items())
    assert all(key.startswith(("blocks.", "audio_proj.")) for key in final)

    trained = build_model(TINY, "meta")
    load_weights(trained, [transformer_weights(tiny_model_dir)], strict=False)
    trained.load_state_dict(trainable_state_dict(checkpoint), strict=False, assign=True)
    reloaded = build_model(TINY, "meta")
    load_weights(reloaded, [transformer_weights(tiny_model_dir), (exported, "original")])
    reloaded.rope, trained.rope = build_model(TINY, "cpu").rope, build_model(TINY, "cpu").rope
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, TINY.in_channels, 3, 6, 6, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 20, TINY.text_dim, generator=gen),
        "encoder_hidden_states_image": torch.randn(1, 257, TINY.image_dim, generator=gen),
        "audio": torch.randn(1, 1, 9, TINY.audio_window, TINY.audio_layers, TINY.audio_channels, generator=gen),
    }

    with torch.no_grad():
        expected = trained.eval()(**inputs).sample
        actual = reloaded.eval()(**inputs).sample

    reloaded_params = dict(reloaded.named_parameters())
    assert all(torch.equal(param, reloaded_params[name]) for name, param in trained.named_parameters())
    # Bit-equal weights; the outputs may differ in the last bits only, as BLAS kernels depend on memory alignment.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert any(block.attn_audio.to_out.weight.any() for block in reloaded.blocks)  # trained, no longer zero


def test_metrics_reach_tensorboard_and_the_loss_curve(stage1):
    final = read_metrics(stage1 / METRICS_FILE)[-1]

    for name in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "data_wait_fraction"):
        assert np.isfinite(final[name]) and final[name] >= 0, name
    assert final["samples_per_s"] > 0 and final["tokens_per_s"] > 0 and 0 < final["mfu"] < 1
    assert list((stage1 / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert (stage1 / LOSS_CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- stage 2


def test_stage2_starts_from_stage1_exported_weights(stage1, tiny_model_dir):
    exported = load_file(stage1 / "multitalk.safetensors")
    audio_weights = str(stage1 / "multitalk.safetensors")
    config = ModelConfig(preset="tiny", model_dir=str(tiny_model_dir), audio_weights=audio_weights, precision="fp32")

    model = build_training_model(config, "cpu", seed=0)

    params = dict(model.named_parameters())
    kv = exported["blocks.0.audio_cross_attn.kv_linear.weight"]
    assert torch.equal(params["blocks.0.attn_audio.to_k.weight"], kv[: kv.shape[0] // 2])
    assert torch.equal(params["audio_adapter.token_proj.weight"], exported["audio_proj.proj3.weight"])
    assert torch.equal(params["blocks.1.attn_audio.to_out.weight"], exported["blocks.1.audio_cross_attn.proj.weight"])


def test_stage2_trains_two_person_clips_with_each_voice_on_its_person_region(stage1, corpus, tiny_model_dir):
    audio_weights = str(stage1 / "multitalk.safetensors")
    config = ModelConfig(preset="tiny", model_dir=str(tiny_model_dir), audio_weights=audio_weights, precision="fp32")
    model = build_training_model(config, "cpu", seed=0)
    encoders = FrozenEncoders.load(tiny_model_dir, model, TINY, "cpu", torch.float32)
    data = DataConfig(path=str(corpus), ai2v_kinds=["dual"], i2v_ratio=0, num_frames=9, max_area=2304, num_workers=0)
    batch = next(iter(ClipStream(data, TINY, micro_batch_size=2, seed=0, rank=0, world_size=1)))
    objective = ObjectiveConfig(text_dropout=0, audio_dropout=0)
    generator = torch.Generator().manual_seed(0)

    inputs = model_inputs(batch, encoders, objective, generator, torch.device("cpu"), torch.float32)
    velocity_loss(model, inputs, objective, generator).backward()

    assert batch.audio_streams.tolist() == [2, 2]
    left, right = batch.region_masks[0, :2]  # at 4 x 8 latent pixels the regions leave no background
    columns = torch.arange(left.shape[1], dtype=torch.float32)
    assert (columns * left).sum() / left.sum() < (columns * right).sum() / right.sum()  # person 1 is on the left
    assert not (left * right).any()
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert all(grads[name] is not None and grads[name].any() for name in model.audio_parameter_names())
    assert all(grad is None for name, grad in grads.items() if name not in set(model.audio_parameter_names()))


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
