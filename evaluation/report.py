"""HTML report pages, one self-contained file each (plots and frame strips inline as PNG): the evaluation report
(a table per model with bootstrap intervals, differences between models, plots, per-clip strips of the ground
truth beside each model's video, worst clips first) and the building blocks curation's report uses too."""

from __future__ import annotations

import base64
import html
import io
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, on headless workers
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from evaluation.stats import better_direction  # noqa: E402
from multitalk_model.media import probe_media, read_video_frames  # noqa: E402

STRIP_FRAMES = 4
STRIP_HEIGHT = 64
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: middle; }
th { background: #f3f3f3; } td.text { text-align: left; }
.better { color: #1a7f37; } .worse { color: #b42318; }
img { margin: 2px; }
"""


class Page:
    """An HTML page assembled section by section."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, anchor: str | None = None) -> None:
        anchor_attr = f' id="{html.escape(anchor)}"' if anchor else ""
        self.parts.append(f"<h2{anchor_attr}>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def raw(self, markup: str) -> None:
        """Markup built by this module's helpers (escaped where it holds data)."""
        self.parts.append(markup)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """A table; cells are formatted by `cell` (numbers rounded, text escaped, markup from `Markup` as is)."""
        head = "".join(f"<th>{html.escape(str(name))}</th>" for name in header)
        body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figure(self, figure: plt.Figure, alt: str = "plot") -> None:
        self.parts.append(png_tag(figure_png(figure), alt))

    def render(self) -> str:
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(self.parts)}</body></html>"
        )


class Markup(str):
    """A table cell that is already HTML."""


def cell(value: object) -> str:
    if isinstance(value, Markup):
        return f"<td>{value}</td>"
    if isinstance(value, float):
        return f"<td>{format_number(value)}</td>"
    if isinstance(value, int | np.integer):
        return f"<td>{value}</td>"
    return f"<td class='text'>{html.escape('' if value is None else str(value))}</td>"


def format_number(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def figure_png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def image_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_tag(png: bytes, alt: str) -> Markup:
    return Markup(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def frame_strip(
    video: str | Path | bytes,
    count: int = STRIP_FRAMES,
    height: int = STRIP_HEIGHT,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> np.ndarray:
    """`count` frames spread over a video (a path or mp4 bytes), or over its window from `start_s` for `duration_s`,
    scaled to `height` and laid side by side."""
    if isinstance(video, bytes):
        with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
            file.write(video)
            file.flush()
            return frame_strip(file.name, count, height, start_s, duration_s)
    if duration_s is None:
        duration_s = probe_media(video).duration_s - start_s
    # Sampling at count / duration fps keeps `count` frames spread evenly; only those are converted to RGB.
    frames = read_video_frames(video, fps=count / max(duration_s, 1e-3), start_s=start_s)[:count]
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    scaled = [cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in frames]
    return np.concatenate(scaled, axis=1)


def strip_tag(video: str | Path | bytes, alt: str, start_s: float = 0.0, duration_s: float | None = None) -> Markup:
    """An <img> of the video's frame strip, or a note when the video cannot be decoded."""
    try:
        return png_tag(image_png(frame_strip(video, start_s=start_s, duration_s=duration_s)), alt)
    except (ValueError, OSError) as error:
        return Markup(f"<span>cannot show: {html.escape(str(error))}</span>")


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(5, max(1.6, 0.35 * len(labels) + 0.8)))
    axes.barh(list(labels) or ["none"], list(values) or [0], color="#e1812c")
    axes.invert_yaxis()
    axes.set(title=title, xlabel=xlabel)
    return figure


def histogram(values: Sequence[float | None], title: str, xlabel: str) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(5, 3))
    # Rounded: values equal up to float noise (clips of one length) would ask numpy for bins narrower than that noise.
    finite = [round(v, 6) for v in values if v is not None and math.isfinite(v)]
    axes.hist(finite or [0], bins=20, color="#3274a1")
    axes.set(title=title, xlabel=xlabel, ylabel="clips")
    return figure


# ----------------------------------------------------------------------------------------- the evaluation report


def _interval(estimate: dict) -> str:
    if not estimate or not estimate.get("n"):
        return "–"
    mean, low, high = estimate["mean"], estimate["ci_low"], estimate["ci_high"]
    return f"{format_number(mean)} [{format_number(low)}, {format_number(high)}]"


def _difference_cell(metric: str, estimate: dict) -> Markup:
    """B - A with its interval, green when the interval says B is better, red when it says B is worse."""
    text = html.escape(_interval(estimate))
    direction = better_direction(metric)
    if not estimate or not estimate.get("n") or direction == 0:
        return Markup(text)
    low, high = sorted((estimate["ci_low"] * direction, estimate["ci_high"] * direction))
    if low > 0:
        return Markup(f"<span class='better'>{text}</span>")
    if high < 0:
        return Markup(f"<span class='worse'>{text}</span>")
    return Markup(text)


def _metric_plot(metric: str, models: list[str], rows: list[dict], summary: dict) -> plt.Figure:
    """Per-clip values of one metric for every model, with each model's mean and interval."""
    figure, axes = plt.subplots(figsize=(4.5, 2.6))
    for index, model in enumerate(models):
        values = [row[metric] for row in rows if row["model"] == model and _finite(row.get(metric))]
        axes.scatter(np.full(len(values), index) + np.linspace(-0.15, 0.15, len(values)), values, s=10, alpha=0.6)
        estimate = summary["models"][model]["metrics"].get(metric)
        if estimate and estimate["n"]:
            mean = estimate["mean"]
            error = [[mean - estimate["ci_low"]], [estimate["ci_high"] - mean]]
            axes.errorbar([index + 0.3], [mean], yerr=error, fmt="o", color="black", capsize=3)
    axes.set_xticks(range(len(models)), models, rotation=20, fontsize=8)
    direction = {1: "higher is better", -1: "lower is better", 0: ""}[better_direction(metric)]
    axes.set_title(f"{metric} {f'({direction})' if direction else ''}", fontsize=9)
    return figure


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def worst_first(rows: list[dict], metric: str) -> list[str]:
    """Clip ids ordered by their worst value of `metric` over the models, worst first (clips without it last)."""
    direction = better_direction(metric) or 1
    worst: dict[str, float] = {}
    for row in rows:
        value = row.get(metric)
        key = row["clip_id"]
        worst.setdefault(key, math.inf)
        if _finite(value):
            worst[key] = min(worst[key], value * direction)
    return sorted(worst, key=lambda key: worst[key])


def _set_metrics_section(page: Page, results: dict, models: list[str]) -> None:
    """FID / FVD per model, or why a model has none (a network not configured, no ground truth)."""
    page.heading("Set-level metrics (lower is better)")
    page.text(
        f"Frechet distances of each model's videos to the {results['ground_truth_clips']} ground-truth clips, "
        f"first {results['clip_frames']} frames of each: one number per model, no interval."
    )
    metrics = [metric for metric in ("fid", "fvd") if metric in results]
    rows = [
        [model, *(results[m]["values"].get(model, results[m]["missing"].get(model, "")) for m in metrics)]
        for model in models
    ]
    page.table(["model", *(metric.upper() for metric in metrics)], rows)


def evaluation_report(rows: list[dict], summary: dict, max_clips: int = 50) -> str:
    """report.html of an evaluation: `rows` are metrics.parquet's (one per clip and model), `summary` summary.json."""
    models = list(summary["models"])
    metrics = summary["metrics"]
    page = Page("Evaluation report")
    protocol = ", ".join(f"{key} {value}" for key, value in summary["protocol"].items())
    page.text(f"{summary['clips']} clips of {summary['test_set']}; protocol: {protocol}.")
    page.text(
        f"Means over clips with {summary['confidence']:.0%} bootstrap intervals ({summary['bootstrap_samples']} "
        "resamples of the clips); differences are paired by clip. Green: the interval says better, red: worse."
    )

    page.heading("Metrics per model")
    header = ["model", "clips", *metrics]
    table = [
        [
            model,
            summary["models"][model]["clips"],
            *(_interval(summary["models"][model]["metrics"].get(m)) for m in metrics),
        ]
        for model in models
    ]
    page.table(header, table)
    if "set_metrics" in summary:
        _set_metrics_section(page, summary["set_metrics"], models)

    if summary["differences"]:
        page.heading("Differences between models (B - A)")
        page.table(
            ["A", "B", *metrics],
            [
                [item["a"], item["b"], *(_difference_cell(m, item["metrics"].get(m, {})) for m in metrics)]
                for item in summary["differences"]
            ],
        )

    page.heading("Plots")
    for metric in metrics:
        page.figure(_metric_plot(metric, models, rows, summary), alt=metric)

    page.heading("Worst clips per metric")
    worst_lines = []
    for metric in (metric for metric in metrics if better_direction(metric)):
        ids = worst_first(rows, metric)[:5]
        links = ", ".join(f"<a href='#clip-{html.escape(key)}'>{html.escape(key)}</a>" for key in ids)
        worst_lines.append(f"<li>{html.escape(metric)}: {links}</li>")
    page.raw(f"<ul>{''.join(worst_lines)}</ul>")

    primary = summary.get("primary_metric") or (metrics[0] if metrics else None)
    order = worst_first(rows, primary) if primary else sorted({row["clip_id"] for row in rows})
    page.heading(f"Clips, worst {primary} first" if primary else "Clips")
    by_clip: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_clip.setdefault(row["clip_id"], {})[row["model"]] = row
    for key in order[:max_clips]:
        clip_rows = by_clip[key]
        page.raw(f"<h3 id='clip-{html.escape(key)}'>{html.escape(key)}</h3>")
        ground_truth = next((row.get("ground_truth") for row in clip_rows.values() if row.get("ground_truth")), None)
        strips = (
            [["ground truth", "", *([""] * len(metrics)), strip_tag(ground_truth, "ground truth")]]
            if (ground_truth)
            else []
        )
        for model in models:
            row = clip_rows.get(model)
            if row is None:
                continue
            strip = strip_tag(row["video"], model) if row.get("video") else Markup("")
            error = row.get("error") or ""
            strips.append([model, error, *(row.get(m) for m in metrics), strip])
        page.table(["video", "error", *metrics, "frames"], strips)
    if len(order) > max_clips:
        page.text(f"{len(order) - max_clips} more clips in metrics.parquet.")
    return page.render()
