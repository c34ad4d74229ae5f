"""A group of K devices that generates each video together, in lockstep: a drop-in for `MultiTalkPipeline.generate`.

    group = DeviceGroup("models/multitalk", num_devices=2, mode="sequence", dtype=torch.bfloat16)
    result = group.generate(job, "video.mp4", progress=report, cancelled=is_cancelled)

One Ray actor per device (`num_gpus=1` on GPUs, `num_cpus=1` on CPU), all in one STRICT_PACK placement group, so
they share a node: rank 0 opens the torch.distributed rendezvous on a free port of 127.0.0.1 and every rank joins
(NCCL on GPUs, gloo on CPU). Each loads the pipeline and applies `serving.parallel` to its transformer. For a job,
every rank runs the same pipeline with the same seed; the collectives inside the transformer keep them in step.
Rank 0 writes the mp4, saves the finished clips to the caller's clip store and records progress, which the caller
polls (a retry's ranks all resume after the store's last clip); the caller's cancellation reaches rank 0, which
broadcasts it at every step's cancellation check, so all ranks stop at the same step and stay usable.

The actors read the job's files and rank 0 writes `out_path` on the group's node: give the group the caller's own
placement group (a Serve replica's `placement_group_bundles`, STRICT_PACK, devices in the last K bundles), or let
it create one on the caller's node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch.distributed.device_mesh import init_device_mesh

from multitalk_model.faces import build_face_detector
from multitalk_model.generation import (
    ClipStore,
    GenerationCancelled,
    GenerationError,
    GenerationResult,
    MultiTalkPipeline,
    Progress,
)
from multitalk_model.guidance import GuidanceScales, guidance_passes
from multitalk_model.jobs import GenerationJob
from multitalk_model.regions import PackagedFaceDetectorKind

from .parallel import apply_guidance_parallel, apply_sequence_parallel
from .sharding import shard_weights

ParallelMode = Literal["sequence", "guidance"]
_APPLY = {"sequence": apply_sequence_parallel, "guidance": apply_guidance_parallel}

# How long a rank may wait in a collective for the others: covers one step and the per-job preparation that runs
# before the first collective (rank 0 also draws the region preview).
_COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# After one rank failed, how long the others get to fail the same way (a bad job fails on every rank at once)
# before the group counts as out of step.
_FAILURE_GRACE_S = 30.0
# How long a group waits for its devices by default (a cluster may first have to start a node).
_PLACEMENT_TIMEOUT_S = 600.0


class _GenerationRank:
    """One rank of a DeviceGroup: the pipeline on one device, joined to the group's process group."""

    def __init__(
        self,
        model_dir: str,
        rank: int,
        world_size: int,
        use_gpu: bool,
        face_detector: PackagedFaceDetectorKind,  # built on each rank: detectors do not travel between processes
        shard: bool,
        pipeline_kwargs: dict[str, Any],
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.shard = shard
        self.device = torch.device("cuda" if use_gpu else "cpu")  # Ray shows each actor only its own GPU
        # A sharding rank loads on the CPU: its device need not hold the whole model, only the shards.
        self.pipeline = MultiTalkPipeline.from_model_dir(
            model_dir,
            device="cpu" if shard else self.device,
            face_detector=build_face_detector(face_detector),
            **pipeline_kwargs,
        )
        self._store: dist.TCPStore | None = None
        self._lock = threading.Lock()
        self._run = 0
        self._cancelled_run = 0
        self._progress: list[Progress] = []

    def listen(self) -> int:
        """Rank 0: opens the rendezvous store on a free port of 127.0.0.1 and returns the port."""
        self._store = dist.TCPStore(
            "127.0.0.1", 0, self.world_size, is_master=True, timeout=_COLLECTIVE_TIMEOUT, wait_for_workers=False
        )
        return self._store.port

    def join(self, port: int, mode: ParallelMode) -> None:
        """Joins the process group through rank 0's store, shards the weights if asked and parallelises the
        transformer."""
        store = self._store or dist.TCPStore(
            "127.0.0.1", port, self.world_size, is_master=False, timeout=_COLLECTIVE_TIMEOUT
        )
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=store, rank=self.rank, world_size=self.world_size, timeout=_COLLECTIVE_TIMEOUT
        )
        if self.shard:
            components = self.pipeline.components
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            shard_weights(components, mesh, text_encoder=not self.pipeline.text_encoder_on_cpu)
            # The shards now sit on the mesh's device; the unsharded rest follows them there.
            for module in (components.transformer, components.vae, components.image_encoder):
                module.to(self.device)
            components.audio_encoder.model.to(self.device)
            self.pipeline.device = self.device
        _APPLY[mode](self.pipeline.components.transformer)

    def generate(
        self, run: int, job: GenerationJob, out_path: str, preview_path: str | None, clip_store: ClipStore | None
    ) -> GenerationResult | None:
        """Runs one job in step with the other ranks; rank 0 writes the video, saves the clips and returns the
        result. Every rank reads the store's last clip before the first collective, so before rank 0 saves one."""
        with self._lock:
            self._run, self._progress = run, []
        if self.rank == 0:
            return self.pipeline.generate(job, out_path, self._record, self._cancelled, preview_path, clip_store)
        resume = clip_store.last() if clip_store is not None else None
        for _ in self.pipeline.stream(self.pipeline.prepare(job), cancelled=self._cancelled, resume=resume):
            pass
        return None

    @ray.method(concurrency_group="control")
    def drain_progress(self) -> list[Progress]:
        """The progress events recorded since the last call (rank 0)."""
        with self._lock:
            events, self._progress = self._progress, []
        return events

    @ray.method(concurrency_group="control")
    def cancel(self, run: int) -> None:
        """Asks run `run` to stop at its next step (rank 0); a run that has ended is left alone."""
        with self._lock:
            self._cancelled_run = run

    def _record(self, event: Progress) -> None:
        with self._lock:
            self._progress.append(event)

    def _cancelled(self) -> bool:
        # A collective: every rank asks at the same point of every step and all take rank 0's answer.
        with self._lock:
            flag = torch.tensor([int(self._cancelled_run == self._run)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


class DeviceGroup:
    """K devices generating each video together; `generate` has the signature and result of the pipeline's.

    mode "sequence" splits the video tokens over the ranks (the model's head count must divide by K); "guidance"
    puts the guidance passes on separate ranks (a job's passes per step, 3, or 2 with text_guidance 1, must divide
    by K). `shard_weights`: FSDP2, each rank holds 1/K of the transformer blocks and the text encoder
    (`serving.sharding`). `placement_group`: the caller's own, whose last K bundles hold the devices; None creates
    one on the caller's node, removed by `shutdown`, waiting up to placement_timeout_s for K devices free on that
    node (the group never spans nodes: TimeoutError when they do not come). `face_detector` names the detector
    each rank builds; `pipeline_kwargs` go to `MultiTalkPipeline.from_model_dir` (dtype, loras, attention_backend,
    low_memory, quantization, compile_blocks). Jobs run one at a time.
    """

    def __init__(
        self,
        model_dir: str | Path,
        num_devices: int,
        mode: ParallelMode = "sequence",
        use_gpu: bool | None = None,
        placement_group: PlacementGroup | None = None,
        poll_interval_s: float = 0.2,
        face_detector: PackagedFaceDetectorKind = "auto",
        shard_weights: bool = False,
        placement_timeout_s: float = _PLACEMENT_TIMEOUT_S,
        **pipeline_kwargs: Any,
    ) -> None:
        if mode not in _APPLY:
            raise ValueError(f"mode must be one of {sorted(_APPLY)}, got {mode!r}")
        if num_devices < 1:
            raise ValueError(f"num_devices must be at least 1, got {num_devices}")
        self.num_devices = num_devices
        self.mode = mode
        self.use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if use_gpu is None else use_gpu
        self.poll_interval_s = poll_interval_s
        self._model_dir = str(model_dir)
        self._face_detector = face_detector
        self._shard_weights = shard_weights
        self._pipeline_kwargs = pipeline_kwargs
        self._owns_placement_group = placement_group is None
        self._placement_group = placement_group or self._create_placement_group(placement_timeout_s)
        self._check_placement_group()
        self._lock = threading.Lock()
        self._run = 0
        self._actors: list[ray.actor.ActorHandle] = []
        self._start()

    def generate(
        self,
        job: GenerationJob,
        out_path: str | Path,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        preview_path: str | Path | None = None,
        clip_store: ClipStore | None = None,
    ) -> GenerationResult:
        """Generates the video of a job into out_path, as `MultiTalkPipeline.generate` does, on the K devices (the
        clip store travels to the ranks: it must pickle)."""
        if self.mode == "guidance":
            passes = len(guidance_passes(GuidanceScales(job.text_guidance, job.audio_guidance)))
            if passes % self.num_devices:
                raise GenerationError(
                    f"text_guidance: {job.text_guidance} runs {passes} guidance passes per step, which do not split "
                    f"over the {self.num_devices} devices of this guidance-parallel group"
                )
        with self._lock:
            if not self._actors:
                raise RuntimeError("the device group is shut down")
            self._run += 1
            preview = None if preview_path is None else str(preview_path)
            refs = [actor.generate.remote(self._run, job, str(out_path), preview, clip_store) for actor in self._actors]
            return self._wait(self._run, refs, progress, cancelled)

    def shutdown(self) -> None:
        """Stops the actors and, if this group created it, removes the placement group."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._owns_placement_group and self._placement_group is not None:
            remove_placement_group(self._placement_group)
            self._placement_group = None

    def _wait(
        self,
        run: int,
        refs: list[ray.ObjectRef],
        progress: Callable[[Progress], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> GenerationResult:
        pending, errors, first_error_at, cancel_sent = refs, [], 0.0, False
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_interval_s)
                errors += [error for error in map(_error_of, done) if error is not None]
                if progress is not None:
                    for event in self._drain_progress():
                        progress(event)
                if errors:
                    first_error_at = first_error_at or time.monotonic()
                    if time.monotonic() - first_error_at > _FAILURE_GRACE_S:
                        break
                elif cancelled is not None and not cancel_sent and cancelled():
                    self._actors[0].cancel.remote(run)
                    cancel_sent = True
        finally:
            if pending and not errors:  # the caller's callback raised: stop the run at its next step
                self._actors[0].cancel.remote(run)
        if errors:
            error = errors[0]
            # A bad job or a cancellation stops every rank at the same point; anything else may leave the ranks
            # out of step (one waits in a collective the others never reach): start the group afresh.
            if pending or not isinstance(error, (GenerationError, GenerationCancelled)):
                self._restart()
            raise error
        return ray.get(refs[0])

    def _drain_progress(self) -> list[Progress]:
        try:
            return ray.get(self._actors[0].drain_progress.remote())
        except RayActorError:  # rank 0 died: its generate call reports the failure
            return []

    def _create_placement_group(self, timeout_s: float) -> PlacementGroup:
        bundle = {"GPU": 1, "CPU": 1} if self.use_gpu else {"CPU": 1}
        # The first bundle asks for a sliver of the caller's node resource: STRICT_PACK then puts all the devices
        # on the caller's node, where the job's files and out_path are.
        on_this_node = {f"node:{ray.util.get_node_ip_address()}": 0.001}
        bundles = [{**bundle, **on_this_node}] + [bundle] * (self.num_devices - 1)
        group = placement_group(bundles, strategy="STRICT_PACK")
        if not group.wait(timeout_s):
            remove_placement_group(group)
            raise TimeoutError(
                f"no {self.num_devices} x {bundle} free on this node after {timeout_s:.0f} s "
                f"(a caller that holds a CPU there takes it from the group)"
            )
        return group

    def _check_placement_group(self) -> None:
        strategy = placement_group_table(self._placement_group)["strategy"]
        bundles = self._placement_group.bundle_count
        if strategy != "STRICT_PACK" or bundles < self.num_devices:
            raise ValueError(
                f"placement_group must be STRICT_PACK with at least {self.num_devices} bundles, "
                f"got {strategy} with {bundles}"
            )

    def _start(self) -> None:
        first_bundle = self._placement_group.bundle_count - self.num_devices
        rank_class = ray.remote(concurrency_groups={"control": 1})(_GenerationRank)
        self._actors = [
            rank_class.options(
                num_cpus=1,
                num_gpus=1 if self.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._placement_group, placement_group_bundle_index=first_bundle + rank
                ),
            ).remote(
                self._model_dir,
                rank,
                self.num_devices,
                self.use_gpu,
                self._face_detector,
                self._shard_weights,
                self._pipeline_kwargs,
            )
            for rank in range(self.num_devices)
        ]
        try:
            port = ray.get(self._actors[0].listen.remote())
            ray.get([actor.join.remote(port, self.mode) for actor in self._actors])
        except RayError as error:
            self.shutdown()
            raise _unwrap(error) from None

    def _restart(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._start()


def _unwrap(error: RayError) -> BaseException:
    """The rank's own exception behind Ray's wrapper, so callers see the pipeline's errors and messages."""
    return error.cause if isinstance(error, RayTaskError) else error


def _error_of(ref: ray.ObjectRef) -> BaseException | None:
    try:
        ray.get(ref)
    except RayError as error:
        return _unwrap(error)
    return None


__all__ = ["DeviceGroup", "ParallelMode"]
