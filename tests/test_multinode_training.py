"""Training on a simulated Ray cluster: two nodes of one worker each, DeepSpeed over gloo, one node killed mid-run.

`ray.cluster_utils.Cluster` starts a head (the drivers, one CPU) and two worker nodes on this machine, each with its
own raylet, object store, IP (127.0.0.2, 127.0.0.3: Ray Train numbers nodes by IP) and a `trainer` resource that
admits one training worker. Curation runs on both nodes and writes the corpus into a folder every node sees, as a
cluster's shared volume. Training is held at the pause point after its first checkpoint, the node of world rank 1
is removed with its raylet and workers, a fresh node joins, and the run resumes from the checkpoint in the shared
storage. Checked: node, local and world ranks; every clip trained exactly once in each stream's epoch across the
nodes (no clip lost or repeated by the restart); both nodes' parts of every checkpoint in the shared storage; the
exported audio weights load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from multitalk_model.checkpoints import build_model, load_weights
from multitalk_model.components import transformer_weights
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from pipelines.schema import MANIFEST_FILE
from tests.helpers import PauseGate, add_simulated_node, simulated_cluster
from tests.test_training_ray import _curate, _registered, _sample_log, _write_config
from training.data import split_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")
RUN = "multinode"
CHECKPOINT_EVERY = 3
TRAINER = {"trainer": 1}  # the custom resource of a training node: one worker each
TRAINING_NODE = {"num_cpus": 1, "resources": TRAINER}


def training_cluster():
    """A head and two training nodes (127.0.0.2, .3). The head's CPU runs curation's tasks beside its model actors on
    the training nodes; no trainer lands there."""
    return simulated_cluster(head={"num_cpus": 1}, nodes={ip: TRAINING_NODE for ip in ("127.0.0.2", "127.0.0.3")})


@pytest.fixture(scope="module")
def cluster():
    with training_cluster() as simulated:
        yield simulated


@pytest.fixture(scope="module")
def corpus(cluster, shared_media, tmp_path_factory) -> Path:
    """Single-speaker shards curated on the two nodes into the shared folder."""
    work = tmp_path_factory.mktemp("curation")
    output = work / "shards"
    wav2vec = build_tiny_wav2vec2(work / "wav2vec2")
    rows = [{"path": str(shared_media / "talking_woman_25fps.mp4"), "kind": "single", "caption": "a woman talking"}]
    _curate(work, "talking", rows, frame_num=17, stride=17, wav2vec=wav2vec, output=output)
    return output


def _corpus_clips(corpus: Path) -> dict[str, list[str]]:
    """Shard name -> its clip ids, the single-speaker shards of the corpus."""
    shards = defaultdict(list)
    for row in pq.read_table(corpus / MANIFEST_FILE).to_pylist():
        if row["kind"] == "single":
            shards[row["shard"]].append(row["clip_id"])
    return dict(shards)


@pytest.fixture(scope="module")
def run(cluster, corpus, tiny_model_dir, tmp_path_factory) -> tuple[Path, list[str], dict]:
    """Trains past the end of every stream's first epoch; the node of rank 1 dies held after the first checkpoint."""
    cluster, nodes = cluster
    shards = _corpus_clips(corpus)
    clips = sorted(clip for shard_clips in shards.values() for clip in shard_clips)
    names = sorted(shards)
    per_stream = [sum(len(shards[part.url]) for part in split_shards(names, stream, 2)) for stream in range(2)]
    steps = max(per_stream) + 1  # one clip per worker per step: every stream crosses into its second epoch
    assert steps > CHECKPOINT_EVERY + 1 and all(per_stream), shards
    work = tmp_path_factory.mktemp("training")
    config = _write_config(
        work / "config.yaml",
        tiny_model_dir,
        data={"ai2v_kinds": ["single"], "i2v_ratio": 0, "num_workers": 0, "log_sample_keys": True},
        schedule={"global_batch_size": 2, "micro_batch_size": 1, "checkpoint_every": CHECKPOINT_EVERY},
        cluster={"run_name": RUN, "worker_resources": TRAINER},
    )
    output, log = work / "shared", work / "train.log"  # `shared`: the folder both nodes write
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
        replacement = add_simulated_node(cluster, "127.0.0.4", **TRAINING_NODE)
    finally:
        gate.release(pause)
    assert process.wait(timeout=600) == 0, log.read_text()[-4000:]
    node_ips = {node.node_id: node.node_ip_address for node in [*nodes, replacement]}
    return output, clips, {"steps": steps, "doomed": doomed, "node_ips": node_ips}


def test_each_worker_runs_on_its_own_node_with_the_right_ranks(run):
    output, _, facts = run
    records = _sample_log(output)

    assert sorted(records) == [(rank, step) for rank in range(2) for step in range(1, facts["steps"] + 1)]
    for (rank, _), record in records.items():
        assert (record["node_rank"], record["local_rank"]) == (rank, 0)
    before = {rank: records[(rank, CHECKPOINT_EVERY)]["node"] for rank in range(2)}
    after = {rank: records[(rank, facts["steps"])]["node"] for rank in range(2)}
    assert len(set(before.values())) == len(set(after.values())) == 2  # one worker per node
    assert before[1] == facts["doomed"] and facts["doomed"] not in after.values()
    # The restarted group runs on the surviving and the fresh node, its ranks in any order: each rank finds its data
    # cursor in the shared storage wherever it ran before.
    ips = facts["node_ips"]
    assert {ips[node] for node in after.values()} == {ips[before[0]], "127.0.0.4"}


def test_the_run_resumed_from_the_checkpoint_in_new_worker_processes(run):
    output, _, facts = run
    records = _sample_log(output)

    for rank in range(2):
        before = {records[(rank, step)]["pid"] for step in range(1, CHECKPOINT_EVERY + 1)}
        after = {records[(rank, step)]["pid"] for step in range(CHECKPOINT_EVERY + 1, facts["steps"] + 1)}
        assert len(before) == len(after) == 1 and before != after


def test_every_clip_is_trained_exactly_once_in_the_first_epoch_across_the_nodes(run):
    output, clips, _ = run
    trained = defaultdict(list)  # epoch -> clip ids, both ranks, the attempts that counted
    for record in _sample_log(output).values():
        for key, epoch, _ in record["clips"]:
            trained[epoch].append(key)

    assert sorted(trained[0]) == clips  # the two streams partition the corpus; none lost or repeated by the restart
    assert len(trained[1]) == len(set(trained[1])) > 0


def test_both_nodes_parts_of_each_checkpoint_are_in_the_shared_storage(run):
    output, _, facts = run
    checkpoints = sorted((output / "ray" / RUN).glob("checkpoint_0*"))

    assert [path.name for path in checkpoints][-1] == f"checkpoint_{facts['steps']:08d}"
    for checkpoint in checkpoints:
        assert {path.name for path in checkpoint.glob("rank*.pt")} == {"rank00000.pt", "rank00001.pt"}
        assert len(list((checkpoint / "state").glob("zero_pp_rank_*_optim_states.pt"))) == 2


def test_the_exported_audio_weights_load(run, tiny_model_dir):
    output, _, _ = run
    exported = output / "multitalk.safetensors"
    model = build_model(TINY, "meta")

    load_weights(model, [transformer_weights(tiny_model_dir), (exported, "original")])

    assert any(block.attn_audio.to_out.weight.any() for block in model.blocks)  # trained, no longer zero
    assert all(torch.isfinite(tensor).all() for tensor in load_file(exported).values())
