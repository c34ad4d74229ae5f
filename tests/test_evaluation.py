"""Evaluation runs end to end on a real local Ray: curation holds out a test split by source video, two "models"
(two seeds of the tiny random model) generate its clips and are scored with the quality metrics, the report lists
both with a row per clip, a rerun after an interruption generates only the missing clips, and `--videos` scores
videos made elsewhere against their own audio. Curation's report is drawn with the same page code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evaluation.evaluate import (
    CLIP_WRITTEN_PAUSE,
    METRICS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    ConfigError,
    load_config,
    main,
    run,
)
from evaluation.stats import better_direction, bootstrap_difference, bootstrap_mean
from evaluation.testset import load_test_set
from multitalk_model.checkpoints import audio_state_dict
from multitalk_model.config import get_preset
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from multitalk_model.media import probe_media
from pipelines.config import load_config as load_curation_config
from pipelines.curate import run as curate
from pipelines.schema import MANIFEST_FILE
from pipelines.schema import REPORT_FILE as CURATION_REPORT
from pipelines.schema import SUMMARY_FILE as CURATION_SUMMARY
from pipelines.sink import TEST_DIR
from tests.helpers import save_random_feature_networks, short_window_curation
from training.config import EvaluationSettings, ModelConfig
from training.config import load_config as load_training_config
from training.data import _list_shards
from training.encoders import FrozenEncoders
from training.evaluation import BEST_DIR, BEST_FILE, PeriodicEvaluation
from training.metrics import METRICS_FILE as TRAINING_METRICS_FILE
from training.metrics import TENSORBOARD_DIR, read_metrics
from training.model import build_training_model
from training.train import run as train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY_TRAINING_CONFIG = REPO / "training" / "configs" / "tiny-cpu.yaml"
HELD_OUT = "talking_woman_25fps.mp4"
PROTOCOL = {"steps": 2, "frame_num": 5, "resolution": [32, 32], "text_guidance": 1.0, "audio_guidance": 2.0}


@pytest.fixture(scope="module")
def curated(local_ray, shared_media, tmp_path_factory) -> Path:
    """Two talking videos curated into 17-frame clips, one of them held out as the test split."""
    work = tmp_path_factory.mktemp("curation")
    rows = [{"path": str(shared_media / name), "kind": "single"} for name in ("talking_man_25fps.mp4", HELD_OUT)]
    (work / "inputs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "clips": {"frame_num": 17, "stride": 41},
        "faces": {"detect_every": 8, "num_cpus": 0.5},
        "wav2vec": {"model_path": str(build_tiny_wav2vec2(work / "wav2vec2")), "num_cpus": 0.5, "batch_size": 4},
        "split": {"test_sources": [HELD_OUT]},
    }
    (work / "curate.yaml").write_text(yaml.safe_dump(short_window_curation(config)))
    curate(load_curation_config(work / "curate.yaml", input=str(work / "inputs.jsonl"), output=str(work / "out")))
    return work / "out"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: build_tiny_model_dir(root / name, seed=seed) for name, seed in (("seed0", 0), ("seed1", 1))}


@pytest.fixture(scope="module")
def feature_networks(tmp_path_factory) -> dict[str, str]:
    """Random TorchScript stand-ins of the Inception (FID) and I3D (FVD) networks, as the metrics config names them."""
    return save_random_feature_networks(tmp_path_factory.mktemp("networks"))


def _write_config(
    path: Path, test_set: Path, output: Path, models: dict[str, Path], networks: dict[str, str] | None = None
) -> Path:
    config = {
        "test_set": str(test_set),
        "output": str(output),
        "models": [{"name": name, "model_dir": str(directory)} for name, directory in models.items()],
        "protocol": PROTOCOL,
        "generation": {"num_actors": 1, "num_cpus": 1},
        "metrics": {"num_cpus": 1, **(networks or {})},
        "report": {"bootstrap_samples": 200},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def evaluated(curated, models, feature_networks, tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("evaluation")
    config_path = _write_config(work / "eval.yaml", curated / TEST_DIR, work / "out", models, feature_networks)
    return config_path, run(load_config(config_path))


# ------------------------------------------------------------------------------------------------ held-out split


def test_held_out_sources_have_their_own_shards_and_manifest_and_no_source_is_in_both(curated):
    train = pq.read_table(curated / MANIFEST_FILE).to_pylist()
    test = pq.read_table(curated / TEST_DIR / MANIFEST_FILE).to_pylist()

    assert train and test
    assert {Path(row["source"]).name for row in test} == {HELD_OUT}
    assert HELD_OUT not in {Path(row["source"]).name for row in train}
    assert {row["source_hash"] for row in train}.isdisjoint(row["source_hash"] for row in test)
    # Training lists the corpus folder's own shards: the test split's lie in test/ and are never read.
    listed = _list_shards(curated, ["single", "dual", "multi_event"])
    assert sorted(Path(path).name for path in listed) == sorted({row["shard"] for row in train})
    assert all(Path(path).parent == curated for path in listed)


def test_curation_report_shows_the_funnel_stage_times_and_frames_of_kept_and_rejected_clips(curated):
    summary = json.loads((curated / CURATION_SUMMARY).read_text())
    report = (curated / CURATION_REPORT).read_text()

    funnel = summary["funnel"]
    assert funnel["inputs"] == 2 and funnel["kept"] == summary["clips"] + summary["test_clips"]
    assert funnel["windows"] == funnel["kept"] + summary["rejects"] - summary["rejected_inputs"]
    held_out = pq.read_table(curated / TEST_DIR / MANIFEST_FILE).num_rows
    assert summary["test_sources"] == 1 and summary["test_clips"] == held_out > 0
    working = ("probe", "shots", "clip", "faces", "wav2vec")
    assert all(summary["stage_seconds"][stage] > 0 for stage in working)
    assert set(working) | {"audio", "sample"} <= set(summary["stage_seconds"])
    for heading in ("Yield", "Corpus", "Worker time per stage", "Sample kept clips", "Sample rejects"):
        assert heading in report
    # Plots plus one frame strip per sample kept clip.
    assert report.count("<img") >= 4 + min(summary["clips"], 4)


# ------------------------------------------------------------------------------------------------ statistics


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_clips():
    rng = np.random.default_rng(0)
    few, many = bootstrap_mean(rng.normal(1.0, 1.0, 10)), bootstrap_mean(rng.normal(1.0, 1.0, 1000))

    assert few.low < few.mean < few.high and many.low < many.mean < many.high
    assert many.high - many.low < (few.high - few.low) / 3
    assert 0.85 < many.mean < 1.15


def test_paired_difference_sees_a_consistent_gain_that_the_spread_of_the_clips_hides():
    clips = np.random.default_rng(1).normal(0.0, 5.0, 40)  # clips differ a lot; model b is 0.5 better on each
    difference = bootstrap_difference(clips, clips + 0.5 + np.random.default_rng(2).normal(0, 0.05, 40))

    assert difference.low > 0.4 and difference.high < 0.6 and difference.n == 40
    assert better_direction("sync.confidence") == 1 and better_direction("lmd") == -1
    assert better_direction("syncnet.sync_d") == -1 and better_direction("syncnet.sync_c") == 1
    assert better_direction("sync.offset_frames") == 0 and better_direction("syncnet.offset") == 0


# ------------------------------------------------------------------------------------------------ evaluation


def test_evaluation_of_two_models_writes_a_row_per_clip_and_model_and_a_report_of_both(evaluated, curated):
    config_path, summary = evaluated
    output = Path(load_config(config_path).output)
    test_ids = sorted(row["clip_id"] for row in pq.read_table(curated / TEST_DIR / MANIFEST_FILE).to_pylist())
    rows = pq.read_table(output / METRICS_FILE).to_pylist()
    report = (output / REPORT_FILE).read_text()

    assert sorted((row["model"], row["clip_id"]) for row in rows) == sorted(
        (model, key) for model in ("seed0", "seed1") for key in test_ids
    )
    # The random models' frames are noise: no face to score lip sync on, but pixel fidelity to the ground truth.
    assert all(not row["error"] or row["error"].startswith("face metrics:") for row in rows)
    assert all(np.isfinite(row["fidelity.psnr"]) and -1 <= row["fidelity.ssim"] <= 1 for row in rows)
    assert summary["generated"] == {"seed0": test_ids, "seed1": test_ids}
    for row in rows:
        info = probe_media(row["video"])
        assert (info.width, info.height, info.num_frames) == (32, 32, PROTOCOL["frame_num"])
        assert row["generation_s"] > 0 and row["metrics_s"] > 0
    assert {"fidelity.psnr", "fidelity.ssim"} <= set(summary["metrics"])
    for model in ("seed0", "seed1"):
        assert summary["models"][model]["clips"] == len(test_ids)
        estimate = summary["models"][model]["metrics"]["fidelity.psnr"]
        assert estimate["n"] == len(test_ids) and estimate["ci_low"] <= estimate["mean"] <= estimate["ci_high"]
    assert [(item["a"], item["b"]) for item in summary["differences"]] == [("seed0", "seed1")]
    assert json.loads((output / SUMMARY_FILE).read_text())["protocol"]["steps"] == PROTOCOL["steps"]
    for text in ("seed0", "seed1", "Differences between models", *test_ids):
        assert text in report
    # Per clip: the ground truth's strip and each model's.
    assert report.count('alt="ground truth"') == len(test_ids)
    assert report.count('alt="seed1"') == len(test_ids)


def test_fid_and_fvd_per_model_against_the_ground_truth_are_zero_for_the_ground_truth_itself(evaluated, tmp_path):
    config_path, summary = evaluated
    config = load_config(config_path)
    # The ground-truth videos, named by clip id, scored as one more system: its features are the ground truth's.
    truth = tmp_path / "truth"
    truth.mkdir()
    for clip in load_test_set(config.test_set, tmp_path / "test_set"):
        shutil.copy(clip.ground_truth, truth / f"{clip.clip_id}.mp4")

    rerun = run(config, [str(truth)])

    assert rerun["generated"] == {"seed0": [], "seed1": []}
    for results in (summary["set_metrics"], rerun["set_metrics"]):
        assert results["ground_truth_clips"] == summary["clips"] and results["clip_frames"] == PROTOCOL["frame_num"]
        for metric in ("fid", "fvd"):
            values = results[metric]["values"]
            assert values["seed0"] > 0 and values["seed1"] > 0 and values["seed0"] != values["seed1"]
    for metric in ("fid", "fvd"):
        values = rerun["set_metrics"][metric]["values"]
        assert abs(values["truth"]) < 1e-3 * min(values["seed0"], values["seed1"])
        assert values["seed0"] == summary["set_metrics"][metric]["values"]["seed0"]
    report = (Path(config.output) / REPORT_FILE).read_text()
    assert "Set-level metrics" in report and "<th>FID</th>" in report and "<th>FVD</th>" in report


def test_killed_run_reruns_only_the_missing_clips_and_ends_with_every_clip_and_model_once(
    local_ray, pause_gate, curated, models, tmp_path
):
    config_path = _write_config(tmp_path / "eval.yaml", curated / TEST_DIR, tmp_path / "out", models)
    config_path.write_text(yaml.safe_dump({**yaml.safe_load(config_path.read_text()), "max_clips": 2}))
    output = tmp_path / "out"
    log = tmp_path / "first.log"
    command = [sys.executable, str(REPO / "evaluation" / "evaluate.py"), "--config", str(config_path)]
    # The job is held once its generator has committed its first clip (seed0's; the models run one after the
    # other), and its driver killed there: Ray ends the job's actors with it.
    pause_gate.hold(CLIP_WRITTEN_PAUSE)
    process = subprocess.Popen(
        command, env={**os.environ, "RAY_ADDRESS": local_ray}, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        held = pause_gate.wait_reached(CLIP_WRITTEN_PAUSE, alive=lambda: process.poll() is None)
        process.send_signal(signal.SIGKILL)
        process.wait()
        for pid in held:  # the held generator must be gone before the gate opens, or it would go on generating
            try:
                psutil.Process(pid).wait(timeout=120)
            except psutil.NoSuchProcess:
                pass
    finally:
        process.kill()
        process.wait()
        pause_gate.release(CLIP_WRITTEN_PAUSE)
    written = {path: path.stat().st_ino for path in (output / "videos").rglob("*") if path.is_file()}
    assert [path.parent.name for path in written] == ["seed0"], log.read_text()[-3000:]
    assert not (output / METRICS_FILE).exists()

    rerun = run(load_config(config_path))

    clip_ids = sorted(clip.clip_id for clip in load_test_set(curated / TEST_DIR, tmp_path / "test_set")[:2])
    first = next(iter(written)).stem
    # summary.json records what this run generated: everything but the killed run's clip.
    assert json.loads((output / SUMMARY_FILE).read_text())["generated"] == rerun["generated"]
    assert rerun["generated"] == {"seed0": [key for key in clip_ids if key != first], "seed1": clip_ids}
    assert all(path.stat().st_ino == inode for path, inode in written.items())  # the killed run's clip is kept
    rows = pq.read_table(output / METRICS_FILE).to_pylist()
    assert sorted((row["model"], row["clip_id"]) for row in rows) == sorted(
        (model, key) for model in ("seed0", "seed1") for key in clip_ids
    )
    assert all(np.isfinite(row["fidelity.psnr"]) for row in rows)
    assert not [path for path in output.rglob(".*")]  # no partial video or record left behind
    # Without feature networks configured, the summary says why there is no FID / FVD.
    assert rerun["set_metrics"]["fid"]["values"] == {} and rerun["set_metrics"]["fvd"]["values"] == {}
    assert "not configured (metrics.i3d_path" in rerun["set_metrics"]["fvd"]["missing"]["seed1"]


def test_rerun_with_another_protocol_in_the_same_output_is_refused(evaluated, tmp_path):
    config_path, _ = evaluated
    values = yaml.safe_load(config_path.read_text())
    values["protocol"]["steps"] = 3
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(values))

    with pytest.raises(ConfigError, match="another protocol"):
        run(load_config(tmp_path / "other.yaml"))


def test_videos_made_elsewhere_are_scored_against_their_own_audio(local_ray, shared_media, tmp_path, capsys):
    folder = tmp_path / "talking"
    folder.mkdir()
    for name in ("talking_man_25fps.mp4", "talking_woman_25fps.mp4"):
        shutil.copy(shared_media / name, folder / name)

    assert main(["--videos", str(folder), "--output", str(tmp_path / "out")]) == 0

    rows = pq.read_table(tmp_path / "out" / METRICS_FILE).to_pylist()
    assert sorted((row["model"], row["clip_id"]) for row in rows) == [
        ("talking", "talking_man_25fps"),
        ("talking", "talking_woman_25fps"),
    ]
    assert all(row["error"] is None and np.isfinite(row["sync.confidence"]) for row in rows)
    assert "report: " in capsys.readouterr().out


def test_a_config_naming_a_missing_model_directory_fails_naming_the_field(tmp_path):
    (tmp_path / "eval.yaml").write_text(
        yaml.safe_dump(
            {
                "test_set": str(tmp_path),
                "output": str(tmp_path / "out"),
                "models": [{"name": "a", "model_dir": str(tmp_path / "missing")}],
            }
        )  # fmt: skip
    )

    with pytest.raises(ConfigError, match=r"models\.0\.model_dir: .*missing is not a directory"):
        load_config(tmp_path / "eval.yaml")


# ------------------------------------------------------------------------------------------------ during training


def _training_config(path: Path, model_dir: Path, data: Path, output: Path, evaluation: dict) -> Path:
    config = yaml.safe_load(TINY_TRAINING_CONFIG.read_text())
    config["output"] = str(output)
    config["model"]["model_dir"] = str(model_dir)
    config["data"].update({"path": str(data), "i2v_ratio": 0.0})
    config["schedule"].update({"max_steps": 4, "global_batch_size": 4, "checkpoint_every": 4, "log_every": 2})
    config["cluster"]["run_name"] = "with-evaluation"
    config["evaluation"] = evaluation
    path.write_text(yaml.safe_dump(config))
    return path


def test_periodic_evaluation_scores_the_current_weights_and_keeps_the_best(models, shared_media, tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"path": str(shared_media / HELD_OUT)}) + "\n")
    settings = EvaluationSettings(
        test_set=str(tmp_path / "test.jsonl"), every=2, protocol=PROTOCOL, keep_best="fidelity.psnr"
    )
    model = build_training_model(ModelConfig(preset="tiny", model_dir=str(models["seed0"]), precision="fp32"), "cpu", 0)
    encoders = FrozenEncoders.load(models["seed0"], get_preset("tiny"), "cpu", torch.float32)
    best = tmp_path / "out" / BEST_DIR / BEST_FILE
    best.parent.mkdir(parents=True)
    # A best step recorded before a restart, better than anything: the evaluation keeps it.
    best.write_text(json.dumps({"step": 1, "metric": "fidelity.psnr", "value": 1e9}))
    evaluation = PeriodicEvaluation(
        settings, str(models["seed0"]), encoders.encoders, get_preset("tiny"), tmp_path / "out"
    )

    scores = evaluation(model, step=2)

    assert np.isfinite(scores["fidelity.psnr"]) and model.training
    assert (tmp_path / "out" / "evaluation" / "step_00000002" / f"{Path(HELD_OUT).stem}.mp4").is_file()
    assert json.loads(best.read_text())["step"] == 1
    assert evaluation.due(4, last=False) and evaluation.due(5, last=True) and not evaluation.due(5, last=False)

    # Without a better record, this step's audio weights become the best.
    best.write_text(json.dumps({"step": 1, "metric": "fidelity.psnr", "value": -1e9}))
    evaluation = PeriodicEvaluation(
        settings, str(models["seed0"]), encoders.encoders, get_preset("tiny"), tmp_path / "out"
    )
    assert evaluation(model, step=4) == scores  # same weights, same seed: the same videos and scores
    assert json.loads(best.read_text()) == {"step": 4, "metric": "fidelity.psnr", "value": scores["fidelity.psnr"]}
    exported = load_file(best.parent / "multitalk.safetensors")
    assert exported.keys() == audio_state_dict(model).keys()
    assert all(torch.equal(exported[key], value) for key, value in audio_state_dict(model).items())


def test_training_evaluates_every_n_steps_into_tensorboard_and_metrics_jsonl(curated, models, tmp_path):
    evaluation = {"test_set": str(curated / TEST_DIR), "every": 2, "max_clips": 2, "protocol": PROTOCOL}
    config_path = _training_config(tmp_path / "train.yaml", models["seed0"], curated, tmp_path / "out", evaluation)

    result = train(load_training_config(config_path))

    assert result.error is None
    records = read_metrics(tmp_path / "out" / TRAINING_METRICS_FILE)
    evaluated = [record["step"] for record in records if "eval/fidelity.psnr" in record]
    assert evaluated == [2, 4]
    assert all(np.isfinite(record["eval/fidelity.psnr"]) for record in records if "eval/fidelity.psnr" in record)
    events = EventAccumulator(str(tmp_path / "out" / TENSORBOARD_DIR)).Reload()
    assert [event.step for event in events.Scalars("eval/fidelity.psnr")] == [2, 4]
    assert len(list((tmp_path / "out" / "evaluation" / "step_00000004").glob("*.mp4"))) == 2
