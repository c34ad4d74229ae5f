"""Shared fixtures: the real media and golden files that CI lays beside the checkout in ../shared, a local Ray and
pause gates (helpers in tests/helpers.py)."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from platform_common.pause import PAUSE_DIR_ENV
from tests import helpers

# Tests never reach a model hub and run against a local Ray with auth off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Pause points (platform_common.pause) read their holds here; set before any Ray starts so its workers inherit it.
os.environ[PAUSE_DIR_ENV] = tempfile.mkdtemp(prefix="multitalk-pause-")
atexit.register(shutil.rmtree, os.environ[PAUSE_DIR_ENV], ignore_errors=True)  # a run that stops before its end

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


def _shared_subdir(name: str) -> Path:
    path = SHARED_DIR / name
    if not path.is_dir():
        pytest.skip(f"{path} is missing: the shared test assets lie beside the checkout in CI, not in a user's clone")
    return path


@pytest.fixture(scope="session")
def shared_media() -> Path:
    """../shared/media: real talking videos, speech and two-person images."""
    return _shared_subdir("media")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the local Ray is slow, whichever module it is in (modules starting a server mark themselves)."""
    for item in items:
        if "local_ray" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the test module (2 CPUs); yields its GCS address."""
    with helpers.local_ray(num_cpus=2) as address:
        yield address


@pytest.fixture
def pause_gate() -> helpers.PauseGate:
    return helpers.PauseGate()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model directory (multitalk_model.fixtures.tiny_model) with its default seed."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Ends the process with pytest's own exit status once everything is reported, skipping the interpreter's
    teardown of native libraries: after a whole run of 456 passed tests, that teardown (Ray's core worker, PyAV,
    dlib and torch threads) once ended the process with a segmentation fault, turning a green run red."""
    if not _EXIT_STATUS:
        return
    shutil.rmtree(os.environ[PAUSE_DIR_ENV], ignore_errors=True)  # atexit functions do not run after os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])
