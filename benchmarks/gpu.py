"""Every GPU path of the platform measured in one command, in under 8 minutes, with random weights.

    python3 benchmarks/gpu.py --wheelhouse benchmarks/wheelhouse [--json gpu.json]   # a bare GPU machine
    python benchmarks/gpu.py --tiny                                                  # CPU, small shapes (a test)

Parts, each in its own guarded section with its own time budget (a part that fails prints its error in its rows
and the next part goes on; a variant that does not fit the budget left is marked skipped):
  transformer  the 480p two-person denoising step of the 14B transformer (3 guidance passes batched) against the
               plain diffusers WanTransformer3DModel step on the same weights, per attention backend, with and
               without torch.compile of the blocks, quantised through torchao (int8; fp8 on cards of compute
               8.9+), with diffusers' block-level group offloading; the one-person step; the share of the person
               localisation
  fsdp         the two-person step with the blocks sharded by FSDP2 over every GPU present (one process each),
               alone and with sequence parallel (one GPU: the rows say they need two)
  training     a training step of a 4-block slice of the 14B config (benchmarks/training.py --gpu-slice)
  vae          encode and decode of one 81-frame 480p clip with the Wan2.1 VAE
  generation   the generation pipeline end to end with the tiny model directory, in bf16
  memory       whether a full 81-frame 480p clip fits on the card with the text encoder resident
  evaluation   the evaluation job's per-clip work (generate a held-out clip, score it) with the 14B transformer at
               480p under the fast profile: clips per minute and the generation vs metrics share
The rows of the options (compile, int8, fp8, group offload, FSDP) give their s/step and peak memory as ratios to the
bf16 eager two-person step of the same run. The table comes last, as one block and as one JSON line;
benchmarks/README.md explains each row and the targets.

Weights are random (bf16, made on the device: nothing is downloaded or loaded). The script runs from a checkout
without installing the project: a bare machine needs only Python, torch and the wheelhouse that
benchmarks/gpu_wheels.sh prepares, which `--wheelhouse` installs into a scratch folder before anything imports it.
Each part imports what it needs when it runs, so a missing module fails that part only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

STARTED = time.monotonic()

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a part of the CUDA device name; the first match wins, so
# the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
)
TARGETS = {"two_person_mfu": 0.65, "two_person_vs_plain": 1.2, "training_mfu": 0.40}
# diffusers attention backends to try on a GPU, most likely first: PyTorch's SDPA as it picks (native), its cuDNN,
# flash and memory-efficient kernels, then kernels from their own packages, if installed.
GPU_ATTENTION_BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "flash",
    "_flash_3",
    "sage",
    "xformers",
)

# Wan2.1's VAE (vae/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers).
WAN21_VAE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
# The encoders a generation keeps beside the transformer, at the sizes of the released ones.
UMT5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 256384}
CLIP_VIT_H14 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16}
CLIP_VIT_H14 |= {"image_size": 224, "patch_size": 14}


def device_peak_tflops() -> tuple[str, float | None]:
    """The CUDA device's name and dense bf16 peak (None when unknown or without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((peak for part, peak in PEAK_BF16_TFLOPS if part in name), None)


