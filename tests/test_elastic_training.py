"""Elastic training (`cluster.min_workers`): a run that loses a node goes on with fewer workers.

On a simulated cluster (`ray.cluster_utils.Cluster`: a head and two training nodes of one worker each) a run of
`num_workers: 2, min_workers: 1` is held at the pause point after its first checkpoint, the node of world rank 1 is
removed and none replaces it: Ray Train restarts the group with the one worker left, which resumes from the
checkpoint with the global batch (it accumulates two micro-batches per step instead of one) and the data cursors of
both old streams, and finishes. Checked: one worker after the resize, every clip trained exactly once in the first
epoch across it, the exported weights load. The data streams alone are checked across resizes too (2 streams to 1
with the streams in different epochs, 1 to 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from multitalk_model.checkpoints import build_model, load_weights
from multitalk_model.components import transformer_weights
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from tests.helpers import PauseGate
from tests.test_multinode_training import TRAINER, _corpus_clips, training_cluster
from tests.test_training_ray import _curate, _registered, _sample_log, _write_config
from training.config import DataConfig, TrainingConfig
from training.data import ClipStream, CursorTracker, split_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")
RUN = "elastic"
CHECKPOINT_EVERY = 3


@pytest.fixture(scope="module")
def cluster():
    with training_cluster() as simulated:
        yield simulated


@pytest.fixture(scope="module")
def corpus(cluster, shared_media, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("curation")
    output = work / "shards"
    wav2vec = build_tiny_wav2vec2(work / "wav2vec2")
    rows = [{"path": str(shared_media / "talking_woman_25fps.mp4"), "kind": "single", "caption": "a woman talking"}]
    _curate(work, "talking", rows, frame_num=17, stride=17, wav2vec=wav2vec, output=output)
    return output


def _stream(corpus: Path, rank: int, world_size: int, tracker: CursorTracker | None = None) -> ClipStream:
    config = DataConfig(
        path=str(corpus), ai2v_kinds=["single"], i2v_ratio=0, num_frames=9, max_area=2304, num_workers=0
    )
    stream = ClipStream(config, TINY, 1, seed=0, rank=rank, world_size=world_size)
    if tracker is not None:
        stream.cursor, stream.earlier = tracker.streams, tracker.earlier
    return stream


def _train(stream: ClipStream, tracker: CursorTracker, clips: int) -> list[tuple[int, str]]:
    """Advances the cursor over the stream's first clips; returns their (epoch, clip id)."""
    batches, trained = iter(stream), []
    for _ in range(clips):
        batch = next(batches)
        tracker.advance(batch)
        trained += zip(batch.epochs, batch.keys, strict=True)
    return trained


def _keys_by_epoch(stream: ClipStream, epochs: int) -> dict[int, list[str]]:
    """The clip ids a stream yields in each of its epochs below `epochs`."""
    keys = defaultdict(list)
    for batch in stream:
        if batch.epochs[0] >= epochs:
            return keys
        keys[batch.epochs[0]] += batch.keys
    return keys


def _saved(tracker: CursorTracker) -> dict:
    return json.loads(json.dumps(tracker.state_dict()))  # as it travels in a checkpoint


def test_two_streams_in_different_epochs_resumed_as_one_train_every_clip_once_per_epoch(corpus):
    clips = sorted(key for keys in _corpus_clips(corpus).values() for key in keys)
    per_stream = [len(_keys_by_epoch(_stream(corpus, rank, 2), 1)[0]) for rank in range(2)]
    trackers = [CursorTracker(2) for _ in range(2)]
    before = _train(_stream(corpus, 0, 2), trackers[0], per_stream[0] + 1)  # into its second epoch
    before += _train(_stream(corpus, 1, 2), trackers[1], 1)

    tracker = CursorTracker.resume([_saved(t) for t in trackers], 1, range(1))
    resumed = _keys_by_epoch(_stream(corpus, 0, 1, tracker), 2)

    for epoch in range(2):
        trained = [key for e, key in before if e == epoch] + resumed[epoch]
        assert sorted(trained) == clips, epoch


def test_one_stream_resumed_as_two_trains_the_rest_of_the_epoch_once(corpus):
    clips = sorted(key for keys in _corpus_clips(corpus).values() for key in keys)
    tracker = CursorTracker(1)
    before = [key for _, key in _train(_stream(corpus, 0, 1), tracker, 3)]

    resumed = [CursorTracker.resume([_saved(tracker)], 2, range(rank, rank + 1)) for rank in range(2)]
    rest = [key for rank in range(2) for key in _keys_by_epoch(_stream(corpus, rank, 2, resumed[rank]), 1)[0]]

    assert sorted(rest + before) == clips


