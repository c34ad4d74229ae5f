"""report.html (plots of durations, face sizes, sync scores and rejects by reason) and summary.json of a run."""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # files only, on headless workers
import matplotlib.pyplot as plt
import pyarrow as pa

from pipelines.schema import REPORT_FILE, SUMMARY_FILE
from pipelines.storage import resolve
from platform_common.storage import write_atomically


def summarize(manifest: pa.Table, rejects: pa.Table) -> dict:
    """Counts and hours per kind, and rejects by reason."""
    rows = manifest.to_pylist()
    hours: Counter[str] = Counter()
    for row in rows:
        hours[row["kind"]] += (row["end_s"] - row["start_s"]) / 3600
    return {
        "clips": len(rows),
        "clips_by_kind": dict(Counter(row["kind"] for row in rows)),
        "hours_by_kind": {kind: round(value, 4) for kind, value in hours.items()},
        "shards": len({row["shard"] for row in rows}),
        "rejects": rejects.num_rows,
        "rejects_by_reason": dict(Counter(rejects.column("reason").to_pylist())),
        "rejected_inputs": len({row["input"] for row in rejects.to_pylist() if row["clip_id"] is None}),
    }


def _histogram(values: list[float], title: str, xlabel: str) -> str:
    figure, axes = plt.subplots(figsize=(5, 3))
    # Rounded: values equal up to float noise (clips of one length) would ask numpy for bins narrower than that noise.
    axes.hist([round(v, 6) for v in values if v is not None] or [0], bins=20, color="#3274a1")
    axes.set(title=title, xlabel=xlabel, ylabel="clips")
    return _png(figure)


def _bars(counts: dict[str, int], title: str) -> str:
    figure, axes = plt.subplots(figsize=(5, 3))
    axes.barh(list(counts) or ["none"], list(counts.values()) or [0], color="#e1812c")
    axes.set(title=title, xlabel="count")
    return _png(figure)


def _png(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def write_report(output: str, manifest: pa.Table, rejects: pa.Table) -> dict:
    """Write report.html and summary.json into the output folder; return the summary."""
    summary = summarize(manifest, rejects)
    starts, ends = manifest["start_s"].to_pylist(), manifest["end_s"].to_pylist()
    durations = [end - start for start, end in zip(starts, ends, strict=True)]
    plots = [
        _histogram(durations, "clip durations", "seconds"),
        _histogram(manifest["face_size"].to_pylist(), "face sizes", "face height / clip height"),
        _histogram(manifest["sync_confidence"].to_pylist(), "sync scores", "lowest person's sync confidence"),
        _bars(summary["rejects_by_reason"], "rejects by reason"),
    ]
    images = "\n".join(f'<img alt="plot" src="data:image/png;base64,{plot}">' for plot in plots)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Curation report</title></head><body>"
        f"<h1>Curation report</h1><pre>{html.escape(json.dumps(summary, indent=2))}</pre>{images}</body></html>"
    )
    fs, root = resolve(output)
    write_atomically(fs, f"{root}/{SUMMARY_FILE}", json.dumps(summary, indent=2).encode())
    write_atomically(fs, f"{root}/{REPORT_FILE}", page.encode())
    return summary
