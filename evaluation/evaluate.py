"""Evaluate models on held-out clips: `python evaluation/evaluate.py --config CONFIG.yaml [--test-set LOC]
[--output DIR] [--videos DIR ...]`, on an embedded local Ray or, under `ray job submit` or with RAY_ADDRESS set, on
a cluster.

Every model generates every test clip under one protocol (a Ray Data stage on an actor pool, one pool per model),
then each video is scored against its clip's ground truth, audio and first frame (a stage of tasks); FID and FVD
compare each model's set of videos with the ground truth (evaluation/set_metrics.py). `--videos DIR`
adds the videos of a folder made elsewhere (named by clip id) as one more system, scored the same way; without a
test set each is scored against its own audio track. The output folder holds videos/MODEL/CLIP.mp4,
scores/MODEL/CLIP.json, metrics.parquet (one row per clip and model), summary.json and report.html. Rerunning the
same command generates and scores only what is missing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from itertools import combinations
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (also what `ray job submit --working-dir .` does): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from pydantic import Field

from evaluation.clips import ModelSpec, Protocol, generate_clip, load_pipeline, score_clip
from evaluation.report import evaluation_report
from evaluation.set_metrics import NETWORK_FIELDS, set_metrics
from evaluation.stats import BOOTSTRAP_SAMPLES, CONFIDENCE, bootstrap_difference, bootstrap_mean
from evaluation.testset import TestClip, TestSetError, load_test_set, video_as_clip, videos_in
from multitalk_model.generation import GenerationError
from platform_common.config import ConfigError, ConfigSection, absolute_location, read_config
from platform_common.pause import pause_point

logger = logging.getLogger("evaluation.evaluate")

METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
RUN_FILE = "run.json"  # the protocol and models the output's videos were made with
VIDEOS_DIR, SCORES_DIR, TEST_SET_DIR = "videos", "scores", "test_set"
CLIP_WRITTEN_PAUSE = "evaluation-clip-written"  # a generator actor committed a clip's video (platform_common.pause)
# Errors of a clip's inputs or video (bad media, a job generation refuses): recorded in its row, never fatal.
CLIP_ERRORS = (ValueError, OSError, RuntimeError)


class GenerationResources(ConfigSection):
    num_actors: int = Field(default=1, ge=1, description="generator actors per model")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per generator actor")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per generator actor (0: CPU)")
    precision: str = Field(default="bf16", pattern="^(bf16|fp32)$", description="model dtype on a GPU (CPU: fp32)")


class MetricsSettings(ConfigSection):
    syncnet_path: str | None = Field(default=None, description="SyncNet weights (syncnet_v2.model): Sync-C/D")
    inception_path: str | None = Field(
        default=None, description="Inception TorchScript (StyleGAN2-ADA inception-2015-12-05.pt): FID per model"
    )
    i3d_path: str | None = Field(
        default=None, description="I3D TorchScript (StyleGAN-V i3d_torchscript.pt): FVD per model"
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per scoring task")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per FID/FVD feature task (0: CPU)")
    primary: str = Field(default="sync.confidence", description="the metric clips are ordered by, worst first")


class ReportSettings(ConfigSection):
    bootstrap_samples: int = Field(default=BOOTSTRAP_SAMPLES, ge=100, description="bootstrap resamples of the clips")
    confidence: float = Field(default=CONFIDENCE, gt=0, lt=1, description="level of the intervals")
    max_clips: int = Field(default=50, ge=1, description="clips shown with frame strips in report.html")


class EvaluationConfig(ConfigSection):
    test_set: str | None = Field(
        default=None, description="curation's test split folder (OUTPUT/test) or a manifest of videos (.jsonl/.csv)"
    )
    output: str | None = Field(default=None, description="folder of the videos, scores and report")
    models: list[ModelSpec] = Field(default_factory=list, description="models to generate the test clips with")
    protocol: Protocol = Field(default_factory=Protocol, description="generation settings, the same for every model")
    max_clips: int | None = Field(default=None, ge=1, description="evaluate the first N clips of the test set only")
    generation: GenerationResources = Field(default_factory=GenerationResources, description="generator actors")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings, description="quality metrics")
    report: ReportSettings = Field(default_factory=ReportSettings, description="statistics and the page")
    ray_address: str | None = Field(default=None, description="Ray cluster address (default: RAY_ADDRESS or local)")
    local_num_cpus: int = Field(default=2, ge=1, description="CPUs of an embedded local Ray")


def load_config(path: str | os.PathLike | None, **overrides: str | None) -> EvaluationConfig:
    """Read and validate a YAML config (None: all defaults); non-None `overrides` replace top-level fields."""
    if path is None:
        config = EvaluationConfig.model_validate({k: v for k, v in overrides.items() if v is not None})
        path = "(command line)"
    else:
        config = read_config(path, EvaluationConfig, overrides)
    if not config.output:
        raise ConfigError(f"{path}: output: required (in the config or on the command line)")
    config.output = absolute_location(config.output)
    if config.test_set:
        config.test_set = absolute_location(config.test_set)
        if not Path(config.test_set).exists():
            raise ConfigError(f"{path}: test_set: {config.test_set} does not exist")
    if config.models and not config.test_set:
        raise ConfigError(f"{path}: test_set: required to generate with models")
    names = [model.name for model in config.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: models: names must be unique, got {names}")
    for index, model in enumerate(config.models):
        model.model_dir = absolute_location(model.model_dir)
        if not Path(model.model_dir).is_dir():
            raise ConfigError(f"{path}: models.{index}.model_dir: {model.model_dir} is not a directory")
        if model.audio_weights:
            model.audio_weights = absolute_location(model.audio_weights)
            if not Path(model.audio_weights).is_file():
                raise ConfigError(f"{path}: models.{index}.audio_weights: {model.audio_weights} is not a file")
    for field in ("syncnet_path", *NETWORK_FIELDS.values()):  # weight files
        if location := getattr(config.metrics, field):
            location = absolute_location(location)
            if not Path(location).is_file():
                raise ConfigError(f"{path}: metrics.{field}: {location} is not a file")
            setattr(config.metrics, field, location)
    return config


# ------------------------------------------------------------------------------------------------ the Ray stages


class ClipGenerator:
    """Actor: holds one model's pipeline and generates the clips of its rows (a failed clip records its error)."""

    def __init__(self, model: dict, protocol: dict, output: str, num_gpus: float, precision: str) -> None:
        on_gpu = num_gpus > 0 and torch.cuda.is_available()
        dtype = torch.bfloat16 if on_gpu and precision == "bf16" else torch.float32
        self.model = ModelSpec.model_validate(model)
        self.protocol = Protocol.model_validate(protocol)
        self.output = output
        self.pipeline = load_pipeline(self.model, "cuda" if on_gpu else "cpu", dtype)

    def __call__(self, row: dict) -> dict:
        clip = TestClip.from_row(row["clip"])
        try:
            row["generation_s"] = generate_clip(self.pipeline, clip, self.protocol, row["video"])
        except (GenerationError, *CLIP_ERRORS) as error:
            logger.warning("%s: cannot generate %s: %s", self.model.name, clip.clip_id, error)
            row["error"] = f"generation: {type(error).__name__}: {error}"
        else:
            pause_point(CLIP_WRITTEN_PAUSE)
        return row


