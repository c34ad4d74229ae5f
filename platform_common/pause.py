"""Pause points: named places where a long-running job can be held, so a test interrupts it at a known point.

Tests that restart, cancel or kill work must catch it mid-way whatever the machine's speed. Code calls
`pause_point(name)` at a documented point; when the environment variable MULTITALK_PAUSE_DIR names a folder holding
a file `<name>.hold`, the caller writes `<name>.<pid>.reached` there and waits until the hold file is removed, or
until its own `.reached` file is (a test lets that one process go on while the others stay held).
Without the variable (production) a pause point is one dictionary lookup. Files work across the processes a job
spans (a driver, Ray workers and Serve replicas inherit the variable from the process that starts Ray).

The points:
    generator-step             serving: a replica reported a sampling step of the job it runs (serving/generator.py)
    generator-clip-finished    serving: a replica stored a finished clip of the job it runs (serving/clips.py)
    curation-shard-committed   curation: the driver committed a shard (pipelines/sink.py)
    curation-after-<stage>     curation: a worker ran per-clip stage <stage> (probe, clip, faces, sync, ...) on a
                               record, its task not yet done (pipelines/stages/base.py)
    training-checkpoint-<step> training: a worker reported the checkpoint of optimizer step <step> (training/loop.py)
    evaluation-clip-written    evaluation: a generator actor committed a generated clip's video (evaluation/evaluate.py)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_DIR_ENV = "MULTITALK_PAUSE_DIR"
_POLL_S = 0.02


def pause_point(name: str) -> None:
    """Holds the caller while `<name>.hold` exists in the pause folder (see the module docstring); else returns."""
    directory = os.environ.get(PAUSE_DIR_ENV)
    if not directory:
        return
    hold = Path(directory) / f"{name}.hold"
    if not hold.exists():
        return
    reached = Path(directory) / f"{name}.{os.getpid()}.reached"
    reached.touch()
    while hold.exists() and reached.exists():
        time.sleep(_POLL_S)
