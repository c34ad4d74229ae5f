"""benchmarks/gpu.py: its --tiny mode runs every part on the CPU, so the GPU script cannot rot between GPU runs;
its guards keep one failing part or variant from taking the others down; its wheelhouse installs offline."""

import importlib.util
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import gpu  # noqa: E402 - the script's module; importing it imports no third-party package

STEP_ROWS = [
    "two_person/native/eager",
    "plain_wan/native/eager",
    "two_person/_native_math/eager",
    "plain_wan/_native_math/eager",
    "one_person/native/eager",
    "localisation_share/native/eager",
    "two_person/native/compiled",
    "plain_wan/native/compiled",
]
QUANTISED_ROWS = ["two_person/native/int8_weight_only", "two_person/native/fp8_e4m3"]
OFFLOAD_ROWS = ["two_person/native/group_offload"]
FSDP_ROWS = ["two_person/native/fsdp", "two_person/native/fsdp_sequence_parallel"]  # 2 CPU processes on gloo
OTHER_ROWS = [
    "training/slice_step",
    "vae/encode",
    "vae/decode",
    "generation/tiny_end_to_end",
    "memory/full_clip_with_text_encoder",
    "evaluation/clips_per_minute",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    report = tmp_path_factory.mktemp("gpu") / "report.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--json", str(report)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    return done, json.loads(report.read_text()) if report.exists() else None


def test_tiny_mode_measures_every_row_without_an_error(tiny_run):
    done, report = tiny_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["id"]: row for row in report["rows"]}
    # The table's order: steps, then part by part.
    assert list(rows) == STEP_ROWS + QUANTISED_ROWS + OFFLOAD_ROWS + FSDP_ROWS + OTHER_ROWS
    errors = {row_id: row["note"] for row_id, row in rows.items() if row["status"] != "ok"}
    expected = {"two_person/native/fp8_e4m3"}  # fp8 matmuls need a GPU
    if importlib.util.find_spec("torchao") is None:
        expected.add("two_person/native/int8_weight_only")
    assert set(errors) == expected, errors
    assert all(rows[row_id]["status"] == "skipped" for row_id in expected)

    table = done.stdout[done.stdout.index("MultiTalk GPU benchmark") :]
    for row_id in rows:
        assert row_id in table
    assert json.loads(done.stdout.split("GPU_BENCHMARK_JSON ", 1)[1].splitlines()[0]) == report


def test_tiny_mode_figures_are_the_measured_ones(tiny_run):
    _, report = tiny_run
    rows = {row["id"]: row for row in report["rows"]}
    for row_id in STEP_ROWS[:4] + STEP_ROWS[6:]:
        assert rows[row_id]["seconds"] > 0 and rows[row_id]["tflops"] > 0, row_id
        assert rows[row_id]["mfu"] is None  # a CPU has no entry in the peak table
    for row_id in ("two_person/native/eager", "one_person/native/eager", "two_person/native/compiled"):
        ratio = rows[row_id]["values"]["vs_plain"]
        plain = rows[row_id.replace(row_id.split("/")[0], "plain_wan")]
        assert ratio == pytest.approx(rows[row_id]["seconds"] / plain["seconds"])
    # The compiled blocks and the other backend compute the same step as the native eager one.
    assert rows["plain_wan/native/compiled"]["values"]["max_rel_diff_vs_native_eager"] < 1e-2
    assert rows["plain_wan/_native_math/eager"]["values"]["max_rel_diff_vs_native_eager"] < 5e-2
    # Every option row against the bf16 eager step of the same run (no peak memory on a CPU).
    baseline = rows["two_person/native/eager"]["seconds"]
    for row_id in ["two_person/native/compiled", "two_person/native/int8_weight_only", *OFFLOAD_ROWS, *FSDP_ROWS]:
        assert rows[row_id]["values"]["vs_bf16_eager"] == pytest.approx(rows[row_id]["seconds"] / baseline), row_id
        assert "x the bf16 step time" in rows[row_id]["note"]
    for row_id in FSDP_ROWS:
        values = rows[row_id]["values"]
        assert values["ranks"] == 2 and values["rank_weight_gib"] < values["whole_weight_gib"]  # the blocks halved
    share = rows["localisation_share/native/eager"]["values"]
    assert 0 < share["flop_share"] < 1 and share["time_share"] > 0
    training = rows["training/slice_step"]
    assert training["values"]["tokens_per_s"] == pytest.approx(training["values"]["tokens"] / training["seconds"])
    assert rows["generation/tiny_end_to_end"]["values"]["frames"] == 5
    assert 0 < rows["vae/decode"]["values"]["generation_share"] < 1
    evaluation = rows["evaluation/clips_per_minute"]["values"]
    total_s = sum(evaluation["generation_s"]) + sum(evaluation["metrics_s"])
    assert evaluation["clips"] == 2 and evaluation["clips_per_minute"] == pytest.approx(2 / total_s * 60)
    assert evaluation["generation_share"] == pytest.approx(sum(evaluation["generation_s"]) / total_s)
    assert 0 < evaluation["metrics_share"] < 1
    weights = rows["memory/full_clip_with_text_encoder"]["values"]
    assert 30 < weights["transformer_gib"] < 40 and 10 < weights["umT5-XXL_gib"] < 11  # the released sizes


