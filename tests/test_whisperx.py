"""whisperx (optional stage 5b): its runtime env comes from the config, a run whose env cannot import whisperx
fails at its start with the reason and without the main process ever importing whisperx, and a whisperx result
(aligned words with speakers, diarization turns) becomes per-person words and turns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.config import WHISPERX_REQUIREMENTS, ConfigError, CurationConfig, load_config
from pipelines.schema import MANIFEST_FILE, SpeakerTurn, Word
from pipelines.stages.whisperx_asr import parse_whisperx, whisperx_runtime_env

REPO = Path(__file__).resolve().parents[1]

# What whisperx 3.8.6 returns for a 3.24 s clip: `align` then `assign_word_speakers` (the numeral "2" has no
# alignable characters, so it has no timing; "you." overlaps no diarization turn, so it has no speaker) ...
RESULT = {
    "segments": [
        {"start": 0.12, "end": 1.5, "text": " Hello there, friend.", "speaker": "SPEAKER_00", "words": [
            {"word": "Hello", "start": 0.12, "end": 0.48, "score": 0.912, "speaker": "SPEAKER_00"},
            {"word": "there,", "start": 0.52, "end": 0.8, "score": 0.874, "speaker": "SPEAKER_00"},
            {"word": "friend.", "start": 0.86, "end": 1.5, "score": 0.79, "speaker": "SPEAKER_00"},
        ]},
        {"start": 1.9, "end": 3.1, "text": " Hi, 2 you.", "speaker": "SPEAKER_01", "words": [
            {"word": "Hi,", "start": 1.9, "end": 2.2, "score": 0.951, "speaker": "SPEAKER_01"},
            {"word": "2"},
            {"word": "you.", "start": 2.62, "end": 2.85, "score": 0.663},
        ]},
    ],
    "word_segments": [],
}  # fmt: skip
# ... and the diarization DataFrame's speaker/start/end records (SPEAKER_02: a voice after the bound speech).
DIARIZATION = [
    {"speaker": "SPEAKER_01", "start": 1.85, "end": 2.5},
    {"speaker": "SPEAKER_00", "start": 0.1, "end": 1.6},
    {"speaker": "SPEAKER_02", "start": 2.9, "end": 3.5},
]


def _config(tmp_path: Path, **asr: object) -> CurationConfig:
    for name in ("whisper", "align", "diarization", "wav2vec"):
        (tmp_path / name).mkdir(exist_ok=True)
    config = {
        "input": str(tmp_path / "videos"),
        "output": str(tmp_path / "out"),
        "local_num_cpus": 1,
        "wav2vec": {"model_path": str(tmp_path / "wav2vec")},
        "asr": {
            "whisperx": True,
            "model_path": str(tmp_path / "whisper"),
            "language": "en",
            "whisperx_align_model_path": str(tmp_path / "align"),
            "whisperx_diarization_path": str(tmp_path / "diarization"),
            **asr,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return load_config(tmp_path / "config.yaml")


def test_result_becomes_per_person_words_and_turns():
    masks = np.zeros((2, 81), dtype=bool)
    masks[1, :40] = True  # the right person speaks first (0 - 1.6 s) ...
    masks[0, 46:63] = True  # ... then the left one (1.84 - 2.52 s)

    words, turns = parse_whisperx(RESULT, DIARIZATION, masks, num_frames=81)

    assert [(word["word"], word["person"]) for word in words] == [
        ("Hello", 1), ("there,", 1), ("friend.", 1), ("Hi,", 0), ("you.", None)
    ]  # fmt: skip
    assert words[0] == {"word": "Hello", "start_s": 0.12, "end_s": 0.48, "probability": 0.912, "person": 1}
    assert [(turn["speaker"], turn["person"], turn["start_s"], turn["end_s"]) for turn in turns] == [
        ("SPEAKER_00", 1, 0.1, 1.6), ("SPEAKER_01", 0, 1.85, 2.5), ("SPEAKER_02", None, 2.9, 3.24)
    ]  # fmt: skip
    assert [Word(**word).model_dump() for word in words] == words  # valid sample metadata
    assert [SpeakerTurn(**turn).model_dump() for turn in turns] == turns


def test_runtime_env_is_a_pinned_pip_env_or_a_prepared_python(tmp_path):
    pip_env = whisperx_runtime_env(_config(tmp_path).asr)
    python_env = whisperx_runtime_env(
        _config(tmp_path, whisperx_python="/opt/whisperx/bin/python", whisperx_setup_timeout_s=60).asr
    )

    assert pip_env["pip"]["packages"] == list(WHISPERX_REQUIREMENTS)
    assert all("==" in requirement for requirement in pip_env["pip"]["packages"])
    assert "py_executable" not in pip_env
    assert python_env["py_executable"] == "/opt/whisperx/bin/python" and "pip" not in python_env
    assert python_env["config"] == {"setup_timeout_seconds": 60}
    for env in (pip_env, python_env):  # models come from local paths only
        assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(
    ("asr", "message"),
    [
        ({"whisperx_align_model_path": None}, "asr.whisperx_align_model_path: required with asr.whisperx"),
        ({"language": None}, "asr.language: required with asr.whisperx"),
        ({"whisperx_python": "venv/bin/python"}, "asr.whisperx_python: venv/bin/python must be an absolute path"),
    ],
)
def test_whisperx_config_fails_naming_the_field(tmp_path, asr, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **asr)


@pytest.mark.slow
def test_run_fails_at_start_when_its_env_cannot_import_whisperx(tmp_path):
    # The main environment itself as whisperx's "prepared venv": a real env that starts but has no whisperx.
    _config(tmp_path, whisperx_python=sys.executable)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # an embedded local Ray
    command = [sys.executable, "-c", _RUN_AND_LIST_MODULES, str(tmp_path / "config.yaml")]

    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    assert process.returncode == 1, process.stderr[-3000:]
    outcome = json.loads(next(line for line in process.stdout.splitlines() if line.startswith("OUTCOME "))[8:])
    assert "cannot import whisperx: ModuleNotFoundError" in outcome["error"]
    assert sys.executable in outcome["error"]
    assert not outcome["whisperx_imported"]
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()  # stopped before any clip


# The CLI's main() in a fresh interpreter; then its error line and whether whisperx was ever imported there.
_RUN_AND_LIST_MODULES = """
import contextlib, io, json, sys
from pipelines.curate import main
stderr, code = io.StringIO(), 0
with contextlib.redirect_stderr(stderr):
    try:
        main(["--config", sys.argv[1]])
    except SystemExit as exit:
        code = exit.code
errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
print("OUTCOME", json.dumps({"error": " ".join(errors), "whisperx_imported": "whisperx" in sys.modules}))
sys.exit(code)
"""
