"""Where the serving deployments run on a cluster: the API and the dispatcher reserve CPUs of their own and require a
node label that only CPU pods carry, so Serve never places them on a GPU pod (infra/kuberay/rayservice*.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.config import ControlPlane, GeneratorScaling, ServingConfig

KUBERAY = Path(__file__).resolve().parents[1] / "infra" / "kuberay"
SERVICES = sorted(KUBERAY.glob("rayservice*.yaml"))


def _pod_requests_gpu(group: dict) -> bool:
    return any(
        "nvidia.com/gpu" in container.get("resources", {}).get("requests", {})
        for container in group["template"]["spec"]["containers"]
    )


@pytest.mark.parametrize("manifest", SERVICES, ids=lambda path: path.name)
def test_the_api_and_dispatcher_reserve_cpus_on_cpu_pods_only(manifest):
    service = yaml.safe_load(manifest.read_text())
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    config = ServingConfig.model_validate(application["args"])
    control = config.control_plane
    cluster = service["spec"]["rayClusterConfig"]

    assert control.api_num_cpus >= 1 and control.dispatcher_num_cpus > 0
    assert control.label_selector, "without a label selector the API may land on a GPU pod"
    selected = [
        group
        for group in cluster["workerGroupSpecs"]
        if control.label_selector.items() <= (group.get("labels") or {}).items()
    ]
    assert selected and not any(_pod_requests_gpu(group) for group in selected)
    assert not control.label_selector.items() <= (cluster["headGroupSpec"].get("labels") or {}).items()
    # One node of the selected group holds both deployments (the API's replicas and the dispatcher).
    pod_cpus = min(float(group["rayStartParams"].get("num-cpus", "inf")) for group in selected)
    cpu_request = min(
        float(container["resources"]["requests"]["cpu"])
        for group in selected
        for container in group["template"]["spec"]["containers"]
    )
    assert config.api_replicas * control.api_num_cpus + control.dispatcher_num_cpus <= min(pod_cpus, cpu_request)


def test_the_defaults_leave_a_laptops_two_cpus_room_for_a_generator():
    control, generator = ControlPlane(), GeneratorScaling()
    assert control.api_num_cpus + control.dispatcher_num_cpus + generator.num_cpus <= 2
    assert control.actor_options(control.api_num_cpus) == {"num_cpus": control.api_num_cpus}
    labelled = ControlPlane(label_selector={"multitalk.io/pool": "cpu"})
    assert labelled.actor_options(0.5) == {"num_cpus": 0.5, "label_selector": {"multitalk.io/pool": "cpu"}}
