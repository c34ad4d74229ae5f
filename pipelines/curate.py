"""Curate raw videos into the training corpus: `python pipelines/curate.py --config CONFIG.yaml [--input URI]
[--output DIR]`, on an embedded local Ray or, under `ray job submit` or with RAY_ADDRESS set, on a cluster."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (also what `ray job submit --working-dir .` does): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray

from pipelines.config import ConfigError, CurationConfig, load_config
from pipelines.record import Clip
from pipelines.report import write_report
from pipelines.sink import CorpusSink, ShardWriter, WrittenShard
from pipelines.stages.asr import AsrStage
from pipelines.stages.audio import AudioStage
from pipelines.stages.captions import CaptionStage
from pipelines.stages.clip import ClipStage
from pipelines.stages.faces import FaceStage
from pipelines.stages.probe import ProbeStage
from pipelines.stages.sample import SampleStage
from pipelines.stages.shots import ShotStage
from pipelines.stages.speakers import SpeakerStage
from pipelines.stages.sync import SyncStage
from pipelines.stages.wav2vec import Wav2VecStage
from pipelines.stages.whisperx_asr import WhisperXEnvError, WhisperXStage, check_whisperx_env, whisperx_runtime_env
from pipelines.storage import list_inputs

logger = logging.getLogger("pipelines.curate")


def build_dataset(config: CurationConfig, inputs: list[dict], done_clip_ids: frozenset[str]) -> ray.data.Dataset:
    """The stage graph: CPU tasks for decoding and signal work, actor pools for the models, the shard writer last."""
    # The `clip` column holds Clip objects: say that pickling them is intended (Ray warns on every block otherwise).
    ray.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type = True
    ds = ray.data.from_items([{"clip": Clip(**row)} for row in inputs], override_num_blocks=max(1, len(inputs)))
    ds = ds.map(ProbeStage(config), num_cpus=ProbeStage.num_cpus)
    ds = ds.flat_map(ShotStage(config, done_clip_ids), num_cpus=ShotStage.num_cpus)
    # One clip per block from here on, so the windows of one long source spread over the cluster.
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map(ClipStage(config), num_cpus=ClipStage.num_cpus)
    ds = ds.map(
        FaceStage,
        fn_constructor_kwargs={"config": config},
        compute=ray.data.ActorPoolStrategy(size=config.faces.num_actors),
        num_cpus=config.faces.num_cpus,
    )
    for stage in (AudioStage(config), SpeakerStage(config)):
        ds = ds.map(stage, num_cpus=stage.num_cpus)
    if config.sync.syncnet_path:
        ds = ds.map(
            SyncStage,
            fn_constructor_kwargs={"config": config},
            compute=ray.data.ActorPoolStrategy(size=config.sync.num_actors),
            num_cpus=config.sync.num_cpus,
            num_gpus=config.sync.num_gpus,
        )
    else:
        ds = ds.map(SyncStage(config), num_cpus=SyncStage.num_cpus)
    if config.asr.whisperx:
        ds = ds.map(
            WhisperXStage,
            fn_constructor_kwargs={"config": config},
            compute=ray.data.ActorPoolStrategy(size=config.asr.num_actors),
            num_cpus=config.asr.num_cpus,
            num_gpus=config.asr.num_gpus,
            runtime_env=whisperx_runtime_env(config.asr),
        )
    elif config.asr.model_path:
        ds = ds.map(
            AsrStage,
            fn_constructor_kwargs={"config": config},
            compute=ray.data.ActorPoolStrategy(size=config.asr.num_actors),
            num_cpus=config.asr.num_cpus,
            num_gpus=config.asr.num_gpus,
        )
    ds = ds.map_batches(
        Wav2VecStage,
        fn_constructor_kwargs={"config": config},
        batch_size=config.wav2vec.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.wav2vec.num_actors),
        num_cpus=config.wav2vec.num_cpus,
        num_gpus=config.wav2vec.num_gpus,
    )
    if config.captions.model_path:
        ds = ds.map(
            CaptionStage,
            fn_constructor_kwargs={"config": config},
            compute=ray.data.ActorPoolStrategy(size=config.captions.num_actors),
            num_cpus=config.captions.num_cpus,
            num_gpus=config.captions.num_gpus,
        )
    else:
        ds = ds.map(CaptionStage(config), num_cpus=CaptionStage.num_cpus)
    ds = ds.map(SampleStage(), num_cpus=SampleStage.num_cpus)
    return ds.map_batches(
        ShardWriter(config.output), batch_size=config.shards.size, batch_format="numpy", num_cpus=ShardWriter.num_cpus
    )


def run(config: CurationConfig) -> dict:
    """Curate `config.input` into `config.output` on the current Ray (started locally when none is running)."""
    if not ray.is_initialized():
        address = config.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # "local": a Ray of this process even when a `ray start` cluster runs on the machine (use RAY_ADDRESS=auto
            # or ray_address: auto to run on that one).
            ray.init(address="local", num_cpus=config.local_num_cpus, include_dashboard=False)
    if config.asr.whisperx:
        # Before any clip is decoded: a run whose whisperx env cannot be built fails now, saying why.
        version = check_whisperx_env(whisperx_runtime_env(config.asr))
        logger.info("whisperx %s imports in its runtime env", version)
    sink = CorpusSink(config.output)
    inputs = list_inputs(config.input, config.default_kind)
    logger.info("curating %d inputs from %s into %s", len(inputs), config.input, config.output)
    for row in build_dataset(config, inputs, sink.done_clip_ids).iter_rows():
        result = row["result"]
        if isinstance(result, WrittenShard):
            sink.commit(result)
        else:
            where = f"clip {result['clip_id']}" if result["clip_id"] else "whole input"
            logger.info("rejected %s (%s): %s (%s)", result["input"], where, result["reason"], result["detail"])
            sink.reject(result)
    manifest, rejects = sink.finish()
    summary = write_report(config.output, manifest, rejects)
    logger.info("done: %d clips, %d rejects; report in %s", manifest.num_rows, rejects.num_rows, config.output)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="curation config (YAML)")
    parser.add_argument("--input", help="folder/URI of videos or an input manifest (overrides the config's input)")
    parser.add_argument("--output", help="output folder/URI (overrides the config's output)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, input=args.input, output=args.output)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    try:
        run(config)
    except WhisperXEnvError as error:
        parser.exit(1, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
