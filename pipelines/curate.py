"""Curate raw videos into the training corpus: `python pipelines/curate.py --config CONFIG.yaml [--input URI]
[--output DIR] [--serial] [--set KEY.SUB=VALUE ...]`, on an embedded local Ray or, under `ray job submit` or with
RAY_ADDRESS set, on a cluster; `--serial` runs the same stages in this process without Ray."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (also what `ray job submit --working-dir .` does): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import ConfigError, CurationConfig, load_config
from pipelines.plan import curation_steps, run_serially, to_dataset
from pipelines.report import write_report
from pipelines.sink import TEST_SPLIT, TRAIN_SPLIT, CorpusSink, WrittenShard, split_location
from pipelines.stages.whisperx_asr import WhisperXEnvError, check_whisperx_env, whisperx_runtime_env
from pipelines.storage import list_inputs
from platform_common.cluster import connect_ray
from platform_common.config import add_set_option, parse_sets, write_resolved_config

logger = logging.getLogger("pipelines.curate")


def run(config: CurationConfig, serial: bool = False, seconds_by_step: dict[str, float] | None = None) -> dict:
    """Curate `config.input` into `config.output` on the current Ray (started locally when none is running), or
    with `serial`, stage after stage in this process without Ray (filling `seconds_by_step` when given)."""
    if serial and config.asr.whisperx:
        raise ConfigError("asr.whisperx runs in a Ray runtime env of its own: it cannot run serially")
    if not serial:
        connect_ray(config.ray_address, config.local_num_cpus)
    if config.asr.whisperx:
        # Before any clip is decoded: a run whose whisperx env cannot be built fails now, saying why.
        version = check_whisperx_env(whisperx_runtime_env(config.asr), config.asr.resources)
        logger.info("whisperx %s imports in its runtime env", version)
    sink = CorpusSink(config.output)
    # The held-out split, when the config sets one aside: its own shards and manifest, committed beside the corpus.
    held_out = config.split.test_fraction > 0 or bool(config.split.test_sources)
    sinks = {TRAIN_SPLIT: sink}
    if held_out:
        sinks[TEST_SPLIT] = CorpusSink(split_location(config.output, TEST_SPLIT))
    inputs = list_inputs(config.input, config.default_kind)
    logger.info("curating %d inputs from %s into %s", len(inputs), config.input, config.output)
    done = frozenset().union(*(split_sink.done_clip_ids for split_sink in sinks.values()))
    steps = curation_steps(config, done)
    rows = run_serially(steps, inputs, seconds_by_step) if serial else to_dataset(steps, inputs).iter_rows()
    stage_seconds: dict[str, float] = {}
    for row in rows:
        result = row["result"]
        if isinstance(result, WrittenShard):
            sinks[result.split].commit(result)
            seconds = result.stage_seconds
        else:
            where = f"clip {result['clip_id']}" if result["clip_id"] else "whole input"
            logger.info("rejected %s (%s): %s (%s)", result["input"], where, result["reason"], result["detail"])
            sink.reject(result)
            seconds = result["stage_seconds"]
        for stage, value in seconds.items():
            if value is not None:  # Ray Data gives rows one struct type: stages a row missed come back as None
                stage_seconds[stage] = stage_seconds.get(stage, 0.0) + value
    test_manifest = sinks[TEST_SPLIT].finish()[0] if held_out else None
    manifest, rejects = sink.finish()
    summary = write_report(config.output, manifest, rejects, stage_seconds, test_manifest, len(inputs))
    logger.info("done: %d clips, %d rejects; report in %s", manifest.num_rows, rejects.num_rows, config.output)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="curation config (YAML)")
    parser.add_argument("--input", help="folder/URI of videos or an input manifest (overrides the config's input)")
    parser.add_argument("--output", help="output folder/URI (overrides the config's output)")
    parser.add_argument(
        "--serial", action="store_true", help="run the stages one after another in this process, without Ray (debug)"
    )
    add_set_option(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, parse_sets(args.sets), input=args.input, output=args.output)
        logger.info("resolved config: %s", write_resolved_config(config, config.output))
        run(config, serial=args.serial)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    except WhisperXEnvError as error:
        parser.exit(1, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
