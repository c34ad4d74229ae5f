"""Person regions on the reference image: resolution buckets, boxes, region masks and their preview.

Pure geometry on numpy arrays. Boxes are (x0, y0, x1, y1) in source pixels; persons are numbered left to right.
"""

from __future__ import annotations

import logging
import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # geometry only: importing the detectors (torch) is left to callers that detect
    from multitalk_model.faces import Face, FaceDetector

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels

# Aspect-ratio buckets of the reference (MeiGen-AI/MultiTalk wan/utils/multitalk_utils.py), copied as they are:
# key = height / width, value = ([height, width], 1). 627 is the 480p family (about 640x640 pixels of area),
# 960 the 720p family (about 960x960).
ASPECT_RATIO_627 = {
     '0.26': ([320, 1216], 1), '0.38': ([384, 1024], 1), '0.50': ([448, 896], 1), '0.67': ([512, 768], 1),
     '0.82': ([576, 704], 1),  '1.00': ([640, 640], 1),  '1.22': ([704, 576], 1), '1.50': ([768, 512], 1),
     '1.86': ([832, 448], 1),  '2.00': ([896, 448], 1),  '2.50': ([960, 384], 1), '2.83': ([1088, 384], 1),
     '3.60': ([1152, 320], 1), '3.80': ([1216, 320], 1), '4.00': ([1280, 320], 1)}  # fmt: skip


ASPECT_RATIO_960 = {
     '0.22': ([448, 2048], 1), '0.29': ([512, 1792], 1), '0.36': ([576, 1600], 1), '0.45': ([640, 1408], 1),
     '0.55': ([704, 1280], 1), '0.63': ([768, 1216], 1), '0.76': ([832, 1088], 1), '0.88': ([896, 1024], 1),
     '1.00': ([960, 960], 1), '1.14': ([1024, 896], 1), '1.31': ([1088, 832], 1), '1.50': ([1152, 768], 1),
     '1.58': ([1216, 768], 1), '1.82': ([1280, 704], 1), '1.91': ([1344, 704], 1), '2.20': ([1408, 640], 1),
     '2.30': ([1472, 640], 1), '2.67': ([1536, 576], 1), '2.89': ([1664, 576], 1), '3.62': ([1856, 512], 1),
     '3.75': ([1920, 512], 1)}  # fmt: skip

_BUCKETS = {"480p": ASPECT_RATIO_627, "720p": ASPECT_RATIO_960}

# The reference's default person regions: each half of the image shrunk by this fraction on every side.
_HALF_MARGIN = 0.05


def target_size(height: int, width: int, size: Literal["480p", "720p"]) -> tuple[int, int]:
    """The (height, width) of the reference's bucket nearest to this aspect ratio (ties: the first listed)."""
    if size not in _BUCKETS:
        raise ValueError(f"size: {size!r} is not one of {sorted(_BUCKETS)}")
    buckets = _BUCKETS[size]
    ratio = height / width
    nearest = min(buckets, key=lambda key: abs(float(key) - ratio))
    bucket_height, bucket_width = buckets[nearest][0]
    return bucket_height, bucket_width