def test_a_failing_part_reports_its_unfinished_rows_and_the_next_part_runs():
    rows: dict[str, gpu.Row] = {}

    def failing(part: gpu.Part) -> None:
        part.plan("a/first", "a/second")
        part.record("a/first", seconds=1.0)
        raise RuntimeError("no kernel image is available")

    gpu.run_part("a", 60.0, failing, rows, grace_s=60.0)
    gpu.run_part("b", 60.0, lambda part: part.record("b/only", seconds=2.0), rows, grace_s=60.0)
    assert [(row.id, row.status) for row in rows.values()] == [
        ("a/first", "ok"),
        ("a/second", "error"),
        ("b/only", "ok"),
    ]
    assert rows["a/second"].note == "RuntimeError: no kernel image is available"


def test_a_failing_variant_is_its_own_error_and_one_past_the_budget_is_skipped():
    part = gpu.Part("p", budget_s=60.0, rows={})
    part.measure("p/broken", lambda: 1 / 0)
    part.measure("p/too_long", lambda: pytest.fail("a variant past the budget must not run"), estimate_s=61.0)
    part.measure("p/fine", lambda: {"seconds": 3.0})
    statuses = {row.id: (row.status, row.note) for row in part.rows.values()}
    assert statuses["p/broken"] == ("error", "ZeroDivisionError: division by zero")
    assert statuses["p/too_long"][0] == "skipped" and "time budget" in statuses["p/too_long"][1]
    assert statuses["p/fine"] == ("ok", "")


@pytest.mark.timeout(120)  # a guard only: the alarm stops the part within a second
def test_a_part_past_its_hard_limit_is_stopped():
    never = threading.Event()  # the part blocks here until the alarm stops it
    rows: dict[str, gpu.Row] = {}

    def hanging(part: gpu.Part) -> None:
        part.plan("h/row")
        never.wait()

    gpu.run_part("h", 0.0, hanging, rows, grace_s=0.2)
    assert rows["h/row"].status == "error"
    assert rows["h/row"].note == "PartStopped: part h ran past its hard limit of 0 s"


def test_the_wheelhouse_installs_offline_into_the_scratch_folder_first_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    with zipfile.ZipFile(wheelhouse / "gpu_bench_probe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("gpu_bench_probe/__init__.py", "VALUE = 42\n")
        info = "gpu_bench_probe-1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-bench-probe\nVersion: 1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    gpu.install_wheelhouse(wheelhouse, tmp_path / "site")
    assert sys.path[0] == str(tmp_path / "site")
    probe = importlib.import_module("gpu_bench_probe")
    assert probe.VALUE == 42 and Path(probe.__file__).is_relative_to(tmp_path / "site")
    sys.modules.pop("gpu_bench_probe")

    with pytest.raises(SystemExit, match="no wheels"):
        gpu.install_wheelhouse(tmp_path / "empty", tmp_path / "site2")
