"""Checks of a submission before it is accepted, without a running service."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from serving.config import ServingConfig
from serving.submission import RequestRejected, Upload, build_job

ROTATED_90 = 6  # EXIF orientation: the pixels are stored turned a quarter, the upright photo is taller than wide


@pytest.fixture
def speech(tmp_path) -> Upload:
    path = tmp_path / "speech.wav"
    write_wav(path, synthesize_speech(2.0), 16000)
    return Upload(field="audio 1", filename=path.name, path=path, size=path.stat().st_size)


def _sideways_photo(path: Path, image_format: str) -> Upload:
    """100 x 60 pixels as stored, 60 x 100 upright."""
    exif = Image.Exif()
    exif[0x0112] = ROTATED_90
    Image.fromarray(np.zeros((60, 100, 3), dtype=np.uint8)).save(path, format=image_format, exif=exif.tobytes())
    return Upload(field="image", filename=path.name, path=path, size=path.stat().st_size)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_boxes_are_checked_against_the_upright_photo_of_a_sideways_exif_image(tmp_path, speech, image_format):
    config = ServingConfig(model_dir=str(tmp_path), api_keys=["key"], storage_uri=str(tmp_path / "files"))
    image = _sideways_photo(tmp_path / f"photo.{image_format.lower()}", image_format)

    upright_box = [0, 0, 50, 90]  # inside 60 x 100, outside the stored 100 x 60
    job = build_job({"boxes": [upright_box]}, image, [speech], config)
    assert job.persons[0].box == tuple(upright_box)

    with pytest.raises(RequestRejected, match="boxes"):
        build_job({"boxes": [[0, 0, 90, 50]]}, image, [speech], config)  # inside the stored pixels, not upright
