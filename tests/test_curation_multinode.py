"""Curation on a simulated Ray cluster: the model actors pinned to a "GPU-like" node, CPU stages wherever a CPU is
free, and a node that dies with work in hand.

`ray.cluster_utils.Cluster` starts a head of no CPUs (as the KubeRay head: the driver commits shards, no stage runs
there), a CPU node (127.0.0.2) and a GPU-like node (127.0.0.3) that declares the custom resource the config's model
stages ask for (`faces.resources`, `wav2vec.resources`), as the GPU pods of infra/kuberay/rayjob-curate.yaml. The
GPU-like node's CPUs left by its actors, under one CPU even when the face detectors are done, take the light
tasks; the 1-CPU tasks (probe, shots, clip, speakers) fit only on the CPU node. The output goes to one folder every node
sees, as a cluster's shared volume.

Checked: the model actors ran on the pinned node (Ray's state API); the output equals a run of the same stages in
one process (same clips, scores up to float noise, same rejects); and with the CPU node removed while it holds a
clip mid-task (held at the `curation-after-speakers` pause point: speakers is the last stage only that node can run,
so the clips let past it go on to their shards) and one shard already committed, the driver goes on, its lost tasks
retried on a fresh node: every clip once, no partial shard, the committed shard untouched.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from pipelines.config import ConfigError, CurationConfig, load_config
from pipelines.curate import run
from pipelines.schema import MANIFEST_FILE, REJECTS_FILE
from platform_common.config import read_config
from tests.helpers import PauseGate, add_simulated_node, free_port, short_window_curation, simulated_cluster
from tests.test_cluster_chain import _commands

REPO = Path(__file__).resolve().parents[1]
GPU_NODE = "gpu_node"  # the custom resource only the GPU-like node declares (rayjob-curate.yaml: the GPU pods)
HELD_PAUSE, SHARD_PAUSE = "curation-after-speakers", "curation-shard-committed"
MODEL_STAGES = ("FaceStage", "Wav2VecStage")
OBJECT_STORE_BYTES = 300 * 1024**2
CPU_NODE = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES}


@pytest.fixture(scope="module")
def cluster():
    head = {"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES}
    # The dashboard answers the state API, which lists actors and workers with their nodes.
    head.update(include_dashboard=True, dashboard_port=free_port())
    gpu_node = {"num_cpus": 2, "resources": {GPU_NODE: 1000}, "object_store_memory": OBJECT_STORE_BYTES}
    with simulated_cluster(head=head, nodes={"127.0.0.2": CPU_NODE, "127.0.0.3": gpu_node}) as (cluster, (cpu, gpu)):
        yield cluster, {"cpu": cpu, "gpu": gpu}


@pytest.fixture(scope="module")
def config_path(shared_media, tmp_path_factory) -> Path:
    """Two talking videos (three 33-frame windows each) and a video without audio (a reject)."""
    work = tmp_path_factory.mktemp("curation")
    names = ("talking_woman_25fps.mp4", "talking_man_25fps.mp4", "no_audio_track.mp4")
    rows = [{"path": str(shared_media / name), "kind": "single"} for name in names]
    (work / "inputs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pinned = {GPU_NODE: 1}
    config = {
        "input": str(work / "inputs.jsonl"),
        "clips": {"frame_num": 33},
        # The GPU-like node's 2 CPUs: 1.5 for its actors, 0.5 (0.75 once the faces pool is done) for light tasks.
        "faces": {"detect_every": 10, "num_cpus": 0.25, "resources": pinned},
        "wav2vec": {
            "model_path": str(build_tiny_wav2vec2(work / "wav2vec2")),
            "num_cpus": 1.25,
            "batch_size": 1,
            "resources": pinned,
        },
        "shards": {"size": 1},  # one shard per clip: shards are committed while other clips are in flight
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(short_window_curation(config)))
    return path


@pytest.fixture(scope="module")
def one_process(config_path, tmp_path_factory) -> Path:
    """The same stages one after another in this process: what one node curates (tests/test_curation.py)."""
    output = tmp_path_factory.mktemp("serial") / "out"
    run(load_config(config_path, output=str(output)), serial=True)
    return output


def _clips(output: Path) -> list[dict]:
    """Manifest rows by clip id, without the shard name (numbered in commit order, which differs between runs)."""
    rows = pq.read_table(output / MANIFEST_FILE).to_pylist()
    return sorted(({k: v for k, v in row.items() if k != "shard"} for row in rows), key=lambda row: row["clip_id"])


def _rejects(output: Path) -> list[tuple]:
    rows = pq.read_table(output / REJECTS_FILE).to_pylist()
    return sorted((row["input"], row["clip_id"] or "", row["stage"], row["reason"]) for row in rows)


def _shards(output: Path) -> list[Path]:
    return sorted(output.glob("*.tar"))


def _assert_same_corpus(output: Path, reference: Path) -> None:
    """The same clips with the same scores (up to float noise: Ray gives a task fewer threads, which reorders float
    sums), the same rejects, and every clip in exactly one shard."""
    clips, expected = _clips(output), _clips(reference)
    assert [row["clip_id"] for row in clips] == [row["clip_id"] for row in expected]
    for row, expected_row in zip(clips, expected, strict=True):
        assert row == {
            key: pytest.approx(value, rel=1e-6) if isinstance(value, float) else value
            for key, value in expected_row.items()
        }
    assert _rejects(output) == _rejects(reference)
    keys = [sample["__key__"] for sample in wds.WebDataset([str(path) for path in _shards(output)], shardshuffle=False)]
    assert sorted(keys) == [row["clip_id"] for row in clips]  # each once
    assert not list(output.glob(".*"))  # no partial shard


def _node_of_worker(address: str, pid: int) -> str:
    from ray.util.state import list_workers

    (worker,) = [worker for worker in list_workers(address=address, filters=[("pid", "=", pid)]) if worker.is_alive]
    return worker.node_id


@pytest.mark.slow
def test_model_actors_run_on_the_pinned_node_and_the_output_equals_one_process(cluster, config_path, one_process):
    from ray.util.state import list_actors

    ray_cluster, nodes = cluster
    output = config_path.parent / "cluster-out"

    run(load_config(config_path, output=str(output)))

    nodes_by_stage: dict[str, set[str]] = {}
    for actor in list_actors(address=ray_cluster.address, detail=True, limit=1000):
        if actor.class_name.startswith("MapWorker("):  # Ray Data's pool actors, e.g. MapWorker(Map(FaceStage))
            stage = next(name for name in MODEL_STAGES if f"({name})" in actor.class_name)
            nodes_by_stage.setdefault(stage, set()).add(actor.node_id)
    assert nodes_by_stage == {stage: {nodes["gpu"].node_id} for stage in MODEL_STAGES}
    assert len(_clips(one_process)) >= 2 and _rejects(one_process)  # something kept, something rejected
    _assert_same_corpus(output, one_process)


@pytest.mark.slow
def test_a_node_lost_mid_clip_is_replaced_and_every_clip_lands_once(cluster, config_path, one_process, tmp_path):
    """Runs last: it removes the CPU node (a fresh one joins, as KubeRay replaces a lost pod)."""
    ray_cluster, nodes = cluster
    output, log = tmp_path / "out", tmp_path / "curate.log"
    gate = PauseGate()
    gate.hold(HELD_PAUSE)
    gate.hold(SHARD_PAUSE)
    command = [sys.executable, str(REPO / "pipelines" / "curate.py"), "--config", str(config_path)]
    command += ["--output", str(output)]
    # No per-operator CPU budgets in the driver: on a cluster of three CPUs, one held forever by the paused task and
    # another asked for by the next clip's, Ray Data's budgets would leave none for the writer (never so on a
    # cluster whose tasks end).
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "RAY_DATA_ENABLE_OP_RESOURCE_RESERVATION": "0"}
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    alive = lambda: process.poll() is None  # noqa: E731
    try:
        try:
            # Two clips go on: the driver reads results one ahead (Ray Data prefetches the next block), so it
            # commits the first clip's shard once the second's is written too.
            for _ in range(2):
                (going,) = gate.wait_reached(HELD_PAUSE, alive=alive)
                gate.let_through(HELD_PAUSE, going)
            gate.wait_reached(SHARD_PAUSE, alive=alive)  # the driver committed a shard
            (held,) = gate.wait_reached(HELD_PAUSE, alive=alive)  # the next clip, its speakers task not done
            committed = {path: path.read_bytes() for path in _shards(output)}
            assert len(committed) == 1, log.read_text()[-3000:]
            assert _node_of_worker(ray_cluster.address, held) == nodes["cpu"].node_id
            ray_cluster.remove_node(nodes["cpu"])
            add_simulated_node(ray_cluster, "127.0.0.4", **CPU_NODE)
        finally:
            gate.release(HELD_PAUSE)
            gate.release(SHARD_PAUSE)
        returncode = process.wait(timeout=600)
    finally:
        if alive():
            process.kill()
            process.wait()
    assert returncode == 0, log.read_text()[-3000:]

    _assert_same_corpus(output, one_process)
    for path, data in committed.items():
        assert path.read_bytes() == data


def _declared_resources(group: dict) -> dict[str, float]:
    """The custom resources a KubeRay group's pods declare (`rayStartParams.resources`, a shell-quoted JSON)."""
    value = group.get("rayStartParams", {}).get("resources")
    return json.loads(shlex.split(value)[0]) if value else {}