def resize_and_center_crop(image: np.ndarray, size_hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an HxW[xC] array to cover size_hw, then crop its centre: the same geometry for an image and its masks.

    Bilinear (PIL, as the reference does for the image) needs a uint8 HxW, HxWx3 or HxWx4 image; nearest works on
    any dtype and channel count (masks: move their person axis last first).
    """
    target_h, target_w = size_hw
    src_h, src_w = image.shape[:2]
    # Scale to cover, sizes rounded up, centre offsets rounded (torchvision's center_crop): as the reference.
    scale = max(target_h / src_h, target_w / src_w)
    resized_h, resized_w = math.ceil(scale * src_h), math.ceil(scale * src_w)
    if nearest:
        # Sample at pixel centres, the same grid as the bilinear resize, so a mask stays on its image. (The
        # reference uses torch's legacy "nearest", which shifts masks by up to half a pixel.)
        rows = np.minimum(((np.arange(resized_h) + 0.5) * src_h / resized_h).astype(np.int64), src_h - 1)
        cols = np.minimum(((np.arange(resized_w) + 0.5) * src_w / resized_w).astype(np.int64), src_w - 1)
        resized = image[rows][:, cols]
    else:
        if image.dtype != np.uint8 or not (image.ndim == 2 or image.shape[2] in (3, 4)):
            raise ValueError(
                f"image: bilinear resize needs a uint8 HxW, HxWx3 or HxWx4 array, got shape {image.shape} "
                f"dtype {image.dtype}; pass nearest=True for masks"
            )
        resized = np.asarray(Image.fromarray(image).resize((resized_w, resized_h), resample=Image.BILINEAR))
    top = int(round((resized_h - target_h) / 2.0))
    left = int(round((resized_w - target_w) / 2.0))
    return resized[top : top + target_h, left : left + target_w]


def reference_resize_masks(masks: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Region masks [N, H, W] to size_hw with the reference's own geometry (wan/multitalk.py resize_and_centercrop
    on a tensor): torch's legacy "nearest" to cover, then the centre crop. It can shift a mask by up to half a pixel
    against the image (resize_and_center_crop keeps them aligned); the fixed halves use it to give the reference's
    masks exactly."""
    target_h, target_w = size_hw
    src_h, src_w = masks.shape[1:]
    scale = max(target_h / src_h, target_w / src_w)
    resized_h, resized_w = math.ceil(scale * src_h), math.ceil(scale * src_w)
    # torch's "nearest": source index floor(i * (in / out)), both factors float32, clamped to the last pixel.
    rows, cols = (
        np.minimum(np.floor(np.arange(out, dtype=np.float32) * (np.float32(size) / np.float32(out))), size - 1).astype(
            np.int64
        )
        for size, out in ((src_h, resized_h), (src_w, resized_w))
    )
    resized = masks[:, rows][:, :, cols]
    top = int(round((resized_h - target_h) / 2.0))
    left = int(round((resized_w - target_w) / 2.0))
    return resized[:, top : top + target_h, left : left + target_w]


def validate_box(box: Box, image_size_hw: tuple[int, int], name: str) -> None:
    """Raise ValueError naming `name` when a box is malformed, empty, outside the image or covers all of it."""
    height, width = image_size_hw
    if len(box) != 4 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box):
        raise ValueError(f"{name}: expected four finite numbers [x0, y0, x1, y1], got {list(box)}")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{name}: box {list(box)} is empty (needs x0 < x1 and y0 < y1)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(f"{name}: box {list(box)} reaches outside the {width}x{height} image")
    # A region over the whole image leaves no background, whose mask must not be empty (its attention is
    # averaged over the mask).
    if x0 <= 0 and y0 <= 0 and x1 >= width and y1 >= height:
        raise ValueError(f"{name}: box {list(box)} covers the whole {width}x{height} image, leaving no background")


def official_bbox_to_box(bbox: list[float] | tuple[float, ...]) -> Box:
    """The official input JSON's "bbox" [y0, x0, y1, x1] (row/col, whatever the names say) -> (x0, y0, x1, y1)."""
    if len(bbox) != 4:
        raise ValueError(f"bbox: expected [y0, x0, y1, x1], got {list(bbox)}")
    y0, x0, y1, x1 = (float(v) for v in bbox)
    return (x0, y0, x1, y1)


def default_halves(image_size_hw: tuple[int, int], num_persons: int) -> list[Box]:
    """The reference's default regions (left and right halves, 5% margins) generalised to N equal columns."""
    if num_persons < 1:
        raise ValueError(f"num_persons: must be at least 1, got {num_persons}")
    height, width = image_size_hw
    column = width // num_persons
    rows = (height * _HALF_MARGIN, height * (1 - _HALF_MARGIN))
    return [
        (i * column + column * _HALF_MARGIN, rows[0], i * column + column * (1 - _HALF_MARGIN), rows[1])
        for i in range(num_persons)
    ]


# How far a person reaches around their face, in face widths / heights. A talking person's motion (head turns,
# nods, shoulders, gesturing hands) happens around and mostly below the face, and the region is what that
# person's audio is bound to: it must cover head, hair, shoulders and upper torso, not only the face box.
_SIDE_WIDTHS = 1.0
_ABOVE_HEIGHTS = 0.6
_BELOW_HEIGHTS = 3.5


def person_region_from_face(face: Face, image_size_hw: tuple[int, int]) -> Box:
    """Grow a face box into a head-and-torso region, clipped to the image."""
    height, width = image_size_hw
    x0, y0, x1, y1 = face.box
    return (
        max(0.0, x0 - _SIDE_WIDTHS * face.width),
        max(0.0, y0 - _ABOVE_HEIGHTS * face.height),
        min(float(width), x1 + _SIDE_WIDTHS * face.width),
        min(float(height), y1 + _BELOW_HEIGHTS * face.height),
    )


