"""The cluster's KubeRay jobs work together: each RayJob's entrypoint and config resolve, and every path a job reads
is given on the shared volume or written by an earlier job of the chain (infra/kuberay/chain.sh)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.config import CurationConfig
from platform_common.config import read_config
from training.config import TrainingConfig
from training.loop import EXPORT_FILE

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "infra" / "kuberay"
PATHS = yaml.safe_load((REPO / "infra" / "cluster_paths.yaml").read_text())


def _chain() -> list[Path]:
    line = re.search(r"^JOBS=\((.*)\)$", (KUBERAY / "chain.sh").read_text(), re.MULTILINE)
    assert line, "chain.sh lists its jobs in one JOBS=(...) line"
    return [KUBERAY / name for name in line.group(1).split()]


def _commands(manifest: dict) -> list[tuple[str, Path]]:
    """(script, config) of each command of a RayJob's entrypoint (commands joined by &&)."""
    commands = []
    for command in manifest["spec"]["entrypoint"].split("&&"):
        words = shlex.split(command)
        assert words[0] == "python" and words[2] == "--config", command
        script, config = REPO / words[1], REPO / words[3]
        assert script.is_file(), f"{manifest['metadata']['name']}: {words[1]} does not exist"
        assert config.is_file(), f"{manifest['metadata']['name']}: {words[3]} does not exist"
        commands.append((words[1], config))
    return commands


def _reads_and_writes(script: str, config_path: Path) -> tuple[dict[str, str], list[str]]:
    """The shared paths a job reads (field -> path) and writes, from its validated config."""
    if script == "pipelines/curate.py":
        config = read_config(config_path, CurationConfig)
        reads = {
            "input": config.input,
            "wav2vec.model_path": config.wav2vec.model_path,
            "sync.syncnet_path": config.sync.syncnet_path,
            "asr.model_path": config.asr.model_path,
            "captions.model_path": config.captions.model_path,
        }
        return reads, [config.output]
    if script == "training/train.py":
        config = read_config(config_path, TrainingConfig)
        reads = {
            "data.path": config.data.path,
            "model.model_dir": config.model.model_dir,
            "model.audio_weights": config.model.audio_weights,
        }
        return reads, [config.output, f"{config.output}/{EXPORT_FILE}"]
    raise AssertionError(f"no rule for what {script} reads and writes")


def test_every_job_reads_what_the_volume_is_given_or_an_earlier_job_writes():
    available = set(PATHS["provided"].values())
    registered_outputs = set(PATHS["written"].values())
    trained_from: dict[str, str] = {}
    for manifest_path in _chain():
        manifest = yaml.safe_load(manifest_path.read_text())
        assert manifest["kind"] == "RayJob", manifest_path.name
        for script, config_path in _commands(manifest):
            reads, writes = _reads_and_writes(script, config_path)
            for field, path in reads.items():
                if path is None:
                    continue
                assert path in available, (
                    f"{manifest_path.name}: {config_path.name}: {field} reads {path}, which neither the shared volume "
                    f"is given nor an earlier job writes"
                )
            assert writes[0] in registered_outputs, f"{config_path.name} writes {writes[0]}, not in cluster_paths.yaml"
            available.update(writes)
            if script == "training/train.py":
                trained_from[config_path.stem] = reads["data.path"]
    assert trained_from == {
        "stage1": PATHS["written"]["corpus_stage1"],
        "stage2": PATHS["written"]["corpus_stage2"],
    }


def test_stage_two_trains_conversations_from_a_corpus_curated_as_conversations():
    stage2 = read_config(REPO / "training/configs/stage2.yaml", TrainingConfig)
    curated = read_config(REPO / "pipelines/configs/cluster-stage2.yaml", CurationConfig)
    assert stage2.data.ai2v_kinds == ["dual"] and curated.default_kind == "dual"
    assert curated.output == stage2.data.path


@pytest.mark.parametrize("manifest_path", _chain(), ids=lambda path: path.name)
def test_every_pod_mounts_the_shared_volume(manifest_path):
    cluster = yaml.safe_load(manifest_path.read_text())["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        claims = {volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName") for volume in pod["volumes"]}
        mounts = {
            mount["mountPath"]: mount["name"] for container in pod["containers"] for mount in container["volumeMounts"]
        }
        assert claims.get(mounts.get(PATHS["mount"])) == PATHS["claim"], f"{manifest_path.name}: a pod lacks the volume"


def test_the_services_database_url_has_its_driver_installed():
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    url = application["args"]["database_url"]
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(url)  # imports the dialect's driver; connects to nothing
    assert engine.dialect.driver == "psycopg"
