"""Helpers several test modules share: a local Ray, a simulated multi-node Ray cluster, pause gates, free ports,
transformer inputs, headless Chromium, random stand-ins of the FID/FVD feature networks."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from multitalk_model.config import MultiTalkConfig, get_preset
from platform_common.pause import PAUSE_DIR_ENV

TINY = get_preset("tiny")


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[str]:
    """A Ray of this process, never a `ray start` cluster on the machine; yields its GCS address. Its workers
    inherit this process's environment, the pause folder included (conftest sets it before any Ray starts)."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def add_simulated_node(cluster, ip: str, **node_args):
    """A node joining a `simulated_cluster` at `ip` (a loopback address of its own: Ray tells nodes by their IP), with
    `ray start`'s arguments (`num_cpus`, `resources`, ...); returns its `ray._private.node.Node`."""
    return cluster.add_node(node_ip_address=ip, include_dashboard=False, **node_args)


@contextmanager
def simulated_cluster(head: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> Iterator[tuple[Any, list]]:
    """A Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`), each with its own raylet and
    object store, this process connected as its driver; yields the cluster and its nodes in `nodes`' order.

    `head`: the head's `ray start` arguments (no dashboard unless they ask for one); `nodes`: IP -> a node's arguments
    (`add_simulated_node`). Tests remove nodes and add others through the cluster."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **head})
    try:
        added = [add_simulated_node(cluster, ip, **node_args) for ip, node_args in nodes.items()]
        cluster.connect()
        yield cluster, added
    finally:
        ray.shutdown()
        cluster.shutdown()


def short_window_curation(config: dict) -> dict:
    """A curation config (a YAML dict) for a test corpus of short windows (17-33 frames), with the landmark sync and
    speaker-binding gates off: they are calibrated on 81-frame clips (benchmarks/quality.py), and shorter windows
    are too short to judge. The corpora that use it only have to feed what their tests check."""
    config.setdefault("speakers", {})["min_binding_confidence"] = 0
    config.setdefault("sync", {})["min_confidence"] = -1
    return config


class PauseGate:
    """Holds code at a `platform_common.pause` point until the test releases it, and tells who reached it."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory or os.environ[PAUSE_DIR_ENV])

    def hold(self, name: str) -> None:
        (self.directory / f"{name}.hold").touch()
        for reached in self.directory.glob(f"{name}.*.reached"):
            reached.unlink()

    def release(self, name: str) -> None:
        (self.directory / f"{name}.hold").unlink(missing_ok=True)

    def let_through(self, name: str, pid: int) -> None:
        """Lets one held process go on; the point stays held for the others and for its next arrival."""
        (self.directory / f"{name}.{pid}.reached").unlink()

    def reached(self, name: str) -> list[int]:
        """The process ids held at the point (or that passed it when it was released)."""
        return sorted(int(path.name.split(".")[-2]) for path in self.directory.glob(f"{name}.*.reached"))

    def wait_reached(self, name: str, count: int = 1, alive=lambda: True, limit_s: float = 400) -> list[int]:
        """Waits until `count` processes are held at the point; `alive` (e.g. a driver's poll) fails it early and
        the limit only guards against a hang."""
        deadline = time.monotonic() + limit_s
        while len(pids := self.reached(name)) < count:
            assert alive(), f"the work ended before reaching {name}"
            assert time.monotonic() < deadline, f"{name}: reached by {pids}, expected {count} processes"
            time.sleep(0.05)
        return pids


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def region_masks(batch: int, persons: int, height: int, width: int) -> torch.Tensor:
    """[B, P + 1, H, W]: person p in the p-th band of columns below the top two rows; the background the top rows."""
    masks = torch.zeros(batch, persons + 1, height, width)
    columns = torch.arange(width).div(width / persons, rounding_mode="floor")
    for person in range(persons):
        masks[:, person, 2:] = (columns == person).float()
    masks[:, persons, :2] = 1
    return masks


def transformer_inputs(
    latent: tuple[int, int, int] = (3, 8, 8),
    persons: int = 1,
    batch: int = 1,
    seed: int = 0,
    text_tokens: int = 7,
    config: MultiTalkConfig = TINY,
) -> dict[str, torch.Tensor]:
    """Random inputs of the MultiTalk transformer's forward for `persons` streams on a latent grid (T, H, W), with
    the region masks of `region_masks`."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = latent
    frames = config.vae_scale * (t - 1) + 1
    return {
        "hidden_states": torch.randn(batch, config.in_channels, t, h, w, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, text_tokens, config.text_dim, generator=gen),
        "encoder_hidden_states_image": torch.randn(batch, 257, config.image_dim, generator=gen),
        "audio": torch.randn(
            batch, persons, frames, config.audio_window, config.audio_layers, config.audio_channels, generator=gen
        ),
        "region_masks": region_masks(batch, persons, h, w),
    }


class Chromium:
    """Debian's headless chromium with one page, driven over the DevTools protocol."""

    def __init__(self, profile_dir: Path) -> None:
        import httpx
        import websockets.sync.client

        log = profile_dir / "chromium.log"
        self.process = subprocess.Popen(
            [
                "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile_dir}",
                "--remote-debugging-port=0",
                "--window-size=1280,1500",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        deadline = time.monotonic() + 60
        while not (found := re.search(r"DevTools listening on ws://127.0.0.1:(\d+)/", log.read_text())):
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        targets = httpx.get(f"http://127.0.0.1:{found.group(1)}/json/list").json()
        page = next(target for target in targets if target["type"] == "page")
        self.socket = websockets.sync.client.connect(page["webSocketDebuggerUrl"], max_size=None)
        self._last_id = 0

    def send(self, method: str, **params) -> dict[str, Any]:
        self._last_id += 1
        self.socket.send(json.dumps({"id": self._last_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv())
            if message.get("id") == self._last_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, limit_s: float = 240) -> Any:
        deadline = time.monotonic() + limit_s
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.2)
        return value

    def choose_files(self, selector: str, *paths: Path) -> None:
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(path) for path in paths])

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


class TinyI3D(torch.nn.Module):
    """A random stand-in with the StyleGAN-V I3D TorchScript's call signature."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 6, kernel_size=(2, 8, 8), stride=(1, 8, 8))

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3, 4))


class TinyInception(torch.nn.Module):
    """A random stand-in with the StyleGAN2-ADA Inception TorchScript's call signature (uint8 images in)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))


def save_random_feature_networks(directory: Path) -> dict[str, str]:
    """Random TorchScript Inception (FID) and I3D (FVD) stand-ins saved in `directory`, keyed as the evaluation
    config names their paths."""
    torch.manual_seed(0)
    paths = {"inception_path": str(Path(directory) / "inception.pt"), "i3d_path": str(Path(directory) / "i3d.pt")}
    torch.jit.script(TinyInception()).save(paths["inception_path"])
    torch.jit.script(TinyI3D()).save(paths["i3d_path"])
    return paths