def test_the_cluster_curation_pins_every_gpu_model_to_the_gpu_pods():
    manifest = yaml.safe_load((REPO / "infra" / "kuberay" / "rayjob-curate.yaml").read_text())
    spec = manifest["spec"]["rayClusterSpec"]
    groups = {"head": spec["headGroupSpec"], **{group["groupName"]: group for group in spec["workerGroupSpecs"]}}
    gpu_groups = {
        name
        for name, group in groups.items()
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in group["template"]["spec"]["containers"])
    }
    assert gpu_groups

    for _, config_path in _commands(manifest):
        config = read_config(config_path, CurationConfig)
        for section in (config.sync, config.asr, config.wav2vec, config.captions):
            assert section.num_gpus > 0 and section.resources, config_path.name
            holders = {
                name for name, group in groups.items() if section.resources.keys() <= _declared_resources(group).keys()
            }
            assert holders == gpu_groups, f"{config_path.name}: {section.resources} is declared by {holders}"


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"GPU": 1}, "sync.resources: Value error, GPU is not a custom resource (num_cpus / num_gpus set it)"),
        ({"gpu_node": 0}, "sync.resources.gpu_node: Input should be greater than 0"),
    ],
)
def test_a_model_stage_asks_only_for_custom_resources(tmp_path, resources, message):
    path = tmp_path / "config.yaml"
    config = {
        "input": "in",
        "output": "out",
        "wav2vec": {"model_path": str(tmp_path)},
        "sync": {"resources": resources},
    }
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