class ClipScorer:
    """Task: scores one video against its clip and writes scores/MODEL/CLIP.json (the run's record of it)."""

    def __init__(self, output: str, syncnet_path: str | None) -> None:
        self.output = output
        self.syncnet_path = syncnet_path

    def __call__(self, row: dict) -> dict:
        clip = TestClip.from_row(row["clip"])
        record = {
            "model": row["model"],
            "clip_id": clip.clip_id,
            "n_person": clip.n_person,
            "video": row["video"],
            "ground_truth": clip.ground_truth,
            "generation_s": row.get("generation_s"),
            "metrics_s": None,
            "error": row.get("error"),
            "metrics": {},
        }
        if not record["error"]:
            try:
                record["metrics"], problem, record["metrics_s"] = score_clip(row["video"], clip, self.syncnet_path)
                record["error"] = f"face metrics: {problem}" if problem else None
            except CLIP_ERRORS as error:
                logger.warning("%s: cannot score %s: %s", row["model"], clip.clip_id, error)
                record["error"] = f"metrics: {type(error).__name__}: {error}"
        _write_json(score_path(self.output, row["model"], clip.clip_id), record)
        return {"model": row["model"], "clip_id": clip.clip_id, "generated": record["generation_s"] is not None}


def video_path(output: str | Path, model: str, clip_id: str) -> Path:
    return Path(output) / VIDEOS_DIR / model / f"{clip_id}.mp4"


def score_path(output: str | Path, model: str, clip_id: str) -> Path:
    return Path(output) / SCORES_DIR / model / f"{clip_id}.json"


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2))
    partial.replace(path)


# ------------------------------------------------------------------------------------------------------ the run


