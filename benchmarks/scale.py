"""Scale on paper: time and nodes for the corpus and both training stages, from measured per-clip costs.

Curation: one serial run of the stages (pipelines/curate.py --serial) over a shared talking video is MEASURED (seconds
of each stage per curated video second, on this machine's CPU, the model stages with the tiny random models); the
hours and node counts for 2K hours of single-speaker video, 200K multi-event clips and 100 hours of conversations are
EXTRAPOLATED linearly from it. Training: FLOPs per sample come from multitalk_model/accounting.py (computed exactly
for the 14B preset), steps and batch from training/configs/stage{1,2}.yaml; the MFU is an assumption (--mfu), so
every training figure is EXTRAPOLATED.

    python benchmarks/scale.py [--media DIR] [--node-cpus 64] [--mfu 0.35] [--skip-curation]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import yaml

from multitalk_model.accounting import training_flops, video_tokens
from multitalk_model.config import get_preset

CLIP_S = 81 / 25  # the training clips: 81 frames at 25 fps
GPUS_PER_NODE = 8
CORPORA = {  # name -> curated video seconds
    "2K hours single-speaker": 2000 * 3600,
    "200K multi-event clips": 200_000 * CLIP_S,
    "100 hours conversations": 100 * 3600,
}
TRAINING_LATENT = (21, 80, 80)  # 81 frames at 640 x 640: 33,600 tokens


def measure_curation(media: Path) -> dict[str, float]:
    """MEASURED: seconds of each stage per curated video second, serially in this process, without the stage's
    one-off construction (model loading), timed apart by building each stage once more."""
    from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
    from pipelines.config import load_config
    from pipelines.curate import run
    from pipelines.plan import curation_steps

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        rows = [{"path": str(media / "talking_woman_25fps.mp4"), "kind": "single"}]
        (scratch / "inputs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        fields = {"clips": {"frame_num": 81}, "wav2vec": {"model_path": str(build_tiny_wav2vec2(scratch / "w2v"))}}
        (scratch / "config.yaml").write_text(yaml.safe_dump(fields))
        config = load_config(scratch / "config.yaml", input=str(scratch / "inputs.jsonl"), output=str(scratch / "o"))
        seconds: dict[str, float] = {}
        summary = run(config, serial=True, seconds_by_step=seconds)
        for step in curation_steps(config, frozenset()):
            started = time.perf_counter()
            step.stage(**step.kwargs)
            seconds[step.name] = max(0.0, seconds[step.name] - (time.perf_counter() - started))
    curated_s = sum(summary["hours_by_kind"].values()) * 3600
    if not curated_s:
        sys.exit("error: the measured run curated no clip")
    return {name: spent / curated_s for name, spent in seconds.items()}


def curation_table(per_video_s: dict[str, float], node_cpus: int) -> None:
    total = sum(per_video_s.values())
    print("curation, MEASURED: CPU seconds per curated video second (serial, model loading excluded; the model")
    print("  stages ran the tiny random models on CPU: their GPU cost is not measured here)")
    for name, cost in per_video_s.items():
        print(f"  {name:12s} {cost:8.3f}")
    print(f"  {'all':12s} {total:8.3f}")
    print(f"curation, EXTRAPOLATED linearly: CPU-hours and hours on nodes of {node_cpus} CPUs")
    for corpus, video_s in CORPORA.items():
        cpu_h = total * video_s / 3600
        hours = "  ".join(f"{nodes} nodes {cpu_h / (nodes * node_cpus):7.1f} h" for nodes in (1, 4, 16))
        print(f"  {corpus:26s} {cpu_h:10.0f} CPU-h   {hours}")


def training_table(mfu: float) -> None:
    print(f"training, EXTRAPOLATED at MFU {mfu:.2f} (FLOPs per sample computed by multitalk_model/accounting.py)")
    for stage, persons in (("stage1", 1), ("stage2", 2)):
        config = yaml.safe_load((REPO / "training" / "configs" / f"{stage}.yaml").read_text())
        architecture = get_preset(config["model"]["preset"])
        flops = training_flops(architecture, TRAINING_LATENT, persons)
        schedule = config["schedule"]
        samples = schedule["max_steps"] * schedule["global_batch_size"]
        gpu_s = samples * flops / (config["metrics"]["peak_tflops"] * 1e12 * mfu)
        tokens = video_tokens(architecture, TRAINING_LATENT)
        print(
            f"  {stage}: {flops / 1e15:.2f} PFLOP per {tokens}-token sample x {samples} samples "
            f"({schedule['max_steps']} steps x {schedule['global_batch_size']}) = {gpu_s / 3600:.0f} GPU-h"
        )
        print("    " + "  ".join(f"{n} x 8 H800: {gpu_s / (n * GPUS_PER_NODE) / 3600:6.1f} h" for n in (1, 4, 8, 16)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--media", type=Path, default=REPO.parent / "shared" / "media", help="shared media folder")
    parser.add_argument("--node-cpus", type=int, default=64, help="CPUs of one curation node")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation of training")
    parser.add_argument("--skip-curation", action="store_true", help="print the training table only")
    args = parser.parse_args()
    if not args.skip_curation:
        if not args.media.is_dir():
            sys.exit(f"error: no shared media at {args.media} (pass --media DIR or --skip-curation)")
        curation_table(measure_curation(args.media), args.node_cpus)
    training_table(args.mfu)


if __name__ == "__main__":
    main()
