"""Lab-space colour correction of generated frames against the reference image."""

import numpy as np
import pytest
from PIL import Image

from multitalk_model.color import match_colors


@pytest.fixture(scope="module")
def reference_image(shared_media) -> np.ndarray:
    with Image.open(shared_media / "two_people_car.png") as image:
        return np.asarray(image.convert("RGB").resize((96, 54), Image.BILINEAR))


def test_a_colour_shifted_clip_is_brought_back_to_the_reference(reference_image):
    # A warm, washed-out cast that grows over the clip, as long videos drift.
    reference = reference_image.astype(np.float64)
    frames = np.stack(
        [np.clip(reference * [1.0 + 0.1 * k, 0.9, 0.7 - 0.05 * k] + 25 * k, 0, 255) for k in (1, 2, 3)]
    ).astype(np.uint8)

    corrected = match_colors(frames, reference_image)

    assert corrected.shape == frames.shape and corrected.dtype == np.uint8
    error_before = np.abs(frames.astype(np.float64) - reference).mean(axis=(1, 2, 3))
    error_after = np.abs(corrected.astype(np.float64) - reference).mean(axis=(1, 2, 3))
    assert (error_after < 0.25 * error_before).all()
    assert (error_after < 10).all()  # grey levels out of 255, from up to 64 before


def test_strength_zero_is_the_identity_and_half_strength_blends(reference_image):
    frames = np.stack([reference_image // 2, reference_image // 3])
    assert np.array_equal(match_colors(frames, reference_image, strength=0.0), frames)
    full = match_colors(frames, reference_image, strength=1.0).astype(np.float64)
    half = match_colors(frames, reference_image, strength=0.5).astype(np.float64)
    assert np.abs(half - (frames + full) / 2).max() <= 1.0  # rounding only
    with pytest.raises(ValueError, match="strength"):
        match_colors(frames, reference_image, strength=1.5)