def install_wheelhouse(wheelhouse: Path, site: Path) -> None:
    """Installs every wheel of `wheelhouse` into `site` (no index, no dependencies) and puts it first on sys.path."""
    wheels = sorted(str(path) for path in wheelhouse.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{wheelhouse}: no wheels (benchmarks/gpu_wheels.sh prepares them)")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    command += ["--disable-pip-version-check", "--root-user-action=ignore", "--no-cache-dir", "--upgrade"]
    command += ["--target", str(site), *wheels]
    subprocess.run(command, check=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()


# ------------------------------------------------------------------------------------------------ rows and parts


@dataclasses.dataclass
class Row:
    id: str
    part: str
    status: str = "pending"  # ok | skipped | error (pending: planned, not reached)
    seconds: float | None = None  # s/step for steps, wall time otherwise
    tflops: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    note: str = ""
    values: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the note says, machine-readable


class PartStopped(BaseException):
    """Raised by the alarm when a part runs past its hard limit (not an Exception: variants do not catch it)."""


class Part:
    """One guarded section: planned rows, a soft budget variants check, and a hard limit an alarm enforces."""

    def __init__(self, name: str, budget_s: float, rows: dict[str, Row]) -> None:
        self.name = name
        self.budget_s = budget_s
        self.deadline = time.monotonic() + budget_s
        self.rows = rows

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def plan(self, *row_ids: str) -> None:
        for row_id in row_ids:
            self.rows.setdefault(row_id, Row(row_id, self.name))

    def record(self, row_id: str, status: str = "ok", **fields: Any) -> Row:
        row = self.rows.setdefault(row_id, Row(row_id, self.name))
        row.status = status
        for key, value in fields.items():
            setattr(row, key, value)
        _print_progress(row)
        return row

    def measure(self, row_id: str, run: Callable[[], dict[str, Any]], estimate_s: float = 0.0) -> Row:
        """Runs one variant if the budget left allows its estimated cost; its failure is its row's error."""
        if estimate_s > self.left():
            return self.record(
                row_id, "skipped", note=f"time budget: needs ~{estimate_s:.0f} s, {self.left():.0f} s left"
            )
        try:
            return self.record(row_id, **run())
        except Exception as error:  # noqa: BLE001 - any failure of one variant is reported in its row
            traceback.print_exc()
            return self.record(row_id, "error", note=describe(error))
        finally:
            free_memory()


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 240 else text[:237] + "..."


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_part(name: str, budget_s: float, body: Callable[[Part], None], rows: dict[str, Row], grace_s: float) -> None:
    """Runs a part; an exception or the hard limit (budget + grace) ends it, its unfinished rows get the error."""
    part = Part(name, max(budget_s, 0.0), rows)
    print(f"[{elapsed():6.1f} s] part {name}: budget {budget_s:.0f} s", flush=True)
    failure = None

    def stop(signum, frame):
        raise PartStopped(f"part {name} ran past its hard limit of {budget_s + grace_s:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(budget_s, 0.0) + grace_s)
    try:
        body(part)
    except (Exception, PartStopped) as error:  # noqa: BLE001 - a part's failure is reported, the others go on
        traceback.print_exc()
        failure = describe(error)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for row in rows.values():
        if row.part == name and row.status == "pending":
            row.status, row.note = "error", failure or "the part ended without measuring this row"
            _print_progress(row)
    import torch

    torch._dynamo.reset()  # compiled code holds on to the modules (and weights) it was compiled for
    free_memory()


def elapsed() -> float:
    return time.monotonic() - STARTED


def _print_progress(row: Row) -> None:
    figures = ", ".join(
        text
        for text in (
            f"{row.seconds:.4g} s" if row.seconds is not None else "",
            f"{row.tflops:.1f} TFLOP/s" if row.tflops is not None else "",
            f"MFU {row.mfu:.1%}" if row.mfu is not None else "",
            f"peak {row.peak_gib:.1f} GiB" if row.peak_gib is not None else "",
        )
        if text
    )
    print(f"[{elapsed():6.1f} s] {row.id}: {row.status} {figures} {row.note}".rstrip(), flush=True)


# -------------------------------------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of every part: the real ones on a GPU, small ones for --tiny."""

    preset: str  # transformer configuration of the steps
    frames: int  # video frames of the clip (4n + 1)
    height: int
    width: int
    warmups: int
    repeats: int  # timed steps of the headline rows (1 for the other variants)
    compile_backend: str  # torch.compile backend of the compiled rows
    attention_backends: tuple[str, ...]  # candidates; the dispatcher says which are available
    slice_layers: int
    slice_frames: int
    slice_size: tuple[int, int]
    vae: dict[str, Any]
    generation_frames: int
    generation_steps: int
    budgets: dict[str, float]  # seconds per part, the transformer part takes what the others leave
    grace_s: float

    @property
    def latent(self) -> tuple[int, int, int]:
        return ((self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)


def gpu_sizes() -> Sizes:
    from multitalk_model.regions import target_size

    height, width = target_size(1, 2, "480p")  # a two-person scene: the 1:2 bucket of the 480p family, 448x896
    return Sizes(
        preset="multitalk-14b",
        frames=81,
        height=height,
        width=width,
        warmups=1,
        repeats=2,
        compile_backend="inductor",
        attention_backends=GPU_ATTENTION_BACKENDS,
        slice_layers=4,
        slice_frames=81,
        slice_size=(640, 640),
        vae=WAN21_VAE,
        generation_frames=21,
        generation_steps=4,
        budgets={"fsdp": 90.0, "training": 40.0, "vae": 50.0, "generation": 45.0, "memory": 15.0, "evaluation": 60.0},
        grace_s=60.0,
    )


def tiny_sizes() -> Sizes:
    return Sizes(
        preset="tiny",
        frames=5,
        height=32,
        width=64,
        warmups=1,
        repeats=1,
        compile_backend="eager",  # Dynamo traces the blocks (graph breaks and all) without minutes of codegen
        attention_backends=("native", "_native_math"),
        slice_layers=2,
        slice_frames=5,
        slice_size=(32, 32),
        vae=WAN21_VAE | {"base_dim": 4},
        generation_frames=5,
        generation_steps=2,
        budgets={
            "fsdp": 180.0,
            "training": 120.0,
            "vae": 120.0,
            "generation": 180.0,
            "memory": 60.0,
            "evaluation": 180.0,
        },
        grace_s=120.0,
    )


# -------------------------------------------------------------------------------------------------- the parts


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def timed_steps(step: Callable[[], Any], warmups: int, repeats: int) -> tuple[float, float, Any]:
    """(seconds of the first call, median seconds of the timed calls, the last output) of a synchronised step."""
    times, output = [], None
    for _ in range(warmups + repeats):
        synchronize()
        started = time.perf_counter()
        output = step()
        synchronize()
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[warmups:]), output


def relative_difference(output, reference) -> float:
    return float((output.float() - reference.float()).abs().max() / reference.float().abs().max())


def transformer_part(part: Part, sizes: Sizes, peak_tflops: float | None, context: dict[str, Any]) -> None:
    """The denoising-step rows. One model at a time on the device: after a variant compiled or quantised it, the
    next gets a fresh one (same seed, same weights), so every row can be compared with the native eager one."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from multitalk_model.accounting import forward_flops, video_tokens
    from multitalk_model.config import get_preset
    from multitalk_model.fixtures.random_model import plain_wan_twin, random_transformer
    from multitalk_model.guidance import GuidanceScales, GuidedDenoiser
    from multitalk_model.localization import region_scores, token_region_masks

    diffusers_logging.set_verbosity_error()  # set_attention_backend warns on every call
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, latent = get_preset(sizes.preset), sizes.latent
    tokens = video_tokens(config, latent)
    two, one = forward_flops(config, latent, 2), forward_flops(config, latent, 1)
    passes = 3  # cond, negative text, negative text + silent audio: one batched forward
    flops = {
        "two_person": passes * two.total,
        "one_person": passes * one.total,
        # The plain model lacks the audio attention and the localisation (its audio adapter's share is < 0.01%).
        "plain_wan": passes * (two.total - two.audio - two.localisation),
    }
    shape = f"{tokens:,} tokens x {passes} passes ({sizes.frames} frames {sizes.height}x{sizes.width})"

    generator = torch.Generator(device).manual_seed(0)

    def noise(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=generator, device=device, dtype=torch.bfloat16)

    t, h, w = latent
    masks = torch.zeros(1, 3, h, w, device=device)  # person regions on the latent grid: two halves, a background
    masks[0, 0, 1:, 1 : w // 2 - 1] = 1
    masks[0, 1, 1:, w // 2 + 1 : -1] = 1
    masks[0, 2] = 1 - masks[0, 0] - masks[0, 1]
    text, negative_text = noise(1, config.text_len, config.text_dim), noise(1, config.text_len, config.text_dim)
    image = noise(1, 257, config.image_dim)
    audio = noise(1, 2, sizes.frames, config.audio_window, config.audio_layers, config.audio_channels)
    latent_input = noise(1, config.in_channels, *latent)
    timestep = torch.tensor(700.0, device=device)

    models: dict[str, Any] = {}
    # What the next variant will cost: the native two-person step, a model build, an inductor compile of a block
    # (40-90 s seen on Hopper for a Wan block; replaced by the first one measured here).
    estimates = {"step_s": 0.0, "build_s": 0.0, "compile_s": 90.0 if sizes.compile_backend == "inductor" else 0.0}

    def clean_model() -> None:
        if models and not models["dirty"]:
            return
        models.clear()
        torch._dynamo.reset()
        free_memory()
        started = time.perf_counter()
        ours = random_transformer(config, device)
        models.update(ours=ours, plain=plain_wan_twin(ours), dirty=False)
        estimates["build_s"] = time.perf_counter() - started

    def step(kind: str) -> Callable[[], torch.Tensor]:
        if kind == "plain_wan":
            plain = models["plain"]
            batch = {
                "hidden_states": latent_input.expand(passes, -1, -1, -1, -1),
                "timestep": timestep.expand(passes),
                "encoder_hidden_states": torch.cat([text, negative_text, negative_text]),
                "encoder_hidden_states_image": image.expand(passes, -1, -1),
            }
            return lambda: plain(**batch).sample
        persons = 2 if kind == "two_person" else 1
        scales = GuidanceScales(text=5.0, audio=4.0)
        region_masks = masks if persons > 1 else None
        denoiser = GuidedDenoiser(models["ours"], scales, text, negative_text, image, audio[:, :persons], region_masks)
        return lambda: denoiser(latent_input, timestep)

    def compile_blocks(kind: str) -> str:
        models["dirty"] = True
        models["plain" if kind == "plain_wan" else "ours"].compile_repeated_blocks(
            backend=sizes.compile_backend, dynamic=False
        )
        return f"torch.compile ({sizes.compile_backend}) of each block"

    def quantise(scheme: str) -> str:
        from multitalk_model.quantization import quantize_transformer

        models["dirty"] = True
        del models["plain"]  # it shares the bf16 weights: they are freed only once both models let go
        # What generation ships: the Wan linears of every block; the audio branch and the norms stay bf16.
        quantize_transformer(models["ours"], {"int8_weight_only": "int8", "fp8_e4m3": "fp8"}[scheme])
        return f"torchao {scheme} of the Wan linears of every block (multitalk_model.quantization)"

    def offload_blocks() -> str:
        from multitalk_model.offload import offload_transformer_blocks

        models["dirty"] = True
        del models["plain"]  # it shares the blocks' weights, which move to the CPU
        offload_transformer_blocks(models["ours"], device)
        streams = "on a CUDA side stream" if device.type == "cuda" else "no streams on a CPU"
        return f"diffusers block-level group offloading, one block per group, {streams} (multitalk_model.offload)"

    def step_row(kind: str, backend: str, variant: str, repeats: int) -> Row:
        row_id = f"{kind}/{backend}/{variant}"

        def run() -> dict[str, Any]:
            clean_model()
            for model in (models["ours"], models["plain"]):
                model.set_attention_backend(backend)
            variants = {"eager": lambda: "", "compiled": lambda: compile_blocks(kind), "group_offload": offload_blocks}
            how = variants.get(variant, lambda: quantise(variant))()
            reset_peak()
            with torch.no_grad():
                first_s, step_s, output = timed_steps(step(kind), sizes.warmups, repeats)
            values: dict[str, Any] = {"first_call_s": first_s}
            if variant == "compiled":
                values["compile_s"] = estimates["compile_s"] = first_s - step_s
            if backend == "native" and variant == "eager":
                references[kind] = output
                if kind == "two_person":
                    estimates["step_s"] = step_s
            elif kind in references:
                values["max_rel_diff_vs_native_eager"] = relative_difference(output, references[kind])
            tflops = flops[kind] / step_s / 1e12
            figures = ", ".join(f"{key} {value:.3g}" for key, value in values.items())
            return {
                "seconds": step_s,
                "tflops": tflops,
                "mfu": tflops / peak_tflops if peak_tflops else None,
                "peak_gib": peak_gib(),
                "note": "; ".join(text for text in (shape, how, figures) if text),
                "values": values,
            }

        estimate = estimates["step_s"] * (sizes.warmups + repeats)
        if variant == "compiled":
            estimate += estimates["compile_s"]
        if models["dirty"]:
            estimate += estimates["build_s"]
        return part.measure(row_id, run, estimate)

    def localisation_share() -> dict[str, Any]:
        """The localisation of every block of the two-person step, timed alone at the step's shapes."""
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        query = noise(passes, tokens, heads, head_dim)
        ref_key = noise(passes, tokens // t, heads, head_dim)
        region_values = token_region_masks(masks.expand(passes, -1, -1, -1), (h // 2, w // 2))

        def every_block() -> None:
            for _ in range(config.num_layers):
                region_scores(query, ref_key, region_values)

        reset_peak()
        _, seconds, _ = timed_steps(every_block, sizes.warmups, sizes.repeats)
        step_s = part.rows["two_person/native/eager"].seconds
        values = {"flop_share": two.localisation / two.total, "time_share": seconds / step_s if step_s else None}
        note = f"{config.num_layers} blocks x {passes} passes timed alone; FLOP share {values['flop_share']:.2%}"
        if values["time_share"] is not None:
            note = f"{values['time_share']:.2%} of the two-person step; {note}"
        return {"seconds": seconds, "peak_gib": peak_gib(), "note": note, "values": values}

    references: dict[str, torch.Tensor] = {}
    clean_model()
    backends = []
    for backend in sizes.attention_backends:
        try:
            models["ours"].set_attention_backend(backend)
            backends.append(backend)
        except (RuntimeError, ValueError) as error:  # the dispatcher's answer for a kernel that is not installed
            print(f"attention backend {backend}: not available ({describe(error)})", flush=True)
    context["attention_backends"] = backends
    quantised = ("int8_weight_only", "fp8_e4m3")
    part.plan(
        *(f"{kind}/{backend}/eager" for backend in backends for kind in ("two_person", "plain_wan")),
        "one_person/native/eager",
        "localisation_share/native/eager",
        "two_person/native/compiled",
        "plain_wan/native/compiled",
        *(f"two_person/native/{scheme}" for scheme in quantised),
        "two_person/native/group_offload",
    )

    # In priority order: the headline rows first, what the budget may drop last.
    step_row("two_person", "native", "eager", sizes.repeats)
    step_row("plain_wan", "native", "eager", sizes.repeats)
    step_row("one_person", "native", "eager", 1)
    part.measure("localisation_share/native/eager", localisation_share, estimates["step_s"] * 0.2)
    step_row("two_person", "native", "compiled", 1)
    step_row("plain_wan", "native", "compiled", 1)
    for backend in backends[1:2]:
        step_row("two_person", backend, "eager", 1)
        step_row("plain_wan", backend, "eager", 1)
    for scheme in quantised:
        if importlib.util.find_spec("torchao") is None:
            part.record(f"two_person/native/{scheme}", "skipped", note="torchao is not installed")
        elif scheme == "fp8_e4m3" and not (device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)):
            part.record(f"two_person/native/{scheme}", "skipped", note="fp8 matmuls need a GPU of compute 8.9+")
        else:
            step_row("two_person", "native", scheme, 1)
    step_row("two_person", "native", "group_offload", 1)
    for backend in backends[2:]:
        step_row("two_person", backend, "eager", 1)
        step_row("plain_wan", backend, "eager", 1)


FSDP_ROWS = ("two_person/native/fsdp", "two_person/native/fsdp_sequence_parallel")


def fsdp_part(part: Part, sizes: Sizes) -> None:
    """The two-person step with the blocks' weights sharded by FSDP2 over every GPU present (one process per GPU,
    NCCL), then with sequence parallel on top (serving/sharding.py, serving/parallel.py). --tiny: 2 CPU processes
    on gloo. Each row: s/step and the largest peak of the ranks; summarise() adds the ratios to the bf16 step."""
    import torch
    import torch.multiprocessing as mp

    part.plan(*FSDP_ROWS)
    ranks = torch.cuda.device_count() if torch.cuda.is_available() else 2
    if ranks < 2:
        for row_id in FSDP_ROWS:
            part.record(row_id, "skipped", note=f"{ranks} GPU present: FSDP row needs >=2")
        return
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "fsdp.json"
        port = _free_port()
        processes = mp.spawn(_fsdp_rank, args=(ranks, port, sizes, str(out)), nprocs=ranks, join=False)
        try:
            while not processes.join():  # raises the first rank's error
                pass
        finally:  # the part's hard limit (or a failed rank) leaves no rank behind
            for process in processes.processes:
                if process.is_alive():
                    process.terminate()
        measured = json.loads(out.read_text())
    for row_id in FSDP_ROWS:
        result = measured[row_id]
        weights = f"each rank holds {result['rank_weight_gib']:.3g} of {result['whole_weight_gib']:.3g} GiB weights"
        note = f"{ranks} {'GPUs' if torch.cuda.is_available() else 'CPU processes'}, {weights}"
        values = {key: result[key] for key in ("first_call_s", "ranks", "rank_weight_gib", "whole_weight_gib")}
        part.record(row_id, seconds=result["seconds"], peak_gib=result["peak_gib"], note=note, values=values)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fsdp_rank(rank: int, ranks: int, port: int, sizes: Sizes, out: str) -> None:
    """One rank of fsdp_part: the seeded random model (the same weights on every rank), sharded, timed."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from multitalk_model.config import get_preset
    from multitalk_model.fixtures.random_model import random_transformer
    from multitalk_model.guidance import GuidanceScales, GuidedDenoiser
    from serving.parallel import apply_sequence_parallel
    from serving.sharding import local_parameter_bytes, shard_transformer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=ranks)
    config, (t, h, w) = get_preset(sizes.preset), sizes.latent
    generator = torch.Generator(device).manual_seed(0)

    def noise(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=generator, device=device, dtype=torch.bfloat16)

    masks = torch.zeros(1, 3, h, w, device=device)  # two persons side by side and the background, as in the step rows
    masks[0, 0, 1:, 1 : w // 2 - 1] = 1
    masks[0, 1, 1:, w // 2 + 1 : -1] = 1
    masks[0, 2] = 1 - masks[0, 0] - masks[0, 1]
    text, negative_text = noise(1, config.text_len, config.text_dim), noise(1, config.text_len, config.text_dim)
    image, latent = noise(1, 257, config.image_dim), noise(1, config.in_channels, t, h, w)
    audio = noise(1, 2, sizes.frames, config.audio_window, config.audio_layers, config.audio_channels)
    timestep = torch.tensor(700.0, device=device)

    model = random_transformer(config, device)
    whole = local_parameter_bytes(model)
    shard_transformer(model, init_device_mesh(device.type, (ranks,)))
    free_memory()
    denoiser = GuidedDenoiser(model, GuidanceScales(text=5.0, audio=4.0), text, negative_text, image, audio, masks)
    results = {}
    for row_id in FSDP_ROWS:
        if row_id.endswith("sequence_parallel"):
            apply_sequence_parallel(model)
        reset_peak()
        with torch.no_grad():
            first_s, step_s, _ = timed_steps(lambda: denoiser(latent, timestep), sizes.warmups, sizes.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        results[row_id] = {"seconds": step_s, "first_call_s": first_s, "peak_gib": peak}
    results["rank_weight_gib"] = local_parameter_bytes(model) / 2**30
    gathered = [None] * ranks
    dist.all_gather_object(gathered, results)
    if rank == 0:
        measured = {
            row_id: {
                "seconds": max(rank_results[row_id]["seconds"] for rank_results in gathered),
                "first_call_s": max(rank_results[row_id]["first_call_s"] for rank_results in gathered),
                "peak_gib": None if not cuda else max(rank_results[row_id]["peak_gib"] for rank_results in gathered),
                "ranks": ranks,
                "rank_weight_gib": max(rank_results["rank_weight_gib"] for rank_results in gathered),
                "whole_weight_gib": whole / 2**30,
            }
            for row_id in FSDP_ROWS
        }
        Path(out).write_text(json.dumps(measured))
    dist.destroy_process_group()


def training_part(part: Part, sizes: Sizes, peak_tflops: float | None) -> None:
    import dataclasses as dc

    from benchmarks.training import gpu_slice
    from multitalk_model.config import get_preset

    part.plan("training/slice_step")
    config = dc.replace(get_preset(sizes.preset), num_layers=sizes.slice_layers)

    def run() -> dict[str, Any]:
        result = gpu_slice(config, sizes.slice_frames, *sizes.slice_size, steps=3)
        height, width = sizes.slice_size
        note = f"{result.layers} of {get_preset(sizes.preset).num_layers} blocks, activation checkpointing, "
        note += f"{result.tokens:,} tokens ({sizes.slice_frames} frames {height}x{width}); "
        note += f"{result.tokens_per_s:,.0f} tokens/s"
        return {
            "seconds": result.step_s,
            "tflops": result.tflops,
            "mfu": result.tflops / peak_tflops if peak_tflops else None,
            "peak_gib": result.peak_bytes / 2**30 if result.peak_bytes is not None else None,
            "note": note,
            "values": {"tokens_per_s": result.tokens_per_s, "tokens": result.tokens, "layers": result.layers},
        }

    part.measure("training/slice_step", run)


def vae_part(part: Part, sizes: Sizes) -> None:
    """Encode and decode of one clip with random weights, in float32 as the pipeline runs the VAE."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKLWan

    from multitalk_model.components import vae_decode, vae_encode

    part.plan("vae/encode", "vae/decode")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan(**sizes.vae).eval()
    components = SimpleNamespace(vae=vae)  # vae_encode / vae_decode read only the VAE of the components
    generator = torch.Generator(device).manual_seed(0)
    video = torch.rand(1, 3, sizes.frames, sizes.height, sizes.width, generator=generator, device=device) * 2 - 1
    if device.type == "cuda":  # cuDNN picks kernels on first use; chunks of 1 then 4 frames: 5 frames meet them all
        vae_decode(components, vae_encode(components, video[:, :, :5]))
    shape = f"{sizes.frames} frames {sizes.height}x{sizes.width}, float32, base_dim {sizes.vae['base_dim']}"
    latents = []

    def encode() -> dict[str, Any]:
        reset_peak()
        _, seconds, latent = timed_steps(lambda: vae_encode(components, video), 0, 1)
        latents.append(latent)
        return {"seconds": seconds, "peak_gib": peak_gib(), "note": f"{shape} -> latent {list(latent.shape[1:])}"}

    def decode() -> dict[str, Any]:
        reset_peak()
        _, seconds, decoded = timed_steps(lambda: vae_decode(components, latents[0]), 0, 1)
        if not torch.isfinite(decoded).all():
            raise FloatingPointError("the decoded clip has non-finite values")
        return {"seconds": seconds, "peak_gib": peak_gib(), "note": shape}

    part.measure("vae/encode", encode)
    if latents:
        part.measure("vae/decode", decode)


def generation_part(part: Part, sizes: Sizes) -> None:
    """The real pipeline on the tiny model directory: a two-person job from files to an mp4, in bf16."""
    import numpy as np
    import torch
    from PIL import Image

    from multitalk_model.fixtures.speech import synthesize_speech, write_wav
    from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
    from multitalk_model.generation import MultiTalkPipeline
    from multitalk_model.jobs import GenerationJob
    from multitalk_model.media import probe_media

    part.plan("generation/tiny_end_to_end")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    height, width = sizes.height, sizes.width

    def run() -> dict[str, Any]:
        reset_peak()
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            model_dir = build_tiny_model_dir(scratch / "model")
            pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(scratch / "image.png")
            seconds = sizes.generation_frames / 25 + 0.5
            for index, pitch in enumerate((110.0, 190.0)):
                write_wav(scratch / f"person{index}.wav", synthesize_speech(seconds, seed=index, pitch_hz=pitch), 16000)
            job = GenerationJob(
                image=str(scratch / "image.png"),
                persons=[
                    {"audio": str(scratch / "person0.wav"), "box": (0, 0, width / 2, height)},
                    {"audio": str(scratch / "person1.wav"), "box": (width / 2, 0, width, height)},
                ],
                prompt="two people talking to each other",
                audio_type="para",
                resolution=(height, width),
                frame_num=sizes.generation_frames,
                motion_frames=1,  # one clip: the motion frames of a next clip play no part
                steps=sizes.generation_steps,
                seed=0,
            )
            started = time.perf_counter()
            pipeline = MultiTalkPipeline.from_model_dir(model_dir, device=device, dtype=torch.bfloat16)
            load_s = time.perf_counter() - started
            finite = []  # every decoded chunk, before the pipeline clamps and quantises it to uint8
            pipeline.components.vae.decoder.register_forward_hook(
                lambda module, args, output: finite.append(bool(torch.isfinite(output).all()))
            )
            first = pipeline.generate(job, scratch / "first.mp4")
            result = pipeline.generate(job, scratch / "second.mp4")
            info = probe_media(result.path)
        if not all(finite):
            raise FloatingPointError("the decoded video has non-finite values")
        if info.num_frames != sizes.generation_frames:
            raise ValueError(f"the mp4 has {info.num_frames} frames, the job asked for {sizes.generation_frames}")
        note = (
            f"{result.num_frames} frames {height}x{width}, 2 persons, {sizes.generation_steps} steps x 3 passes, "
            f"mp4 with sound, output finite; first call {first.seconds:.2f} s, model load {load_s:.2f} s"
        )
        values = {"first_call_s": first.seconds, "load_s": load_s, "frames": result.num_frames}
        return {"seconds": result.seconds, "peak_gib": peak_gib(), "note": note, "values": values}

    part.measure("generation/tiny_end_to_end", run)


def memory_part(part: Part, rows: dict[str, Row]) -> None:
    """Whether one 81-frame 480p clip fits with every component resident: the weights from the released models'
    shapes (the text encoder in bf16, the others in float32, as the pipeline loads them) plus the larger of the
    measured activations of the two-person step and of the VAE decode."""
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
        Wav2Vec2Config,
        Wav2Vec2Model,
    )

    from multitalk_model.checkpoints import build_model, key_keeps_fp32
    from multitalk_model.config import get_preset

    part.plan("memory/full_clip_with_text_encoder")

    def gib(model: torch.nn.Module, bytes_per_value: Callable[[str], int]) -> float:
        return sum(param.numel() * bytes_per_value(name) for name, param in model.named_parameters()) / 2**30

    def run() -> dict[str, Any]:
        with torch.device("meta"):
            transformer = build_model(get_preset("multitalk-14b"), "meta")
            weights = {
                "transformer": gib(transformer, lambda name: 4 if key_keeps_fp32(transformer, name) else 2),
                "umT5-XXL": gib(UMT5EncoderModel(UMT5Config(**UMT5_XXL, feed_forward_proj="gated-gelu")), lambda _: 2),
                "CLIP ViT-H/14": gib(CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H14)), lambda _: 4),
                "VAE": gib(AutoencoderKLWan(**WAN21_VAE), lambda _: 4),
                "wav2vec2-base": gib(Wav2Vec2Model(Wav2Vec2Config()), lambda _: 4),
            }
        resident = sum(weights.values())
        listed = ", ".join(f"{name} {size:.1f}" for name, size in weights.items())
        values: dict[str, Any] = {f"{name}_gib": size for name, size in weights.items()}
        note = f"weights {resident:.1f} GiB ({listed})"
        step, decode = rows.get("two_person/native/eager"), rows.get("vae/decode")
        if not (torch.cuda.is_available() and step and step.status == "ok"):
            return {"note": f"{note}; the verdict needs the two-person step's peak memory on a GPU", "values": values}
        activations = step.peak_gib - weights["transformer"]
        if decode and decode.status == "ok" and decode.peak_gib is not None:
            activations = max(activations, decode.peak_gib - weights["VAE"])
        needed = resident + activations
        card = torch.cuda.get_device_properties(0).total_memory / 2**30
        values |= {"needed_gib": needed, "card_gib": card, "fits": needed <= card}
        verdict = "fits" if needed <= card else "does not fit"
        note = f"{verdict}: {needed:.1f} of {card:.1f} GiB; {note} + activations {activations:.1f} GiB"
        return {"peak_gib": needed, "note": note, "values": values}

    part.measure("memory/full_clip_with_text_encoder", run)


def evaluation_part(part: Part, sizes: Sizes, clips: int = 2) -> None:
    """The evaluation job's work per clip, as its generator actors and scoring tasks do it (evaluation/clips.py):
    `clips` held-out talking clips generated under the fast profile (text guidance 1, audio guidance 2, shift 2,
    the generation part's steps and frames; 480p on a GPU) and scored against their ground truth. The transformer
    is the benchmark's config with random weights and the VAE Wan2.1's; the other encoders have the real widths but
    2 layers, so umT5-XXL's prompt and CLIP's image encoding are not in the figure, nor the Ray stages around these
    calls (benchmarks/evaluation.py measures the whole job on CPU). Random weights draw no face, so the metrics
    stop after the face search: a trained model's clips cost the metrics more."""
    row_id = "evaluation/clips_per_minute"
    part.plan(row_id)
    metric_packages = ("cv2", "skimage", "scipy", "facenet_pytorch")  # facenet-pytorch: the MTCNN weights
    missing = [name for name in metric_packages if importlib.util.find_spec(name) is None]
    if missing:  # not in the GPU wheelhouse; the image may lack them
        part.record(row_id, "skipped", note=f"the metrics need {', '.join(missing)} (the evaluation extra)")
        return
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
        Wav2Vec2Config,
        Wav2Vec2Model,
    )

    from evaluation.clips import Protocol, generate_clip, score_clip
    from evaluation.testset import load_test_set
    from multitalk_model.components import load_components
    from multitalk_model.config import get_preset
    from multitalk_model.fixtures.corpus import write_held_out_clips
    from multitalk_model.fixtures.random_model import random_transformer
    from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
    from multitalk_model.generation import MultiTalkPipeline
    from multitalk_model.wav2vec import Wav2VecEncoder

    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    config = get_preset(sizes.preset)
    protocol = Protocol(
        steps=sizes.generation_steps,
        text_guidance=1.0,
        audio_guidance=2.0,
        shift=2.0,
        size="480p",
        resolution=None if on_gpu else (sizes.height, sizes.width),
        frame_num=sizes.generation_frames,
        seed=0,
    )

    def pipeline(model_dir: Path) -> MultiTalkPipeline:
        """The tiny directory's tokenizer, processors and scheduler around random components of the config."""
        tiny = load_components(model_dir, "cpu", torch.float32)
        torch.manual_seed(0)
        text = UMT5Config(
            vocab_size=len(tiny.tokenizer), d_model=config.text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", pad_token_id=tiny.tokenizer.pad_token_id,
            eos_token_id=tiny.tokenizer.eos_token_id, decoder_start_token_id=tiny.tokenizer.pad_token_id,
        )  # fmt: skip
        image = CLIPVisionConfig(**CLIP_VIT_H14 | {"hidden_size": config.image_dim, "num_hidden_layers": 2})
        audio = Wav2Vec2Config(
            hidden_size=config.audio_channels, num_hidden_layers=config.audio_layers, num_attention_heads=2,
            intermediate_size=64, feat_extract_norm="group", do_stable_layer_norm=False, mask_time_prob=0.0,
        )  # fmt: skip
        components = dataclasses.replace(
            tiny,
            transformer=random_transformer(config, device, dtype),
            text_encoder=UMT5EncoderModel(text).to(device, dtype).eval(),
            image_encoder=CLIPVisionModel(image).to(device).eval(),
            audio_encoder=Wav2VecEncoder(Wav2Vec2Model(audio).to(device), tiny.audio_encoder.feature_extractor),
            vae=AutoencoderKLWan(**sizes.vae).to(device).eval(),
            config=config,
        )
        return MultiTalkPipeline(components, device=device)

    def run() -> dict[str, Any]:
        reset_peak()
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            seconds = sizes.generation_frames / 25 + 0.2
            test_set = load_test_set(write_held_out_clips(scratch / "held_out", clips, seconds), scratch / "clips")
            started = time.perf_counter()
            model = pipeline(build_tiny_model_dir(scratch / "model"))
            build_s = time.perf_counter() - started
            generation, metrics = [], []
            for clip in test_set:
                video = scratch / "videos" / f"{clip.clip_id}.mp4"
                generation.append(generate_clip(model, clip, protocol, video))
                metrics.append(score_clip(video, clip)[2])
        generation_s, metrics_s = sum(generation), sum(metrics)
        total_s = generation_s + metrics_s
        values = {
            "clips": len(generation),
            "clips_per_minute": len(generation) / total_s * 60,
            "generation_share": generation_s / total_s,
            "metrics_share": metrics_s / total_s,
            "generation_s": generation,
            "metrics_s": metrics,
            "build_s": build_s,
        }
        note = (
            f"{values['clips_per_minute']:.2f} clips/min; generation {values['generation_share']:.1%}, metrics "
            f"{values['metrics_share']:.1%} of {total_s:.1f} s for {len(generation)} clips ({sizes.preset}, "
            f"{sizes.generation_frames} frames, {sizes.generation_steps} steps x 2 passes, "
            f"{'480p' if on_gpu else f'{sizes.height}x{sizes.width}'}; the first clip warms up)"
        )
        return {"seconds": total_s / len(generation), "peak_gib": peak_gib(), "note": note, "values": values}

    part.measure(row_id, run)


def summarise(rows: dict[str, Row]) -> None:
    """The ratios between rows: our steps against the plain Wan step, the VAE's share of a generation."""
    for row in rows.values():
        kind, _, variant = row.id.partition("/")
        plain = rows.get(f"plain_wan/{variant}")
        if kind in ("two_person", "one_person") and row.status == "ok" and plain and plain.status == "ok":
            ratio = row.seconds / plain.seconds
            row.values["vs_plain"] = ratio
            target = f" (target <= {TARGETS['two_person_vs_plain']})" if kind == "two_person" else ""
            row.note = f"{ratio:.3f}x the plain Wan step{target}; {row.note}"
    step, encode, decode = (rows.get(key) for key in ("two_person/native/eager", "vae/encode", "vae/decode"))
    if all(row and row.status == "ok" for row in (step, encode, decode)):
        vae_s = encode.seconds + decode.seconds
        share = vae_s / (vae_s + 40 * step.seconds)
        decode.values["generation_share"] = share
        decode.note = f"encode + decode {share:.1%} of a 40-step two-person clip; {decode.note}"


# The rows of the memory and speed options, each against the bf16 eager two-person step of the same run.
OPTION_ROWS = (
    "two_person/native/compiled",
    "two_person/native/int8_weight_only",
    "two_person/native/fp8_e4m3",
    "two_person/native/group_offload",
    *FSDP_ROWS,
)


def summarise_options(rows: dict[str, Row]) -> None:
    """Each option row's s/step and peak memory as ratios to the bf16 eager two-person step."""
    baseline = rows.get("two_person/native/eager")
    if not (baseline and baseline.status == "ok"):
        return
    for row in (rows[row_id] for row_id in OPTION_ROWS if row_id in rows):
        if row.status != "ok":
            continue
        ratios = [f"{row.seconds / baseline.seconds:.3f}x the bf16 step time"]
        row.values["vs_bf16_eager"] = row.seconds / baseline.seconds
        if row.peak_gib is not None and baseline.peak_gib:
            row.values["peak_vs_bf16_eager"] = row.peak_gib / baseline.peak_gib
            ratios.append(f"{row.values['peak_vs_bf16_eager']:.3f}x its peak memory")
        row.note = f"{', '.join(ratios)}; {row.note}"


def _cell(value: float | None, text: str) -> str:
    return "" if value is None else text.format(value)


def print_table(header: dict[str, Any], rows: dict[str, Row]) -> None:
    lines = [
        f"MultiTalk GPU benchmark, {header['date']}: {header['device']} "
        f"(bf16 peak {_cell(header['peak_tflops'], '{:.1f} TFLOP/s') or 'unknown'}), torch {header['torch']}, "
        f"CUDA {header['cuda']}, cuDNN {header['cudnn']}, Python {header['python']}; {header['total_s']:.0f} s in all "
        f"(start-up {header['startup_s']:.0f} s)",
        "packages: " + ", ".join(f"{name} {version}" for name, version in header["packages"].items()),
        f"attention backends found: {', '.join(header['attention_backends']) or 'none'}; targets: two-person "
        f"step MFU >= {TARGETS['two_person_mfu']:.0%} and <= {TARGETS['two_person_vs_plain']}x the plain Wan step, "
        f"training MFU >= {TARGETS['training_mfu']:.0%}",
    ]
    columns = ["row", "status", "time s", "TFLOP/s", "MFU", "peak GiB", "notes"]
    table = [
        [
            row.id,
            row.status,
            _cell(row.seconds, "{:.4g}"),
            _cell(row.tflops, "{:.1f}"),
            _cell(row.mfu, "{:.1%}"),
            _cell(row.peak_gib, "{:.1f}"),
            row.note,
        ]
        for row in rows.values()
    ]
    widths = [max(len(str(cells[i])) for cells in [columns, *table]) for i in range(len(columns) - 1)]
    for cells in [columns, *table]:
        lines.append(
            "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=False)) + "  " + cells[-1]
        )
    print("\n" + "\n".join(lines), flush=True)


def environment(site: Path | None, attention_backends: list[str]) -> dict[str, Any]:
    import torch

    packages = {}
    for name in ("diffusers", "transformers", "huggingface_hub", "tokenizers", "torchao", "av", "numpy"):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "missing"
            continue
        where = Path(str(distribution.locate_file(""))).resolve()
        from_wheelhouse = site is not None and where.is_relative_to(site.resolve())
        packages[name] = distribution.version + (" (wheelhouse)" if from_wheelhouse else "")
    device, peak = device_peak_tflops()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "peak_tflops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none",
        "python": platform.python_version(),
        "packages": packages,
        "attention_backends": attention_backends,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="every part on the CPU with small shapes (the test)")
    parser.add_argument("--wheelhouse", type=Path, help="wheels to install first (benchmarks/gpu_wheels.sh)")
    parser.add_argument("--site", type=Path, help="where to install them (default: a scratch folder)")
    parser.add_argument("--json", type=Path, help="also write the table's JSON to this file")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run (default: 450; --tiny 900)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, if not in the table")
    args = parser.parse_args(argv)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

    site = None
    if args.wheelhouse is not None:
        site = args.site or Path(tempfile.mkdtemp(prefix="multitalk-gpu-site-"))
        install_wheelhouse(args.wheelhouse, site)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: --tiny runs every part on the CPU")
    sizes = tiny_sizes() if args.tiny else gpu_sizes()
    time_limit = args.time_limit or (900.0 if args.tiny else 450.0)
    _, peak_tflops = device_peak_tflops()
    peak_tflops = args.peak_tflops or peak_tflops
    startup_s = elapsed()

    rows: dict[str, Row] = {}
    context: dict[str, Any] = {"attention_backends": []}
    others = sum(sizes.budgets.values())
    run_part(
        "transformer",
        time_limit - elapsed() - others,
        lambda part: transformer_part(part, sizes, peak_tflops, context),
        rows,
        sizes.grace_s,
    )
    parts = {
        "fsdp": lambda part: fsdp_part(part, sizes),
        "training": lambda part: training_part(part, sizes, peak_tflops),
        "vae": lambda part: vae_part(part, sizes),
        "generation": lambda part: generation_part(part, sizes),
        "memory": lambda part: memory_part(part, rows),
        "evaluation": lambda part: evaluation_part(part, sizes),
    }
    for name, body in parts.items():
        run_part(name, min(sizes.budgets[name], time_limit - elapsed()), body, rows, sizes.grace_s)
    summarise(rows)
    summarise_options(rows)

    header = environment(site, context["attention_backends"])
    header |= {"peak_tflops": peak_tflops, "total_s": elapsed(), "startup_s": startup_s, "tiny": args.tiny}
    print_table(header, rows)
    report = {"header": header, "targets": TARGETS, "rows": [dataclasses.asdict(row) for row in rows.values()]}
    line = json.dumps(report, default=str)
    print("GPU_BENCHMARK_JSON " + line, flush=True)
    if args.json is not None:
        args.json.write_text(line + "\n")
    return 1 if any(row.status == "error" for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
