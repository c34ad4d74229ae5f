"""Serving on a simulated Ray cluster: a generator replica's node dies mid-job; a device group never spans nodes.

`ray.cluster_utils.Cluster` starts a head (127.0.0.1: the HTTP proxy, the API and the dispatcher, which require the
head's `multitalk.io/pool: cpu` label as they would a cluster's CPU nodes) and two generator nodes (127.0.0.2, .3)
with one `generator` resource each, so that one generator replica runs on each. The job store (a SQLite file) and the
storage (a folder) are what every node sees, as a cluster's database and object store. The generator nodes also
declare one GPU each, which only the device group test asks for (nothing runs on them).
"""

from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest
import ray
from ray import serve
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from serving.config import ControlPlane, GenerationDefaults, GeneratorScaling, ServingConfig
from tests.helpers import simulated_cluster
from tests.test_serving import ALICE, SMALL, Service, _official_options

pytestmark = pytest.mark.slow

POOL = {"multitalk.io/pool": "cpu"}  # the head's label, required by the API and the dispatcher
GENERATOR = {"generator": 1}  # one per generator node, one per generator replica
CLIP_FINISHED = "generator-clip-finished"
# Three clips: frame_num 5 with 1 motion frame starts clips at frames 0, 4 and 8; 0.48 s (12 frames) needs all three.
STREAMING = {
    "mode": "streaming",
    "steps": 2,
    "frame_num": 5,
    "motion_frames": 1,
    "resolution": [32, 64],
    "max_duration_s": 0.48,
    "seed": 5,
}


@pytest.fixture(scope="module")
def cluster():
    generator_node = {"num_cpus": 1, "num_gpus": 1, "resources": GENERATOR}
    head = {"num_cpus": 1, "labels": POOL}
    with simulated_cluster(head=head, nodes={ip: generator_node for ip in ("127.0.0.2", "127.0.0.3")}) as simulated:
        yield simulated


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory, shared_media):
    root = tmp_path_factory.mktemp("serving-multinode")
    config = ServingConfig(
        model_dir=build_tiny_model_dir(root / "model"),
        database_url=f"sqlite:///{root / 'jobs.db'}",
        storage_uri=str(root / "files"),
        api_keys=[ALICE],
        dispatch_interval_s=0.5,
        control_plane=ControlPlane(label_selector=POOL),
        generator=GeneratorScaling(
            min_replicas=2, max_replicas=2, num_cpus=1, resources=GENERATOR, graceful_shutdown_timeout_s=0
        ),
        generation=GenerationDefaults(defaults=SMALL),
    )
    running = Service(config, shared_media)
    port = int(running.base_url.rsplit(":", 1)[1])
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    running.start()  # returns once both generator replicas run
    yield running
    running.http.close()
    serve.shutdown()


def _node_running(pid: int, nodes) -> object:
    """The cluster node whose raylet started the worker process `pid`."""
    ancestors = {parent.pid for parent in psutil.Process(pid).parents()}
    (node,) = [node for node in nodes if node.all_processes["raylet"][0].process.pid in ancestors]
    return node


# Runs first: it needs the generator nodes' CPUs free, before the service takes them.
def test_a_device_group_waits_for_one_node_with_its_devices_rather_than_spanning_two(cluster, tiny_model_dir):
    @ray.remote(num_cpus=0, resources={"node:127.0.0.2": 0.01})
    def group_on_this_node() -> str | None:
        from serving.device_group import DeviceGroup

        try:
            DeviceGroup(tiny_model_dir, 2, use_gpu=True, placement_timeout_s=5).shutdown()
        except TimeoutError as error:
            return str(error)
        return None

    refused = ray.get(group_on_this_node.remote())

    assert refused is not None and "no 2 x {'GPU': 1, 'CPU': 1} free on this node" in refused
    # The two devices are there, one per node: the same bundles allowed to span nodes are placed at once.
    spanning = placement_group([{"GPU": 1, "CPU": 1, "node:127.0.0.2": 0.001}, {"GPU": 1, "CPU": 1}], strategy="PACK")
    try:
        assert spanning.wait(120)
        assert len(set(placement_group_table(spanning)["bundles_to_node_id"].values())) == 2
    finally:
        remove_placement_group(spanning)


def test_a_job_whose_generator_node_dies_resumes_on_the_other_node_after_its_last_clip(
    cluster, service, pause_gate, shared_media
):
    cluster, nodes = cluster
    options = {**_official_options(shared_media), **STREAMING}
    pause_gate.hold(CLIP_FINISHED)
    # The same job twice: one runs on each replica, both are held after storing their first clip.
    job_ids = [service.submit(options).json()["id"] for _ in range(2)]
    doomed_pid = pause_gate.wait_reached(CLIP_FINISHED, count=2)[0]
    doomed = _node_running(doomed_pid, nodes)

    answers: list[int] = []
    done = threading.Event()

    def ask_the_api() -> None:
        with httpx.Client(base_url=service.base_url, timeout=30) as client:
            auth = {"Authorization": f"Bearer {ALICE}"}
            while not done.is_set():
                answers.append(client.get("/healthz").status_code)
                answers.append(client.get(f"/v1/videos/{job_ids[0]}", headers=auth).status_code)
                time.sleep(0.2)

    prober = threading.Thread(target=ask_the_api)
    prober.start()
    try:
        cluster.remove_node(doomed)
        deadline = time.monotonic() + 120  # guards a hang only: the held process dies with its node's raylet
        while psutil.pid_exists(doomed_pid) and psutil.Process(doomed_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"worker {doomed_pid} outlived its node"
            time.sleep(0.1)
        accepted_meanwhile = service.submit(SMALL)
        assert accepted_meanwhile.status_code == 202, accepted_meanwhile.text
        job_ids.append(accepted_meanwhile.json()["id"])
        pause_gate.release(CLIP_FINISHED)
        jobs = [service.wait(job_id, limit_s=600) for job_id in job_ids]
    finally:
        pause_gate.release(CLIP_FINISHED)
        done.set()
        prober.join()

    assert [job["state"] for job in jobs] == ["succeeded"] * 3, [job["error"] for job in jobs]
    (retried,) = [job for job in jobs[:2] if job["attempts"] == 2]
    (uninterrupted,) = [job for job in jobs[:2] if job["attempts"] == 1]
    # The retry took the clip the dead node had stored and generated the other two.
    assert (retried["result"]["clips"], retried["result"]["resumed_clips"]) == (3, 1)
    assert uninterrupted["result"]["resumed_clips"] == 0
    auth = {"Authorization": f"Bearer {ALICE}"}
    videos = [service.http.get(job["content_url"], headers=auth).content for job in (retried, uninterrupted)]
    assert videos[0] == videos[1]
    assert answers and set(answers) == {200}  # the API on the head kept answering while the node was gone