def run(config: EvaluationConfig, videos: list[str] = ()) -> dict:
    """Generate what is missing, score what is unscored, and write metrics.parquet, summary.json, report.html.
    Returns the summary, with `generated` (model -> clip ids generated by this run)."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    clips = load_test_set(config.test_set, output / TEST_SET_DIR) if config.test_set else []
    clips = clips[: config.max_clips] if config.max_clips else clips
    _check_run_record(output, config)
    _connect_ray(config)
    ray.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type = True
    generated = {model.name: _evaluate_model(config, model, clips) for model in config.models}
    systems = list(generated)
    for folder in videos:
        name = Path(folder).name
        if name in systems:
            raise ConfigError(f"--videos {folder}: a system named {name!r} is evaluated already")
        systems.append(name)
        _score_videos(config, name, folder, clips)
    test_ids = {clip.clip_id for clip in clips}
    records = [
        json.loads(path.read_text())
        for system in systems
        for path in sorted((output / SCORES_DIR / system).glob("*.json"))
        # A model's clips of this test set (a smaller max_clips leaves earlier ones out); every given video.
        if system not in generated or path.stem in test_ids
    ]
    summary = summarize(records, systems, config)
    summary["set_metrics"] = _set_metrics(config, clips, records, systems)
    summary["generated"] = generated
    _write_results(output, records, summary, config)
    logger.info("evaluated %s on %d clips; report in %s", ", ".join(systems), summary["clips"], output / REPORT_FILE)
    return summary


def _evaluate_model(config: EvaluationConfig, model: ModelSpec, clips: list[TestClip]) -> list[str]:
    """Generate the model's missing clips on an actor pool and score every unscored one; returns the ids of the
    clips this run generated."""
    output = config.output
    rows = [_row(model.name, clip, video_path(output, model.name, clip.clip_id)) for clip in clips]
    missing = [row for row in rows if not Path(row["video"]).is_file()]
    unscored = [row for row in rows if Path(row["video"]).is_file() and not _scored(output, row)]
    logger.info("%s: %d clips to generate, %d more to score", model.name, len(missing), len(unscored))
    datasets = []
    if missing:
        resources = config.generation
        options: dict = {"num_cpus": resources.num_cpus}
        if resources.num_gpus:
            options["num_gpus"] = resources.num_gpus
        constructor = {
            "model": model.model_dump(),
            "protocol": config.protocol.model_dump(),
            "output": output,
            "num_gpus": resources.num_gpus,
            "precision": resources.precision,
        }
        pool = ray.data.ActorPoolStrategy(size=resources.num_actors)
        dataset = ray.data.from_items(missing, override_num_blocks=len(missing))
        datasets.append(dataset.map(ClipGenerator, fn_constructor_kwargs=constructor, compute=pool, **options))
    if unscored:
        datasets.append(ray.data.from_items(unscored, override_num_blocks=len(unscored)))
    return sorted(row["clip_id"] for row in _score(datasets, config) if row["generated"])


def _score_videos(config: EvaluationConfig, name: str, folder: str, clips: list[TestClip]) -> None:
    """Score a folder of videos made elsewhere: against the test clip of the same id, else their own audio."""
    by_id = {clip.clip_id: clip for clip in clips}
    work_dir = Path(config.output) / TEST_SET_DIR / name
    rows = [_row(name, by_id.get(video.stem) or video_as_clip(video, work_dir), video) for video in videos_in(folder)]
    unscored = [row for row in rows if not _scored(config.output, row)]
    logger.info("%s: %d given videos, %d to score", name, len(rows), len(unscored))
    if unscored:
        _score([ray.data.from_items(unscored, override_num_blocks=len(unscored))], config)


def _row(model: str, clip: TestClip, video: Path) -> dict:
    return {"model": model, "clip": clip.as_row(), "video": str(video), "generation_s": None, "error": None}


def _scored(output: Path, row: dict) -> bool:
    return score_path(output, row["model"], row["clip"]["clip_id"]).is_file()


def _score(datasets: list[ray.data.Dataset], config: EvaluationConfig) -> list[dict]:
    """Runs the datasets' rows through the scorer (the generator's output streams into it clip by clip); returns
    the scorer's rows."""
    if not datasets:
        return []
    dataset = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    scorer = ClipScorer(config.output, config.metrics.syncnet_path)
    return list(dataset.map(scorer, num_cpus=config.metrics.num_cpus).iter_rows())


def _check_run_record(output: Path, config: EvaluationConfig) -> None:
    """The output's videos stay comparable: a rerun must use the protocol and model specs they were made with."""
    record = {
        "protocol": config.protocol.model_dump(mode="json"),
        "models": {model.name: model.model_dump(mode="json") for model in config.models},
    }
    path = output / RUN_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous["protocol"] != record["protocol"]:
            raise ConfigError(
                f"{output}: holds videos made under another protocol ({previous['protocol']}); use a new output"
            )
        for name, spec in record["models"].items():
            if name in previous["models"] and previous["models"][name] != spec:
                raise ConfigError(f"{output}: model {name!r} was {previous['models'][name]} there; rename it")
        record["models"] = {**previous["models"], **record["models"]}
    _write_json(path, record)


