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

from multitalk_model.jobs import GenerationJob

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
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per replica (with devices_per_replica = 1).")
    graceful_shutdown_timeout_s: float = Field(
        default=5.0, ge=0, description="How long a stopping replica may finish its job; unfinished jobs are requeued."
    )

    @model_validator(mode="after")
    def _bounds(self) -> GeneratorScaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


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
    devices_per_replica: int = Field(default=1, ge=1, description="Devices one generator replica shards a job over.")
    parallel_mode: Literal["sequence", "guidance"] = Field(
        default="sequence",
        description="How a device group shards a job: tokens across ranks (sequence) or guidance passes (guidance).",
    )
    face_detector: Literal["auto", "mtcnn", "haar"] = Field(
        default="auto", description="Detector that finds persons in images without boxes."
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
                "generation": generation,
            }
        )

    def all_api_keys(self) -> list[str]:
        """The configured keys and those in $MULTITALK_API_KEYS, read now (where the replica runs)."""
        from_env = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
        return [*self.api_keys, *from_env]
