"""The serving configuration: one typed model, read from the `args` of serving/config.yaml.

Every field has a default and a description; a bad value fails at start with the field's name. Relative paths
(model_dir, a SQLite file, a local storage directory) are resolved against the directory `serve run` starts in,
because Serve replicas do not share its working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import make_url

from multitalk_model.config import get_preset
from multitalk_model.jobs import GenerationJob
from multitalk_model.plan_memory import DevicePlan, GiB, Options, parse_bytes, plan
from multitalk_model.regions import PackagedFaceDetectorKind

API_KEYS_ENV = "MULTITALK_API_KEYS"

# The fields of a job that come from its uploads, never from configured defaults.
_UPLOADED_FIELDS = {"image", "persons"}
# Job fields only the deployment's config sets (server-side paths), never a request.
CONFIGURED_FIELDS = {"loras"}


class Limits(BaseModel):
    """What one request may ask for; a request over a limit is refused with a message naming it."""

    model_config = ConfigDict(extra="forbid")

    max_image_bytes: int = Field(default=20 * 2**20, gt=0, description="Largest reference image upload, in bytes.")
    max_video_bytes: int = Field(default=500 * 2**20, gt=0, description="Largest upload of a video to dub, in bytes.")
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Largest reference image, in pixels (decoding needs 3 bytes each)."
    )
    max_audio_bytes: int = Field(default=50 * 2**20, gt=0, description="Largest audio upload (per person), in bytes.")
    max_audio_seconds: float = Field(
        default=60.0, gt=0, description="Longest composed speech (the video's length: add = sum, para = longest)."
    )
    max_prompt_chars: int = Field(default=2000, gt=0, description="Longest prompt and negative prompt, in characters.")
    max_persons: int = Field(default=3, ge=1, description="Most persons (audio streams) per video.")
    max_steps: int = Field(default=50, ge=1, description="Most sampling steps a request may ask for.")
    max_frame_num: int = Field(default=81, ge=5, description="Longest clip (frame_num) a request may ask for.")
    max_resolution_pixels: int = Field(
        default=1_000_000, gt=0, description="Largest explicit resolution (height x width) a request may ask for."
    )


class GeneratorScaling(BaseModel):
    """The generator deployment: replicas scale on the number of jobs waiting for them."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept running with an empty queue.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas the autoscaler starts.")
    target_jobs_per_replica: float = Field(
        default=1.0, gt=0, description="Jobs (running + waiting) per replica the autoscaler aims at."
    )
    upscale_delay_s: float = Field(
        default=10.0, ge=0, description="How long the queue must stay long before scaling up."
    )
    downscale_delay_s: float = Field(
        default=300.0, ge=0, description="How long replicas must stay idle before scaling down."
    )
    look_back_period_s: float = Field(
        default=30.0, gt=0, description="Window over which the autoscaler averages the jobs per replica."
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per replica (with devices_per_replica = 1).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources reserved per replica, e.g. one of a resource each generator node has one "
        "of, for at most one replica per node.",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=5.0, ge=0, description="How long a stopping replica may finish its job; unfinished jobs are requeued."
    )

    @model_validator(mode="after")
    def _bounds(self) -> GeneratorScaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class ControlPlane(BaseModel):
    """The API (ingress) and dispatcher replicas: CPU work that must not take a generator node's place. The defaults
    fit a laptop's 2 CPUs beside a generator; a cluster reserves more and keeps them on its CPU nodes by a label."""

    model_config = ConfigDict(extra="forbid")

    api_num_cpus: float = Field(
        default=0.25, gt=0, description="CPUs reserved per API replica (it decodes and checks the uploads)."
    )
    dispatcher_num_cpus: float = Field(default=0.1, gt=0, description="CPUs reserved by the dispatcher replica.")
    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels the API and dispatcher replicas require, e.g. {multitalk.io/pool: cpu} with "
        "the label on the CPU nodes only (KubeRay: the CPU worker group's labels), so that neither lands on a GPU "
        "node; empty: any node.",
    )

    def actor_options(self, num_cpus: float) -> dict[str, Any]:
        """ray_actor_options of one of the two deployments."""
        return {"num_cpus": num_cpus, **({"label_selector": self.label_selector} if self.label_selector else {})}


