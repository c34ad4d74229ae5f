"""Shared fixtures: the real media and golden files that CI lays beside the checkout in ../shared."""

import os
from pathlib import Path

import pytest

# Tests never reach a model hub and run against a local Ray with auth off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

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
