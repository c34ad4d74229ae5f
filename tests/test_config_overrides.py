"""`--set key.sub=value` on the curation and training entry points: validated like the file, an unknown key or a bad
value fails at start naming it, and the resolved config a run uses is written beside its output."""

import pytest
import yaml

from pipelines import curate
from pipelines.config import CurationConfig
from pipelines.config import load_config as load_curation_config
from platform_common.config import ConfigError, parse_sets, read_config, write_resolved_config
from training import train
from training.config import TrainingConfig
from training.config import load_config as load_training_config

TRAINING_CONFIG = "training/configs/tiny-cpu.yaml"
CURATION_CONFIG = "pipelines/configs/demo.yaml"


def test_set_values_are_read_as_yaml_and_malformed_ones_are_named():
    parsed = parse_sets(["data.i2v_ratio=0", "model.activation_checkpointing=false", "data.ai2v_kinds=[a, b]", "x=a=b"])
    assert parsed == {
        "data.i2v_ratio": 0,
        "model.activation_checkpointing": False,
        "data.ai2v_kinds": ["a", "b"],
        "x": "a=b",
    }
    for bad, message in [
        ("data.i2v_ratio", "expected KEY.SUB=VALUE"),
        ("data..x=1", "expected KEY.SUB=VALUE"),
        ("x=[1,", "not valid YAML"),
        ("x=null", "null cannot be set"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_sets([bad])


@pytest.fixture
def training_dirs(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    return {"data": str(tmp_path / "data"), "output": str(tmp_path / "out")}


def test_training_overrides_replace_fields_and_flags_win_over_them(training_dirs, tmp_path):
    model_dir = f"model.model_dir={tmp_path / 'model'}"
    sets = parse_sets(["data.i2v_ratio=0", "optimizer.lr=2e-5", model_dir, "output=/elsewhere"])
    config = load_training_config(TRAINING_CONFIG, **training_dirs, sets=sets)
    assert config.data.i2v_ratio == 0 and config.optimizer.lr == 2e-5  # YAML reads 2e-5 as text; the field a float
    assert config.model.model_dir == str(tmp_path / "model")
    assert config.output == training_dirs["output"]  # --output beats --set output=...


def test_an_unknown_key_or_a_bad_value_fails_naming_it(training_dirs, tmp_path, capsys):
    model = f"model.model_dir={tmp_path / 'model'}"
    with pytest.raises(ConfigError, match=r"data\.i2v_ratios: Extra inputs are not permitted"):
        load_training_config(TRAINING_CONFIG, **training_dirs, sets=parse_sets([model, "data.i2v_ratios=0"]))
    with pytest.raises(ConfigError, match=r"data\.i2v_ratio: Input should be less than 1"):
        load_training_config(TRAINING_CONFIG, **training_dirs, sets=parse_sets([model, "data.i2v_ratio=2"]))

    arguments = ["--config", TRAINING_CONFIG, "--data", training_dirs["data"], "--set", "optimiser.lr=1"]
    with pytest.raises(SystemExit) as exit_training:
        train.main(arguments)
    with pytest.raises(SystemExit) as exit_curation:
        curate.main(["--config", CURATION_CONFIG, "--set", "clips.frame_num=80"])
    assert exit_training.value.code == exit_curation.value.code == 2
    errors = capsys.readouterr().err
    assert "optimiser: Extra inputs are not permitted" in errors and "clips.frame_num" in errors


def test_the_resolved_config_is_written_beside_the_output_and_reads_back_the_same(training_dirs, tmp_path):
    sets = parse_sets(["data.i2v_ratio=0", f"model.model_dir={tmp_path / 'model'}"])
    config = load_training_config(TRAINING_CONFIG, **training_dirs, sets=sets)
    written = write_resolved_config(config, config.output)
    assert written == f"{config.output}/resolved_config.yaml"
    assert yaml.safe_load(open(written))["data"]["i2v_ratio"] == 0
    assert read_config(written, TrainingConfig) == config

    curation = tmp_path / "curation"
    wav2vec = tmp_path / "wav2vec"
    wav2vec.mkdir()
    sets = parse_sets([f"output={curation}", f"wav2vec.model_path={wav2vec}", "shards.size=3"])
    config = load_curation_config(CURATION_CONFIG, sets)
    assert read_config(write_resolved_config(config, config.output), CurationConfig) == config
    assert config.shards.size == 3
