"""Importing our modules (and with them diffusers, which imports torchao) prints none of torchao's import noise."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Failed to load", "Unable to import `torchao` Tensor objects", "is an Enum subclass")


def test_a_process_importing_generation_and_torchao_prints_no_torchao_noise():
    code = "import multitalk_model.generation, torchao.quantization, torch; print(torch.version.cuda)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "None":  # the kernel-load lines are dropped only under a CPU build of torch
        assert not [line for line in done.stderr.splitlines() if any(noise in line for noise in NOISE)], done.stderr
    else:
        assert not [line for line in done.stderr.splitlines() if any(noise in line for noise in NOISE[1:])]
