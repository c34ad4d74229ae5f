"""report.html and summary.json of a curation run, drawn with the evaluation report's page code: the yield funnel
(inputs -> windows -> kept, rejects by stage and reason), strips of frames of sample kept and rejected clips with
their scores and reason, worker time per stage, the corpus hours by kind, and the held-out split."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pyarrow as pa

from evaluation.report import Page, bar_chart, histogram, strip_tag
from pipelines.schema import MP4_KEY, REPORT_FILE, SUMMARY_FILE, Scores
from pipelines.storage import local_copy, resolve
from platform_common.storage import write_atomically

SAMPLE_CLIPS = 4  # kept and rejected clips shown with a strip of frames


def _hours_by_kind(rows: list[dict]) -> dict[str, float]:
    hours: Counter[str] = Counter()
    for row in rows:
        hours[row["kind"]] += (row["end_s"] - row["start_s"]) / 3600
    return {kind: round(value, 4) for kind, value in hours.items()}


def summarize(
    manifest: pa.Table,
    rejects: pa.Table,
    stage_seconds: dict[str, float] | None = None,
    test_manifest: pa.Table | None = None,
    inputs: int | None = None,
) -> dict:
    """Counts and hours per kind, the funnel, rejects by reason and by stage, worker seconds per stage."""
    rows, reject_rows = manifest.to_pylist(), rejects.to_pylist()
    test_rows = test_manifest.to_pylist() if test_manifest is not None else []
    rejected_inputs = len({row["input"] for row in reject_rows if row["clip_id"] is None})
    clip_rejects = sum(1 for row in reject_rows if row["clip_id"] is not None)
    summary = {
        "clips": len(rows),
        "clips_by_kind": dict(Counter(row["kind"] for row in rows)),
        "hours_by_kind": _hours_by_kind(rows),
        "shards": len({row["shard"] for row in rows}),
        "rejects": rejects.num_rows,
        "rejects_by_reason": dict(Counter(row["reason"] for row in reject_rows)),
        "rejects_by_stage": dict(Counter(row["stage"] for row in reject_rows)),
        "rejected_inputs": rejected_inputs,
        "funnel": {
            "inputs": inputs,
            "inputs_with_windows": None if inputs is None else inputs - rejected_inputs,
            "windows": len(rows) + len(test_rows) + clip_rejects,
            "kept": len(rows) + len(test_rows),
        },
        "stage_seconds": {stage: round(value, 3) for stage, value in (stage_seconds or {}).items()},
    }
    if test_manifest is not None:
        summary["test_clips"] = len(test_rows)
        summary["test_hours_by_kind"] = _hours_by_kind(test_rows)
        summary["test_sources"] = len({row["source_hash"] for row in test_rows})
    return summary


def _kept_samples(output: str, rows: list[dict]) -> list[tuple[dict, bytes]]:
    """The first clips of the manifest with their mp4 bytes (read from their shards)."""
    fs, root = resolve(output)
    chosen = rows[:SAMPLE_CLIPS]
    samples = []
    for shard in sorted({row["shard"] for row in chosen}):
        with fs.open_input_stream(f"{root}/{shard}") as stream, tarfile.open(fileobj=io.BytesIO(stream.read())) as tar:
            for row in chosen:
                if row["shard"] == shard:
                    samples.append((row, tar.extractfile(f"{row['clip_id']}.{MP4_KEY}").read()))
    return samples


def _kept_section(page: Page, output: str, rows: list[dict]) -> None:
    scores = list(Scores.model_fields)
    table = []
    for row, mp4 in _kept_samples(output, rows):
        values = [row[name] for name in scores]
        table.append([row["clip_id"], row["kind"], *values, strip_tag(mp4, row["clip_id"])])
    page.table(["clip", "kind", *scores, "frames"], table)


def _rejected_section(page: Page, reject_rows: list[dict]) -> None:
    """A few rejected windows per reason (their frames come from the source), and rejected inputs."""
    table, shown = [], Counter()
    for row in reject_rows:
        reason = row["reason"]
        if shown[reason] >= 2 or len(table) >= 2 * SAMPLE_CLIPS:
            continue
        shown[reason] += 1
        if row["clip_id"] is None:
            frames = "(whole input)"
        else:
            duration = row["end_s"] - row["start_s"]
            frames = strip_tag(str(local_copy(row["input"])), row["clip_id"], row["start_s"], duration)
        window = f"{row['start_s']:.2f}-{row['end_s']:.2f} s" if row["clip_id"] else ""
        table.append([row["input"].rsplit("/", 1)[-1], window, row["stage"], reason, row["detail"], frames])
    page.table(["input", "window", "stage", "reason", "detail", "frames"], table)


def write_report(
    output: str,
    manifest: pa.Table,
    rejects: pa.Table,
    stage_seconds: dict[str, float] | None = None,
    test_manifest: pa.Table | None = None,
    inputs: int | None = None,
) -> dict:
    """Write report.html and summary.json into the output folder; return the summary."""
    summary = summarize(manifest, rejects, stage_seconds, test_manifest, inputs)
    rows, reject_rows = manifest.to_pylist(), rejects.to_pylist()
    page = Page("Curation report")

    page.heading("Yield")
    funnel = summary["funnel"]
    page.table(["step", "count"], [[name.replace("_", " "), value] for name, value in funnel.items()])
    by_stage_reason = Counter((row["stage"], row["reason"]) for row in reject_rows)
    page.table(["stage", "reason", "rejects"], [[*key, count] for key, count in sorted(by_stage_reason.items())])
    page.figure(bar_chart(list(summary["rejects_by_reason"]), list(summary["rejects_by_reason"].values()),
                          "rejects by reason", "count"))  # fmt: skip

    page.heading("Corpus")
    hours = summary["hours_by_kind"]
    page.table(
        ["kind", "clips", "hours"], [[kind, summary["clips_by_kind"][kind], hours[kind]] for kind in sorted(hours)]
    )
    if test_manifest is not None:
        page.text(
            f"Held-out test split (test/): {summary['test_clips']} clips from {summary['test_sources']} source "
            f"videos, hours by kind {summary['test_hours_by_kind']}; training never reads it."
        )
    page.figure(bar_chart(list(hours), list(hours.values()), "corpus hours by kind", "hours"))
    durations = [row["end_s"] - row["start_s"] for row in rows]
    page.figure(histogram(durations, "clip durations", "seconds"))
    page.figure(histogram([row["face_size"] for row in rows], "face sizes", "face height / clip height"))
    page.figure(histogram([row["sync_confidence"] for row in rows], "sync scores", "lowest person's sync score"))

    if summary["stage_seconds"]:
        page.heading("Worker time per stage")
        seconds = summary["stage_seconds"]
        total = sum(seconds.values()) or 1.0
        page.table(["stage", "seconds", "share"], [[k, v, f"{v / total:.1%}"] for k, v in seconds.items()])
        page.figure(bar_chart(list(seconds), list(seconds.values()), "worker seconds per stage", "seconds"))

    page.heading("Sample kept clips")
    _kept_section(page, output, rows)
    page.heading("Sample rejects")
    _rejected_section(page, reject_rows)

    fs, root = resolve(output)
    write_atomically(fs, f"{root}/{SUMMARY_FILE}", json.dumps(summary, indent=2).encode())
    write_atomically(fs, f"{root}/{REPORT_FILE}", page.render().encode())
    return summary