@pytest.fixture(scope="module")
def run(cluster, corpus, tiny_model_dir, tmp_path_factory) -> tuple[Path, list[str], dict]:
    """A run of 1 to 2 workers, the node of rank 1 removed held after the first checkpoint; no node replaces it."""
    cluster, nodes = cluster
    shards = _corpus_clips(corpus)
    clips = sorted(key for keys in shards.values() for key in keys)
    stream_sizes = [sum(len(shards[part.url]) for part in split_shards(sorted(shards), s, 2)) for s in range(2)]
    # First-epoch clips left at the checkpoint (one clip per worker per step before it; a small stream may already
    # be in a later epoch), then two a step on the survivor: it ends past the first epoch.
    left = sum(max(0, size - CHECKPOINT_EVERY) for size in stream_sizes)
    assert left > 0, stream_sizes
    steps = CHECKPOINT_EVERY + left // 2 + 1
    work = tmp_path_factory.mktemp("training")
    config = _write_config(
        work / "config.yaml",
        tiny_model_dir,
        data={"ai2v_kinds": ["single"], "i2v_ratio": 0, "num_workers": 0, "log_sample_keys": True},
        schedule={"global_batch_size": 2, "micro_batch_size": 1, "checkpoint_every": CHECKPOINT_EVERY},
        cluster={"run_name": RUN, "num_workers": 2, "min_workers": 1, "worker_resources": TRAINER},
    )
    output, log = work / "shared", work / "train.log"
    gate, pause = PauseGate(), f"training-checkpoint-{CHECKPOINT_EVERY}"
    gate.hold(pause)
    command = [sys.executable, str(REPO / "training" / "train.py"), "--config", str(config), "--data", str(corpus)]
    command += ["--output", str(output), "--max-steps", str(steps)]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        gate.wait_reached(pause, count=2, alive=lambda: process.poll() is None)
        deadline = time.monotonic() + 120
        while not _registered(output, RUN, CHECKPOINT_EVERY):  # so the restarted group resumes from it
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        doomed = _sample_log(output)[(1, CHECKPOINT_EVERY)]["node"]
        cluster.remove_node(next(node for node in nodes if node.node_id == doomed))
    finally:
        gate.release(pause)
    assert process.wait(timeout=600) == 0, log.read_text()[-4000:]
    return output, clips, {"steps": steps, "doomed": doomed}


def test_the_run_goes_on_with_the_one_worker_left(run):
    output, _, facts = run
    records = _sample_log(output)

    after = range(CHECKPOINT_EVERY + 1, facts["steps"] + 1)
    assert sorted(records) == [(0, step) for step in range(1, facts["steps"] + 1)] + [
        (1, step) for step in range(1, CHECKPOINT_EVERY + 1)
    ]
    assert facts["doomed"] not in {records[(0, step)]["node"] for step in after}
    assert all(len(records[(0, step)]["clips"]) == 2 for step in after)  # the global batch of 2 kept


def test_every_clip_is_trained_exactly_once_in_the_first_epoch_across_the_resize(run):
    output, clips, _ = run
    trained = Counter()
    for record in _sample_log(output).values():
        trained.update(key for key, epoch, _ in record["clips"] if epoch == 0)

    assert sorted(trained) == clips and set(trained.values()) == {1}


def test_the_exported_audio_weights_load(run, tiny_model_dir):
    output, _, _ = run
    exported = output / "multitalk.safetensors"
    model = build_model(TINY, "meta")

    load_weights(model, [transformer_weights(tiny_model_dir), (exported, "original")])

    assert any(block.attn_audio.to_out.weight.any() for block in model.blocks)
    assert all(torch.isfinite(tensor).all() for tensor in load_file(exported).values())


def test_a_shrunken_group_keeps_the_global_batch_and_bad_ranges_are_refused():
    base = {"model": {"preset": "tiny"}, "deepspeed": {"zero_stage": 2}, "schedule": {"global_batch_size": 64}}
    config = TrainingConfig.model_validate({**base, "cluster": {"num_workers": 64, "min_workers": 24}})

    assert (config.accumulation_steps(64), config.step_batch_size(64)) == (1, 64)
    assert (config.accumulation_steps(32), config.step_batch_size(32)) == (2, 64)
    assert (config.accumulation_steps(24), config.step_batch_size(24)) == (3, 72)  # rounded up, never fewer
    with pytest.raises(ValidationError, match="cluster.min_workers 65 exceeds"):
        TrainingConfig.model_validate({**base, "cluster": {"num_workers": 64, "min_workers": 65}})
    with pytest.raises(ValidationError, match="ZeRO 1 or 2"):
        TrainingConfig.model_validate({**base, "cluster": {"min_workers": 8}, "deepspeed": {"zero_stage": 3}})
