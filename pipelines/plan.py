"""The curation stage graph as data: one ordered list of steps, which `to_dataset` turns into the Ray Data graph and
`run_serially` runs in this process (the baseline of benchmarks/curation.py and a way to debug a stage without
Ray). Both run the same stage classes with the same arguments, so they curate the same clips."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.sink import ShardWriter
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
from pipelines.stages.whisperx_asr import WhisperXStage, whisperx_runtime_env


@dataclass(frozen=True)
class Step:
    """One stage of the graph and how Ray runs it."""

    stage: type  # a callable class, built once per task (or once per actor) with `kwargs`
    kwargs: dict
    num_cpus: float
    num_gpus: float = 0.0
    actors: int = 0  # > 0: an actor pool of this size, for stages that hold a model; 0: stateless tasks
    fan_out: bool = False  # one record in, a list of records out
    batch_size: int = 0  # > 0: called on batches of this many records ({"clip": object array})
    runtime_env: dict | None = None
    resources: dict[str, float] | None = None  # custom Ray resources per actor: where the pool may run

    @property
    def name(self) -> str:
        return self.stage.name


def curation_steps(config: CurationConfig, done_clip_ids: frozenset[str]) -> list[Step]:
    """CPU tasks for decoding and signal work, actor pools for the models, the shard writer last."""
    with_config = {"config": config}
    steps = [
        Step(ProbeStage, with_config, ProbeStage.num_cpus),
        Step(ShotStage, {**with_config, "done_clip_ids": done_clip_ids}, ShotStage.num_cpus, fan_out=True),
        Step(ClipStage, with_config, ClipStage.num_cpus),
        _actor_pool(FaceStage, config.faces, with_config),
        Step(AudioStage, with_config, AudioStage.num_cpus),
        Step(SpeakerStage, with_config, SpeakerStage.num_cpus),
    ]
    sync = config.sync
    if sync.syncnet_path:
        steps.append(_actor_pool(SyncStage, sync, with_config))
    else:
        steps.append(Step(SyncStage, with_config, SyncStage.num_cpus))
    asr = config.asr
    if asr.whisperx:
        steps.append(_actor_pool(WhisperXStage, asr, with_config, runtime_env=whisperx_runtime_env(asr)))
    elif asr.model_path:
        steps.append(_actor_pool(AsrStage, asr, with_config))
    steps.append(_actor_pool(Wav2VecStage, config.wav2vec, with_config, batch_size=config.wav2vec.batch_size))
    captions = config.captions
    if captions.model_path:
        steps.append(_actor_pool(CaptionStage, captions, with_config))
    else:
        steps.append(Step(CaptionStage, with_config, CaptionStage.num_cpus))
    steps.append(Step(SampleStage, {}, SampleStage.num_cpus))
    steps.append(
        Step(
            ShardWriter,
            {"output": config.output, "split": config.split},
            ShardWriter.num_cpus,
            batch_size=config.shards.size,
        )
    )
    return steps


def _actor_pool(stage: type, section, kwargs: dict, **options) -> Step:
    """A model stage's actor pool as its config section sizes and places it (num_actors, num_cpus, num_gpus when the
    model can use one, resources)."""
    num_gpus = getattr(section, "num_gpus", 0.0)  # the face detector has no GPU setting
    return Step(stage, kwargs, section.num_cpus, num_gpus, section.num_actors, resources=section.resources, **options)


def to_dataset(steps: list[Step], inputs: list[dict]) -> ray.data.Dataset:
    """The Ray Data graph of `steps` over input records; its rows are the shard writer's results."""
    # The `clip` column holds Clip objects: say that pickling them is intended (Ray warns on every block otherwise).
    ray.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type = True
    ds = ray.data.from_items(_input_records(inputs), override_num_blocks=max(1, len(inputs)))
    for step in steps:
        options: dict = {"num_cpus": step.num_cpus}
        if step.num_gpus:
            options["num_gpus"] = step.num_gpus
        if step.runtime_env:
            options["runtime_env"] = step.runtime_env
        if step.resources:
            options["resources"] = step.resources
        if step.actors:
            fn = step.stage
            options.update(fn_constructor_kwargs=step.kwargs, compute=ray.data.ActorPoolStrategy(size=step.actors))
        else:
            fn = step.stage(**step.kwargs)
        if step.batch_size:
            ds = ds.map_batches(fn, batch_size=step.batch_size, batch_format="numpy", **options)
        elif step.fan_out:
            # One clip per block from here on, so the windows of one long source spread over the cluster.
            ds = ds.flat_map(fn, **options).repartition(target_num_rows_per_block=1)
        else:
            ds = ds.map(fn, **options)
    return ds


def run_serially(steps: list[Step], inputs: list[dict], seconds_by_step: dict[str, float] | None = None) -> list[dict]:
    """The rows `to_dataset` yields, computed step after step in this process (each stage built once; model
    loading counts in its step's time). Holds every record of a step in memory: for small runs."""
    seconds_by_step = {} if seconds_by_step is None else seconds_by_step
    rows = _input_records(inputs)
    for step in steps:
        started = time.perf_counter()
        stage = step.stage(**step.kwargs)
        if step.batch_size:
            batches = [rows[first : first + step.batch_size] for first in range(0, len(rows), step.batch_size)]
            rows = [out for batch in batches for out in _call_on_batch(stage, batch)]
        elif step.fan_out:
            rows = [out for row in rows for out in stage(row)]
        else:
            rows = [stage(row) for row in rows]
        seconds_by_step[step.name] = time.perf_counter() - started
    return rows


def _input_records(inputs: list[dict]) -> list[dict]:
    """One record per input (a listed path with its kind and caption), as the first stage takes them."""
    return [{"clip": Clip(**row)} for row in inputs]


def _call_on_batch(stage, rows: list[dict]) -> list[dict]:
    """A batch as Ray Data's numpy format gives it (columns of object arrays), and the rows of the result."""
    columns = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [row[key] for row in rows]
        columns[key] = column
    result = stage(columns)
    length = len(next(iter(result.values())))
    return [{key: values[i] for key, values in result.items()} for i in range(length)]
