"""The Serve application: the HTTP API (ingress) -> the dispatcher -> the generator replicas.

    serve run serving/config.yaml                    # a laptop: the tiny model on the CPU
    serve deploy serving/config.yaml                 # a cluster (see infra/kuberay/rayservice.yaml)

`build_app` is the application builder the config's import_path names; its args are a ServingConfig.
"""

import logging
from pathlib import Path

from ray.serve import Application

from multitalk_model.fixtures.tiny_model import build_tiny_model_dir

from .api import VideosAPI
from .config import ServingConfig
from .dispatcher import Dispatcher
from .generator import Generator

logger = logging.getLogger(__name__)


def build_app(config: ServingConfig) -> Application:
    """The application graph for a config (relative paths resolved against the current directory)."""
    config = config.with_absolute_paths(Path.cwd())
    # Only with tiny (one machine): on a cluster the model lies on the generator nodes, not where this runs.
    if config.tiny and not config.model_dir.exists():
        logger.warning("model_dir %s is missing: building a tiny random model there", config.model_dir)
        build_tiny_model_dir(config.model_dir)

    scaling = config.generator
    generator = Generator.options(
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_jobs_per_replica,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
        },
        ray_actor_options={"num_cpus": scaling.num_cpus, "num_gpus": scaling.num_gpus, "resources": scaling.resources},
        graceful_shutdown_timeout_s=scaling.graceful_shutdown_timeout_s,
    ).bind(config)
    control = config.control_plane
    api = VideosAPI.options(
        num_replicas=config.api_replicas, ray_actor_options=control.actor_options(control.api_num_cpus)
    )
    dispatcher = Dispatcher.options(ray_actor_options=control.actor_options(control.dispatcher_num_cpus))
    return api.bind(config, dispatcher.bind(config, generator))
