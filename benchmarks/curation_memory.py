"""Curation memory as inputs grow: peak object-store use and peak driver RSS at 1x, 4x and 16x inputs, on a
simulated cluster (`ray.cluster_utils.Cluster`: a head and a worker node of 2 logical CPUs each, the tasks
and actors on both). Both must stay flat: Ray Data streams the clips (the object store holds the blocks in
flight, not the corpus), the workers write the shards, and the driver only commits them.

Inputs: distinct generated talking videos (multitalk_model.fixtures.corpus, other speech per video, so every clip
id is new), small clips (17 frames) to keep 16x within minutes on 2 cores. Each scale's curation runs in a fresh
driver process (pipelines/curate.py's `run`) that reports its peak RSS (getrusage) and the bytes the corpus sink
keeps per committed clip (its manifest rows, measured on the written manifest); the object store is sampled every
half second from here (Ray's internal memory-info call, the one `ray memory --stats-only` makes). The sink's bytes
per clip are also given as the Python dicts it kept before, for comparison.

    python benchmarks/curation_memory.py [--videos 2] [--duration 2.0] [--scales 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import yaml

CLIP_FRAMES = 17
OBJECT_STORE_BYTES = 256 * 1024**2  # per node: small, so that a store that fills up shows
PAPER_CLIPS = 2000 * 3600 * 25 // 81  # 2K hours of 81-frame clips: the corpus the driver must hold up to


def _deep_size(value: object) -> int:
    """Bytes a Python value holds, containers with their contents (strings and numbers counted once each)."""
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(_deep_size(k) + _deep_size(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return sys.getsizeof(value) + sum(_deep_size(item) for item in value)
    return sys.getsizeof(value)


def drive(config_path: Path, result_path: Path) -> None:
    """One scale's driver (a process of its own): curates, then writes its peak RSS and the sink's bytes per clip."""
    import pyarrow.parquet as pq

    from pipelines.config import load_config
    from pipelines.curate import run
    from pipelines.schema import MANIFEST_FILE
    from pipelines.sink import CorpusSink

    config = load_config(config_path)
    started = time.perf_counter()
    summary = run(config)
    wall_s = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    manifest = pq.read_table(Path(config.output) / MANIFEST_FILE)
    clips = max(1, manifest.num_rows)
    sink = CorpusSink(config.output)  # as the driver holds it at the end of a run: every committed clip
    held = _deep_size(sink.clip_ids) + sum(table.get_total_buffer_size() for table in sink.manifest_tables)
    as_dicts = _deep_size({row["clip_id"]: row for row in manifest.to_pylist()})  # how the sink held them before
    result = {"clips": manifest.num_rows, "peak_rss": peak_rss, "wall_s": wall_s}
    result.update(sink_bytes_per_clip=held / clips, dict_bytes_per_clip=as_dicts / clips)
    result["hours"] = sum(summary["hours_by_kind"].values())
    result_path.write_text(json.dumps(result))


class ObjectStoreSampler(threading.Thread):
    """Samples the cluster's object-store bytes in use until stopped; keeps the peak."""

    def __init__(self, address: str, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        from ray._private.internal_api import get_state_from_address

        self.state = get_state_from_address(address)
        self.interval_s = interval_s
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        from ray._private.internal_api import get_memory_info_reply

        while not self.stopped.is_set():
            used = get_memory_info_reply(self.state).store_stats.object_store_bytes_used
            self.peak = max(self.peak, used)
            self.stopped.wait(self.interval_s)


def _inputs(scratch: Path, count: int, duration_s: float) -> tuple[list[dict], Path]:
    """`count` distinct talking videos and a tiny wav2vec2."""
    from multitalk_model.fixtures.corpus import write_held_out_clips
    from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2

    manifest = write_held_out_clips(scratch / "videos", count=count, duration_s=duration_s)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row.update(path=str(scratch / "videos" / row["path"]), kind="single")
    return rows, build_tiny_wav2vec2(scratch / "wav2vec2")


def _config(scratch: Path, scale: int, rows: list[dict], wav2vec: Path) -> Path:
    (scratch / f"inputs-{scale}x.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "input": str(scratch / f"inputs-{scale}x.jsonl"),
        "output": str(scratch / f"corpus-{scale}x"),
        "clips": {"frame_num": CLIP_FRAMES},
        "faces": {"detect_every": 8, "num_cpus": 0.25},
        "audio": {"min_speech_s": 0.3},
        "speakers": {"min_speaking_s": 0.2},
        "wav2vec": {"model_path": str(wav2vec), "num_cpus": 0.25, "batch_size": 4},
        "shards": {"size": 4},
    }
    path = scratch / f"curation-{scale}x.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=2, help="videos at 1x")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per video")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="input multiples")
    parser.add_argument("--drive", nargs=2, type=Path, help=argparse.SUPPRESS)  # CONFIG RESULT: one scale's driver
    args = parser.parse_args()
    if args.drive:
        drive(*args.drive)
        return

    import ray
    from ray.cluster_utils import Cluster

    scales = sorted(args.scales)
    node = {"num_cpus": 2, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            rows, wav2vec = _inputs(scratch, args.videos * scales[-1], args.duration)
            for scale in scales:
                config = _config(scratch, scale, rows[: args.videos * scale], wav2vec)
                sampler = ObjectStoreSampler(cluster.address)
                sampler.start()
                command = [sys.executable, __file__, "--drive", str(config), str(scratch / f"result-{scale}x.json")]
                env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
                completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
                sampler.stopped.set()
                sampler.join()
                if completed.returncode:
                    sys.exit(f"error: the {scale}x driver failed:\n{completed.stderr[-4000:]}")
                results[scale] = json.loads((scratch / f"result-{scale}x.json").read_text())
                results[scale]["object_store_peak"] = sampler.peak
    finally:
        ray.shutdown()
        cluster.shutdown()

    mib = 1024 * 1024
    inputs = f"{args.videos} videos of {args.duration:.0f} s at 1x"
    print(f"curation memory, MEASURED on a simulated 2-node cluster ({inputs}, {CLIP_FRAMES}-frame clips)")
    print("| inputs | videos | clips | wall | peak object store | peak driver RSS | sink bytes per clip (as dicts) |")
    print("|---|---|---|---|---|---|---|")
    for scale, result in results.items():
        print(
            f"| {scale}x | {args.videos * scale} | {result['clips']} | {result['wall_s']:.0f} s "
            f"| {result['object_store_peak'] / mib:.1f} MiB | {result['peak_rss'] / mib:.0f} MiB "
            f"| {result['sink_bytes_per_clip']:.0f} ({result['dict_bytes_per_clip']:.0f}) |"
        )
    first, last = results[scales[0]], results[scales[-1]]
    for name, key in (("peak object store", "object_store_peak"), ("peak driver RSS", "peak_rss")):
        ratio = last[key] / max(1, first[key])
        verdict = "flat" if ratio < 1.5 else "GROWS"
        print(f"{name}: {scales[-1]}x / {scales[0]}x = {ratio:.2f} ({verdict})")
    gib = PAPER_CLIPS / 1024**3
    print(
        f"EXTRAPOLATED: the sink's manifest rows at 2K hours ({PAPER_CLIPS:,} clips): "
        f"{last['sink_bytes_per_clip'] * gib:.1f} GiB of driver memory ({last['dict_bytes_per_clip'] * gib:.1f} GiB "
        "as Python dicts)"
    )


if __name__ == "__main__":
    main()