def _check_job_fields(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Fails at start when configured job fields are unknown or invalid, naming them."""
    uploaded = sorted(_UPLOADED_FIELDS & set(fields))
    if uploaded:
        raise ValueError(f"{name}: {uploaded} come from the uploads of each request, not from the config")
    try:
        GenerationJob.model_validate({"image": "image.png", "persons": [{"audio": "audio.wav"}], **fields})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"{name}: {problems}") from None
    return fields


class GenerationDefaults(BaseModel):
    """Job fields (multitalk_model.jobs.GenerationJob) filled in beneath what a request asks for."""

    model_config = ConfigDict(extra="forbid")

    defaults: dict[str, Any] = Field(default_factory=dict, description="Job fields applied to every job.")
    fast: dict[str, Any] = Field(
        # The reference's recipe with a distillation LoRA (its README): text guidance 1 (2 model passes per step
        # instead of 3), audio guidance 2, shift 2, 8 steps instead of 40: about 7.5x less compute.
        default_factory=lambda: {"steps": 8, "text_guidance": 1.0, "audio_guidance": 2.0, "shift": 2.0},
        description='Job fields of the fast profile, applied with fast_lora when a request sets "fast": true.',
    )
    fast_lora: tuple[str, float] | None = Field(
        default=None,
        description="[path, scale] of the few-step distillation LoRA (FusionX, lightx2v) the fast profile merges; "
        "without one, fast requests are refused (the profile's guidance only works with it).",
    )

    @field_validator("defaults")
    @classmethod
    def _defaults_are_job_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        return _check_job_fields("generation.defaults", fields)

    @field_validator("fast")
    @classmethod
    def _fast_are_job_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        return _check_job_fields("generation.fast", fields)


class ServingConfig(BaseModel):
    """Everything the serving application needs: model, devices, job store, file storage, access and limits."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Path = Field(description="Model directory (see multitalk_model.components).")
    tiny: bool = Field(default=False, description="Build a tiny random model into model_dir when it is missing.")
    device: str = Field(default="cpu", description="torch device of a generator replica: cpu or cuda.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Transformer dtype.")
    devices_per_replica: int = Field(
        default=1,
        ge=1,
        description="Devices one generator replica shards a job over. They are always on one node: the group is "
        "one STRICT_PACK placement group, which waits for a node with K free devices and never spans nodes "
        "(its collectives run over NVLink/PCIe, not the network); K must not exceed a node's devices.",
    )
    parallel_mode: Literal["sequence", "guidance"] = Field(
        default="sequence",
        description="How a device group shards a job: tokens across ranks (sequence) or guidance passes (guidance).",
    )
    shard_weights: bool = Field(
        default=False,
        description="FSDP2: each of a replica's devices holds 1/K of the transformer blocks and the text encoder.",
    )
    quantization: Literal["none", "int8", "fp8"] = Field(
        default="none",
        description="torchao weight quantisation of the transformer blocks' linear layers (fp8 needs a GPU).",
    )
    offload: Literal["none", "group"] = Field(
        default="none",
        description="group: diffusers block-level group offloading of the transformer, the text encoder on the CPU.",
    )
    text_encoder_on_cpu: bool = Field(
        default=False,
        description="umT5 encodes the prompts on the CPU: its weights (11 GB for umT5-XXL) never take device memory.",
    )
    compile: bool | None = Field(
        default=None,
        description="Regional torch.compile of the transformer blocks; None = on for one cuda device per replica.",
    )
    attention_backend: str | None = Field(
        default=None, description="diffusers attention backend (flash, sage, native, ...); None = the default."
    )
    gpu_memory: str | None = Field(
        default=None,
        description="Memory of one device (24GiB, 80GB); when set, a configuration the memory plan says cannot "
        "fit is refused at start (python -m multitalk_model.plan_memory lists what fits).",
    )
    memory_plan_model: str = Field(
        default="multitalk-14b", description="Model preset the memory plan assumes (multitalk_model.config)."
    )
    memory_plan_resolution: Literal["480p", "720p"] = Field(
        default="480p", description="Largest size the memory plan must fit (81 frames of its largest bucket)."
    )
    face_detector: PackagedFaceDetectorKind = Field(
        default="auto", description="Detector that finds persons in images without boxes."
    )
    model_name: str | None = Field(
        default=None, description="The model name the Videos API answers to (`model`); None = model_dir's name."
    )
    tts_model_dir: Path | None = Field(
        default=None, description="Kokoro TTS model directory that speaks text persons; None = espeak-ng (offline)."
    )
    tts_voice: str | None = Field(
        default=None, description="Default voice of text persons: a Kokoro voice (af_heart) or an espeak-ng one (en)."
    )
    database_url: str = Field(
        default="sqlite:///multitalk-serving/jobs.db", description="SQLAlchemy URL of the job database."
    )
    storage_uri: str = Field(
        default="multitalk-serving/files",
        description="Where inputs and results live: a directory or a pyarrow.fs URI (s3://, gs://, hdfs://).",
    )
    api_keys: list[str] = Field(
        default_factory=list, description=f"Accepted bearer tokens, with those in ${API_KEYS_ENV} (comma separated)."
    )
    api_replicas: int = Field(default=1, ge=1, description="Replicas of the HTTP API (the ingress).")
    control_plane: ControlPlane = Field(
        default_factory=ControlPlane, description="CPUs and node labels of the API and dispatcher replicas."
    )
    max_queued_jobs: int = Field(default=16, ge=1, description="Jobs that may wait; more submissions get 429.")
    max_attempts: int = Field(
        default=3, ge=1, description="Times a job may be started; a job interrupted this often fails."
    )
    dispatch_interval_s: float = Field(
        default=1.0, gt=0, description="How often the dispatcher looks for queued jobs without being woken."
    )
    limits: Limits = Field(default_factory=Limits, description="Request limits.")
    generator: GeneratorScaling = Field(default_factory=GeneratorScaling, description="Generator replicas.")
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults, description="Job defaults.")

    @field_validator("database_url")
    @classmethod
    def _shared_database(cls, url: str) -> str:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
            raise ValueError(
                "an in-memory SQLite database is not shared between replicas: give a file, sqlite:///jobs.db"
            )
        return url

    @field_validator("gpu_memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bytes(value)
        return value

    @model_validator(mode="after")
    def _options_fit(self) -> ServingConfig:
        if self.quantization == "fp8" and self.device != "cuda":
            raise ValueError("quantization: fp8 needs a GPU (device: cuda); int8 runs on cpu too")
        if self.quantization != "none" and self.shard_weights:
            # serving/sharding.py says why: torchao's quantised tensors cannot be split into FSDP2 shards.
            raise ValueError(
                f"quantization: {self.quantization} and shard_weights do not combine (FSDP2 cannot shard torchao's "
                "quantised weights); shard bf16 weights over more devices, or quantise an unsharded replica"
            )
        if self.offload == "group" and self.shard_weights:
            raise ValueError("offload: group and shard_weights do not combine (a sharded replica offloads nothing)")
        if self.gpu_memory is not None:
            device_plan = self.memory_plan()
            if not device_plan.fits:
                raise ValueError(
                    f"gpu_memory: {self.devices_per_replica} x {self.gpu_memory} cannot hold "
                    f"{self.memory_plan_model} at {self.memory_plan_resolution} with {device_plan.options.describe()}"
                    f": about {device_plan.peak / GiB:.1f} GiB per device, {device_plan.capacity / GiB:.1f} GiB "
                    "usable; see python -m multitalk_model.plan_memory for the combinations that fit"
                )
        return self

    def memory_plan(self) -> DevicePlan:
        """What one device of a replica holds with these options (needs gpu_memory)."""
        if self.gpu_memory is None:
            raise ValueError("the memory plan needs gpu_memory")
        options = Options(
            sharding=self.shard_weights and self.devices_per_replica > 1,
            quantization=self.quantization,
            offload=self.offload,
            parallel=self.parallel_mode,
            text_encoder_on_cpu=self.text_encoder_on_cpu,
        )
        return plan(
            options,
            self.devices_per_replica,
            parse_bytes(self.gpu_memory),
            get_preset(self.memory_plan_model),
            self.memory_plan_resolution,
            dtype=self.dtype,
        )

    @field_validator("api_keys")
    @classmethod
    def _keys_are_not_blank(cls, keys: list[str]) -> list[str]:
        if any(not key.strip() for key in keys):
            raise ValueError("API keys must not be blank")
        return keys

    def with_absolute_paths(self, base: Path) -> ServingConfig:
        """The same config with model_dir, a SQLite file and a local storage directory made absolute from base."""
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite" and not Path(url.database).is_absolute():
            url = url.set(database=str(base / url.database))
        storage = self.storage_uri if "://" in self.storage_uri else str(base / self.storage_uri)
        generation = self.generation
        if generation.fast_lora is not None:
            path, scale = generation.fast_lora
            generation = generation.model_copy(update={"fast_lora": (str(base / path), scale)})
        return self.model_copy(
            update={
                "model_dir": base / self.model_dir,
                "database_url": url.render_as_string(hide_password=False),
                "storage_uri": storage,
                "tts_model_dir": None if self.tts_model_dir is None else base / self.tts_model_dir,
                "generation": generation,
            }
        )

    @property
    def served_model(self) -> str:
        """The name clients give as `model`."""
        return self.model_name or self.model_dir.name

    def all_api_keys(self) -> list[str]:
        """The configured keys and those in $MULTITALK_API_KEYS, read now (where the replica runs)."""
        from_env = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
        return [*self.api_keys, *from_env]
