"""Connecting a driver (curation, training) to Ray: the configured cluster, else a Ray of its own."""

from __future__ import annotations

import os


def connect_ray(address: str | None, local_num_cpus: int) -> None:
    """Joins `address` (else RAY_ADDRESS) or, with neither, starts a local Ray of `local_num_cpus` CPUs.

    "local" means a Ray of this process even when a `ray start` cluster runs on the machine (use the address or
    RAY_ADDRESS "auto" to run on that one). Nothing happens when this process is already connected.
    """
    import ray  # the drivers' extras install it; the rest of platform_common does not need it

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=local_num_cpus, include_dashboard=False)