def summarize(records: list[dict], systems: list[str], config: EvaluationConfig) -> dict:
    """Per model: clips, errors and each metric's mean with its bootstrap interval; per pair of models: the
    paired difference (B - A) of each metric."""
    settings = config.report
    names = sorted({name for record in records for name in record["metrics"]})
    primary = config.metrics.primary if config.metrics.primary in names else (names[0] if names else None)
    metrics = ([primary] if primary else []) + [name for name in names if name != primary]
    by_system = {system: {r["clip_id"]: r for r in records if r["model"] == system} for system in systems}
    clip_ids = sorted({record["clip_id"] for record in records})

    def values(system: str, metric: str) -> list[float]:
        return [by_system[system].get(key, {}).get("metrics", {}).get(metric, float("nan")) for key in clip_ids]

    models = {}
    for system in systems:
        rows = by_system[system].values()
        models[system] = {
            "clips": sum(1 for row in rows if row["metrics"]),  # scored, if only in part
            "errors": sum(1 for row in rows if row["error"]),
            "metrics": {
                metric: bootstrap_mean(
                    values(system, metric), settings.bootstrap_samples, settings.confidence
                ).as_dict()
                for metric in metrics
            },
        }
    differences = [
        {
            "a": a,
            "b": b,
            "metrics": {
                metric: bootstrap_difference(
                    values(a, metric), values(b, metric), settings.bootstrap_samples, settings.confidence
                ).as_dict()
                for metric in metrics
            },
        }
        for a, b in combinations(systems, 2)
    ]
    seconds = {
        kind: sum(record[kind] or 0.0 for record in records) for kind in ("generation_s", "metrics_s")
    }  # fmt: skip
    return {
        "test_set": config.test_set,
        "clips": len(clip_ids),
        "protocol": config.protocol.model_dump(),
        "models_config": [model.model_dump() for model in config.models],
        "metrics": metrics,
        "primary_metric": primary,
        "bootstrap_samples": settings.bootstrap_samples,
        "confidence": settings.confidence,
        "models": models,
        "differences": differences,
        "seconds": seconds,
    }


def _set_metrics(config: EvaluationConfig, clips: list[TestClip], records: list[dict], systems: list[str]) -> dict:
    """FID / FVD of each system's scored videos of clips with ground truth against all the clips' ground truth."""
    videos = {
        system: [r["video"] for r in records if r["model"] == system and r["ground_truth"] and r["metrics"]]
        for system in systems
    }
    networks = {metric: getattr(config.metrics, field) for metric, field in NETWORK_FIELDS.items()}
    ground_truths = [clip.ground_truth for clip in clips if clip.ground_truth]
    return set_metrics(ground_truths, videos, networks, config.metrics.num_cpus, config.metrics.num_gpus)


def _write_results(output: Path, records: list[dict], summary: dict, config: EvaluationConfig) -> None:
    metrics = summary["metrics"]
    rows = [
        {
            **{key: value for key, value in record.items() if key != "metrics"},
            **{m: record["metrics"].get(m) for m in metrics},
        }
        for record in records
    ]
    schema = pa.schema(
        [
            ("model", pa.string()),
            ("clip_id", pa.string()),
            ("n_person", pa.int32()),
            ("video", pa.string()),
            ("ground_truth", pa.string()),
            ("generation_s", pa.float64()),
            ("metrics_s", pa.float64()),
            ("error", pa.string()),
            *((metric, pa.float64()) for metric in metrics),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), output / METRICS_FILE)
    _write_json(output / SUMMARY_FILE, summary)
    page = evaluation_report(rows, summary, config.report.max_clips)
    (output / REPORT_FILE).write_text(page)


def _connect_ray(config: EvaluationConfig) -> None:
    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=config.local_num_cpus, include_dashboard=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="evaluation config (YAML); optional with --videos and --output")
    parser.add_argument("--test-set", help="curated test folder or manifest of videos (overrides test_set)")
    parser.add_argument("--output", help="output folder (overrides output)")
    parser.add_argument(
        "--videos", action="append", default=[], metavar="DIR",
        help="a folder of videos made elsewhere, named by clip id, scored as one more system (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.config and not args.videos:
        parser.error("give --config, or --videos DIR with --output")
    try:
        config = load_config(args.config, test_set=args.test_set, output=args.output)
        summary = run(config, [absolute_location(folder) for folder in args.videos])
    except (ConfigError, TestSetError) as error:
        parser.exit(2, f"error: {error}\n")
    for name, model in summary["models"].items():
        print(f"{name}: {model['clips']} clips scored, {model['errors']} failed")
    print(f"report: {Path(config.output) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
