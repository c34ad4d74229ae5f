"""Training on real Ray Train + DeepSpeed (CPU, gloo, 2 workers) over shards curated from the shared media.

The tiny model overfits, frozen weights never change, a worker killed mid-run (held at the pause point after the
first checkpoint) resumes from the last checkpoint and finishes the planned steps without training a clip twice in
the resumed epoch, checkpoints hold the audio branch only, the exported weights load through the original-format
converter, and stage 2 starts from stage 1's export and trains two-person clips with each voice on its region. The
shards come from pipelines/curate.py. The unit tests of the model, objective, data streams and config are in
test_training.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitalk_model.audio import load_audio_track
from multitalk_model.checkpoints import build_model, load_weights
from multitalk_model.components import transformer_weights
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from multitalk_model.media import read_video_frames, write_video
from pipelines.config import load_config as load_curation_config
from pipelines.curate import run as curate
from tests.helpers import PauseGate, short_window_curation
from training.checkpointing import TAG, trainable_state_dict
from training.config import DataConfig, ModelConfig, ObjectiveConfig
from training.data import AI2V, ClipStream, CursorTracker
from training.encoders import FrozenEncoders
from training.export import export_checkpoint
from training.metrics import LOSS_CURVE_FILE, METRICS_FILE, TENSORBOARD_DIR, read_metrics
from training.model import build_training_model
from training.objective import model_inputs, velocity_loss

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "tiny-cpu.yaml"
TINY = get_preset("tiny")
STAGE1_STEPS = 20
CHECKPOINT_EVERY = 8


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
    (work / f"{name}.yaml").write_text(yaml.safe_dump(short_window_curation(config)))
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


def _registered(output: Path, run_name: str, step: int) -> bool:
    """Whether Ray Train has registered the step's checkpoint, so that a restarted worker group resumes from it."""
    snapshot = output / "ray" / run_name / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and f"checkpoint_{step:08d}" in snapshot.read_text()


@pytest.fixture(scope="module")
def stage1(local_ray, corpus, tiny_model_dir, tmp_path_factory) -> Path:
    """Stage 1 on single-speaker + multi-event shards; one worker is killed, held after the first checkpoint."""
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
    gate, pause = PauseGate(), f"training-checkpoint-{CHECKPOINT_EVERY}"
    gate.hold(pause)
    process = _train(config, corpus, output, local_ray, STAGE1_STEPS, log)
    try:
        workers = gate.wait_reached(pause, count=2, alive=lambda: process.poll() is None)
        deadline = time.monotonic() + 120
        while not _registered(output, "stage1", CHECKPOINT_EVERY):  # so the restarted group resumes from it
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        # Mid-run: both workers logged exactly the steps up to the checkpoint.
        assert {rank: max(steps) for rank, steps in _logged_steps(output).items()} == {
            0: CHECKPOINT_EVERY,
            1: CHECKPOINT_EVERY,
        }
        os.kill(workers[-1], signal.SIGKILL)
    finally:
        gate.release(pause)
    assert process.wait(timeout=400) == 0, log.read_text()[-4000:]
    return output


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

    resumed = _epoch_keys(iter(stream(CursorTracker.resume([saved], 1, range(1)).streams)), epoch=0)

    trained = sorted(tracker.streams[0][AI2V].keys)
    assert len(trained) == 3 and len(uninterrupted) > 3
    assert sorted(trained + resumed) == sorted(uninterrupted) == sorted(set(uninterrupted))


def test_loss_falls_clearly_within_the_planned_steps(stage1):
    losses = [record["loss"] for record in read_metrics(stage1 / METRICS_FILE)]

    assert len(losses) == STAGE1_STEPS
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:3])


def test_no_frozen_parameter_changed(stage1):
    final = read_metrics(stage1 / METRICS_FILE)[-1]

    assert final["step"] == STAGE1_STEPS and final["frozen_tensors_changed"] == 0


def _logged_steps(output: Path) -> dict[int, list[int]]:
    """rank -> the steps its sample log holds so far."""
    steps = defaultdict(list)
    for rank, step in _sample_log(output):
        steps[rank].append(step)
    return dict(steps)


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
    encoders = FrozenEncoders.load(tiny_model_dir, TINY, "cpu", torch.float32)
    data = DataConfig(path=str(corpus), ai2v_kinds=["dual"], i2v_ratio=0, num_frames=9, max_area=2304, num_workers=0)
    batch = next(iter(ClipStream(data, TINY, micro_batch_size=2, seed=0, rank=0, world_size=1)))
    # First-clip conditioning (9-frame clips hold no 25 motion frames); the motion-frame share is tested elsewhere.
    objective = ObjectiveConfig(text_dropout=0, audio_dropout=0, motion_condition_ratio=0)
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