def _split_neighbours(regions: list[Box], anchors: list[Box]) -> list[Box]:
    """Cut overlapping neighbours (sorted left to right) midway through the gap between their anchors (faces)."""
    cuts = [(left[2] + right[0]) / 2 for left, right in zip(anchors, anchors[1:], strict=False)]
    # Non-decreasing cuts keep non-neighbours apart too, even when anchors overlap horizontally.
    cuts = np.maximum.accumulate(cuts).tolist() if cuts else []
    split = []
    for i, (x0, y0, x1, y1) in enumerate(regions):
        if i > 0:
            x0 = max(x0, cuts[i - 1])
        if i < len(cuts):
            x1 = min(x1, cuts[i])
        split.append((x0, y0, x1, y1))
    return split


def _faces_and_halves(faces: list[Face], image_size_hw: tuple[int, int], num_persons: int) -> list[Box]:
    """Fewer faces than persons: each face takes the column it sits in (the larger face when two share one); the
    other persons keep their default column, anchored at its centre line, so the cuts go around the faces."""
    halves = default_halves(image_size_hw, num_persons)
    column = image_size_hw[1] // num_persons
    anchors: dict[int, Box] = {}
    regions: dict[int, Box] = {}
    for face in sorted(faces, key=lambda face: face.area, reverse=True):
        index = min(int(face.center[0] // column), num_persons - 1)
        if index in anchors:
            logger.warning("two faces share column %d of %d: keeping the larger one", index + 1, num_persons)
            continue
        anchors[index] = face.box
        regions[index] = person_region_from_face(face, image_size_hw)
    for index, (x0, y0, x1, y1) in enumerate(halves):
        if index not in anchors:
            anchors[index] = ((x0 + x1) / 2, y0, (x0 + x1) / 2, y1)
            regions[index] = halves[index]
    order = range(num_persons)
    return _split_neighbours([regions[i] for i in order], [anchors[i] for i in order])


def locate_persons(image: np.ndarray, num_persons: int, detector: FaceDetector) -> tuple[list[Box], str]:
    """Person regions from faces, left to right, and where they came from: "faces", "faces+halves" or "halves"."""
    if num_persons < 1:
        raise ValueError(f"num_persons: must be at least 1, got {num_persons}")
    image_size_hw = image.shape[:2]
    # With more faces than persons the largest win (background people, posters, reflections are smaller).
    faces = sorted(detector.detect(image), key=lambda face: face.area, reverse=True)[:num_persons]
    faces.sort(key=lambda face: face.center[0])
    if not faces:
        logger.warning("face detection found no face: using the default left/right regions for %d persons", num_persons)
        return default_halves(image_size_hw, num_persons), "halves"
    if len(faces) < num_persons:
        logger.warning(
            "face detection found %d faces for %d persons: the others get default column regions",
            len(faces),
            num_persons,
        )
        return _faces_and_halves(faces, image_size_hw, num_persons), "faces+halves"
    regions = [person_region_from_face(face, image_size_hw) for face in faces]
    return _split_neighbours(regions, [face.box for face in faces]), "faces"


def region_masks(boxes: list[Box], image_size_hw: tuple[int, int]) -> np.ndarray:
    """float32 [N + 1, H, W]: one rectangle per person, then the background (the rest); all ones for one person."""
    height, width = image_size_hw
    if len(boxes) == 1:
        # The reference's single-person convention: no localisation, every region is the whole frame.
        return np.ones((2, height, width), dtype=np.float32)
    masks = np.zeros((len(boxes) + 1, height, width), dtype=np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        # Truncated like the reference's int() indexing.
        masks[i, max(int(y0), 0) : min(int(y1), height), max(int(x0), 0) : min(int(x1), width)] = 1.0
    masks[-1] = masks[:-1].max(axis=0) == 0
    return masks


_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_regions_preview(image: np.ndarray, boxes: list[Box], path: str | Path) -> Path:
    """Write a PNG of the image with each person's region tinted, outlined and labelled "person i"."""
    base = Image.fromarray(image).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    line_width = max(2, min(base.size) // 200)
    font = ImageFont.load_default(size=max(12, min(base.size) // 25))
    for i, box in enumerate(boxes):
        colour = _COLOURS[i % len(_COLOURS)]
        draw.rectangle(box, fill=colour + (60,), outline=colour + (255,), width=line_width)
        label_at = (box[0] + 2 * line_width, box[1] + 2 * line_width)
        label = f"person {i + 1}"
        draw.text(label_at, label, fill=colour + (255,), font=font, stroke_width=line_width, stroke_fill="white")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.alpha_composite(base, overlay).convert("RGB").save(path, format="PNG")
    return path
