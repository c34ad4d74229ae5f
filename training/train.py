"""Train the MultiTalk audio branch: `python training/train.py --config CONFIG.yaml [--data DIR] [--output DIR]
[--max-steps N] [--set KEY.SUB=VALUE ...]`, on an embedded local Ray or, under `ray job submit` or with RAY_ADDRESS
set, on a cluster.

Rerunning the same command (same run name and output) resumes from the run's latest checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (also what `ray job submit --working-dir .` does): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from platform_common.cluster import connect_ray
from platform_common.config import add_set_option, parse_sets, write_resolved_config
from training.config import ConfigError, TrainingConfig, load_config
from training.loop import EXPORT_FILE, train_loop_per_worker

logger = logging.getLogger("training.train")

RAY_DIR = "ray"  # Ray Train's storage under the output folder: one folder per run name, with its checkpoints


def run(config: TrainingConfig) -> Result:
    """Train on the current Ray (started locally when none is running); returns Ray Train's result."""
    cluster = config.cluster
    connect_ray(cluster.ray_address, cluster.local_num_cpus)
    # A (min, max) range makes the worker group elastic: it restarts with the workers it can get.
    workers = cluster.num_workers if cluster.min_workers is None else (cluster.min_workers, cluster.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.model_dump(),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=config.cluster.use_gpu,
            resources_per_worker={"CPU": config.cluster.cpus_per_worker, **config.cluster.worker_resources},
        ),
        run_config=RunConfig(
            name=config.cluster.run_name,
            storage_path=str(Path(config.output) / RAY_DIR),
            failure_config=FailureConfig(max_failures=config.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.schedule.keep_checkpoints),
        ),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--data", help="folder of curated shards (overrides data.path)")
    parser.add_argument("--output", help="output folder (overrides output)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps of the run (overrides schedule.max_steps)")
    add_set_option(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sets = parse_sets(args.sets)
        config = load_config(args.config, data=args.data, output=args.output, max_steps=args.max_steps, sets=sets)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    logger.info("resolved config: %s", write_resolved_config(config, config.output))
    result = run(config)
    if result.error is not None:
        logger.error("training failed: %s", result.error)
        return 1
    print(f"checkpoint: {result.checkpoint.path}")
    print(f"audio weights: {Path(config.output) / EXPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
