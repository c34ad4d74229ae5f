"""Person regions: the reference's buckets and default halves, box checks, masks aligned with the image crop,
and regions located from faces on the real two-person photo."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from multitalk_model.faces import Face, MTCNNDetector
from multitalk_model.regions import (
    ASPECT_RATIO_627,
    ASPECT_RATIO_960,
    default_halves,
    draw_regions_preview,
    locate_persons,
    official_bbox_to_box,
    person_region_from_face,
    region_masks,
    resize_and_center_crop,
    target_size,
    validate_box,
)


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNDetector:
    return MTCNNDetector()


@pytest.fixture(scope="module")
def car_image(shared_media) -> np.ndarray:
    return np.asarray(Image.open(shared_media / "two_people_car.png").convert("RGB"))


@pytest.fixture(scope="module")
def car_faces(mtcnn, car_image) -> list[Face]:
    """The man's and the woman's faces, left to right."""
    return sorted(mtcnn.detect(car_image), key=lambda face: face.center[0])


def _overlap(a, b) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0)


def _inside(point, box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


# ------------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (1440, 2560, "480p", (448, 896)),  # the reference's example: ratio 0.5625 -> bucket 0.50
        (1440, 2560, "720p", (704, 1280)),  # ratio 0.5625 -> bucket 0.55
        (844, 844, "480p", (640, 640)),
        (2560, 1440, "480p", (832, 448)),  # portrait 1.78 -> bucket 1.86
        (512, 1024, "720p", (640, 1408)),  # 0.50 is midway between 0.45 and 0.55 on paper, nearer 0.45 in floats
    ],
)
def test_target_size_picks_the_nearest_aspect_bucket(height, width, size, expected):
    assert target_size(height, width, size) == expected


def test_every_bucket_divides_into_whole_latent_patches():
    # VAE stride 8 x patch 2: each side must be a multiple of 16, and the key must be the bucket's h / w.
    for table in (ASPECT_RATIO_627, ASPECT_RATIO_960):
        for key, ((height, width), _) in table.items():
            assert height % 16 == 0 and width % 16 == 0
            assert abs(float(key) - height / width) < 0.06, key


def test_mask_resized_with_the_image_stays_on_the_drawn_box():
    height, width = 1440, 2560
    box = (300.0, 200.0, 900.0, 1000.0)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[200:1000, 300:900] = 255
    masks = region_masks([box, (1500.0, 200.0, 2400.0, 1300.0)], (height, width))
    size_hw = target_size(height, width, "480p")

    image_crop = resize_and_center_crop(image, size_hw)
    mask_crop = np.moveaxis(resize_and_center_crop(np.moveaxis(masks, 0, -1), size_hw, nearest=True), -1, 0)

    assert image_crop.shape == (448, 896, 3) and mask_crop.shape == (3, 448, 896)
    # Scale 0.35 covers the width (896) and makes the height 504, of which the centre 448 rows remain (top 28).
    rows, cols = np.nonzero(mask_crop[0])
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (200 * 0.35 - 28, 1000 * 0.35 - 28, 105, 315)
    drawn = image_crop[..., 0] > 127
    assert (drawn == mask_crop[0].astype(bool)).mean() > 0.999
    assert np.array_equal(mask_crop[2], (mask_crop[0] + mask_crop[1]) == 0)


def test_bilinear_resize_refuses_float_masks():
    with pytest.raises(ValueError, match="nearest=True"):
        resize_and_center_crop(np.ones((10, 20, 3), dtype=np.float32), (8, 8))


# --------------------------------------------------------------------------------------------------- boxes


@pytest.mark.parametrize(
    ("box", "problem"),
    [
        ((-10.0, 0.0, 100.0, 100.0), "reaches outside"),
        ((0.0, 0.0, 100.0, 400.0), "reaches outside"),
        ((50.0, 10.0, 50.0, 100.0), "is empty"),
        ((80.0, 10.0, 20.0, 100.0), "is empty"),
        ((0.0, 0.0, 640.0, 360.0), "covers the whole"),
        ((0.0, 0.0, float("nan"), 10.0), "four finite numbers"),
        ((0.0, 0.0, 10.0), "four finite numbers"),
    ],
)
def test_validate_box_names_the_field_and_the_problem(box, problem):
    with pytest.raises(ValueError, match=f"persons\\[1\\].bbox_xyxy: .*{problem}"):
        validate_box(box, (360, 640), "persons[1].bbox_xyxy")


def test_validate_box_accepts_a_box_inside_the_image():
    validate_box((0.0, 0.0, 320.0, 360.0), (360, 640), "bbox")


def test_official_bbox_is_row_col_and_converts_to_xyxy(shared_media):
    assert official_bbox_to_box([160, 120, 1280, 1080]) == (120.0, 160.0, 1080.0, 1280.0)
    # In the official example the converted person1 box lies on the left (the man), person2 on the right.
    official = json.loads((shared_media / "two_people_car.official.json").read_text())
    left = official_bbox_to_box(official["bbox"]["person1"])
    right = official_bbox_to_box(official["bbox"]["person2"])
    validate_box(left, (1440, 2560), "bbox.person1")
    validate_box(right, (1440, 2560), "bbox.person2")
    assert left[2] < 1280 < right[0]


def test_default_halves_match_the_reference_for_two_persons():
    height, width = 1440, 2560
    boxes = default_halves((height, width), 2)

    # The reference: rows int(H * 0.05):int(H * 0.95), cols int((W // 2) * 0.05):int((W // 2) * 0.95), then + W // 2.
    half = width // 2
    expected = [
        (int(half * 0.05), int(height * 0.05), int(half * 0.95), int(height * 0.95)),
        (int(half * 0.05 + half), int(height * 0.05), int(half * 0.95 + half), int(height * 0.95)),
    ]
    assert [tuple(int(v) for v in box) for box in boxes] == expected


def test_default_halves_generalise_to_equal_separate_columns():
    boxes = default_halves((360, 900), 3)

    assert [round(box[2] - box[0], 6) for box in boxes] == [270.0] * 3
    assert boxes[0][2] < boxes[1][0] and boxes[1][2] < boxes[2][0]


def test_person_region_grows_the_face_mostly_downwards_and_stays_on_the_image():
    face = Face(box=(100.0, 100.0, 200.0, 200.0), score=1.0)

    x0, y0, x1, y1 = person_region_from_face(face, (720, 1280))

    assert (x0, x1) == (0.0, 300.0)  # one face width each side, clipped at the left edge
    assert (y0, y1) == (40.0, 550.0)  # 0.6 face heights of hair above, 3.5 of shoulders and torso below
    assert person_region_from_face(face, (300, 1280))[3] == 300.0  # clipped at the bottom edge


# ---------------------------------------------------------------------------------------------- from faces


def test_locate_persons_on_the_car_photo_gives_the_man_left_and_the_woman_right(
    mtcnn, car_image, car_faces, shared_media
):
    height, width = car_image.shape[:2]
    official = json.loads((shared_media / "two_people_car.official.json").read_text())
    official_man = official_bbox_to_box(official["bbox"]["person1"])
    official_woman = official_bbox_to_box(official["bbox"]["person2"])

    boxes, source = locate_persons(car_image, 2, mtcnn)

    assert source == "faces"
    assert len(boxes) == 2
    left, right = boxes
    assert _overlap(left, right) == 0
    for box in boxes:
        validate_box(box, (height, width), "located region")
    man_face, woman_face = car_faces
    assert _inside(man_face.center, left) and _inside(woman_face.center, right)
    # Each region agrees with the hand-drawn box of its own person more than with the other person's.
    assert _overlap(left, official_man) > _overlap(left, official_woman)
    assert _overlap(right, official_woman) > _overlap(right, official_man)


def test_locate_persons_fills_missing_persons_with_columns_and_says_so(mtcnn, car_image, car_faces, caplog):
    width = car_image.shape[1]

    with caplog.at_level(logging.WARNING, logger="multitalk_model.regions"):
        boxes, source = locate_persons(car_image, 3, mtcnn)

    assert source == "faces+halves"
    assert "found 2 faces for 3 persons" in caplog.text
    # The man sits in the left third, the woman in the right third: the middle person gets the middle column,
    # cut back where it would reach a face.
    man_face, woman_face = car_faces
    middle_column = default_halves(car_image.shape[:2], 3)[1]
    assert _inside(man_face.center, boxes[0]) and _inside(woman_face.center, boxes[2])
    assert _overlap(boxes[1], man_face.box) == 0 and _overlap(boxes[1], woman_face.box) == 0
    assert middle_column[0] <= boxes[1][0] < width / 2 < boxes[1][2] <= middle_column[2]
    assert all(_overlap(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_a_face_on_a_column_line_keeps_its_whole_region(mtcnn, shared_media):
    # The singer's face straddles the middle of the studio photo: the missing second person must not cut into it.
    # (Half size: the same picture for the detector, a quarter of the work.)
    studio = Image.open(shared_media / "one_person_studio.png").convert("RGB")
    image = np.asarray(studio.resize((studio.width // 2, studio.height // 2), Image.BILINEAR))
    (face,) = mtcnn.detect(image)

    boxes, source = locate_persons(image, 2, mtcnn)

    assert source == "faces+halves"
    assert face.box[0] < image.shape[1] / 2 < face.box[2]
    assert _overlap(boxes[1], face.box) == face.area  # the whole face is person 2's
    assert _overlap(boxes[0], boxes[1]) == 0


def test_locate_persons_without_any_face_falls_back_to_halves(mtcnn, caplog):
    grey = np.full((360, 640, 3), 128, dtype=np.uint8)

    with caplog.at_level(logging.WARNING, logger="multitalk_model.regions"):
        boxes, source = locate_persons(grey, 2, mtcnn)

    assert source == "halves"
    assert boxes == default_halves((360, 640), 2)
    assert "face detection found no face" in caplog.text


# --------------------------------------------------------------------------------------------------- masks


def test_region_masks_are_rectangles_and_their_complement():
    masks = region_masks([(10.0, 20.0, 50.0, 60.0), (60.0, 20.0, 90.0, 60.0)], (80, 100))

    assert masks.shape == (3, 80, 100) and masks.dtype == np.float32
    assert masks[0].sum() == 40 * 40 and masks[0, 20:60, 10:50].all()
    assert masks[1].sum() == 30 * 40 and masks[1, 20:60, 60:90].all()
    assert np.array_equal(masks[2], 1 - np.maximum(masks[0], masks[1]))


def test_a_single_person_gets_all_ones_masks():
    masks = region_masks([(10.0, 20.0, 50.0, 60.0)], (80, 100))

    assert masks.shape == (2, 80, 100) and masks.all()


def test_regions_preview_tints_each_region(tmp_path):
    image = np.full((120, 200, 3), 128, dtype=np.uint8)
    boxes = [(10.0, 10.0, 90.0, 110.0), (110.0, 10.0, 190.0, 110.0)]

    path = draw_regions_preview(image, boxes, tmp_path / "preview" / "regions.png")

    preview = np.asarray(Image.open(path))
    assert preview.shape == image.shape
    inside_left, inside_right, outside = preview[80, 50], preview[80, 150], preview[115, 100]
    assert np.array_equal(outside, image[115, 100])
    assert not np.array_equal(inside_left, image[80, 50]) and not np.array_equal(inside_right, image[80, 150])
    assert not np.array_equal(inside_left, inside_right)  # one colour per person
