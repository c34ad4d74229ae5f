"""Stage 3: face detection every few frames, IoU tracks interpolated over the clip, per-kind face filters, and
each person's mouth-region motion (the clip's motion score)."""

from __future__ import annotations

import numpy as np

from multitalk_model.faces import FaceDetector, MTCNNDetector, build_face_detector
from pipelines.config import CurationConfig, FacesConfig
from pipelines.record import Clip
from pipelines.schema import RejectReason
from pipelines.stages.base import Stage

_REQUIRED_FACES = {"single": 1, "dual": 2}  # multi_event (image-to-video) takes any number


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two xyxy boxes."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def track_faces(detections: list[list[np.ndarray]], min_iou: float) -> list[dict[int, np.ndarray]]:
    """Greedy IoU tracking: detections[k] are the boxes of the k-th detected frame; tracks map k -> box."""
    tracks: list[dict[int, np.ndarray]] = []
    for k, boxes in enumerate(detections):
        # A track survives one missed detection (a blink of the detector, a hand passing the face).
        open_tracks = [track for track in tracks if max(track) >= k - 2]
        pairs = sorted(
            (
                (box_iou(track[max(track)], box), t, b)
                for t, track in enumerate(open_tracks)
                for b, box in enumerate(boxes)
            ),
            reverse=True,
        )
        used_tracks, used_boxes = set(), set()
        for iou, t, b in pairs:
            if iou < min_iou or t in used_tracks or b in used_boxes:
                continue
            open_tracks[t][k] = boxes[b]
            used_tracks.add(t)
            used_boxes.add(b)
        tracks.extend({k: box} for b, box in enumerate(boxes) if b not in used_boxes)
    return tracks


def mouth_motion(gray: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """[T] mean absolute grey-level change between consecutive frames in the lower middle of each face box."""
    motion = np.zeros(len(gray), dtype=np.float32)
    height, width = gray.shape[1:]
    for t in range(1, len(gray)):
        x0, y0, x1, y1 = boxes[t]
        face_w, face_h = x1 - x0, y1 - y0
        # The mouth sits in the lower half of a face box, in its middle 60 %.
        left, right = int(max(0, x0 + 0.2 * face_w)), int(min(width, x1 - 0.2 * face_w))
        top, bottom = int(max(0, y0 + 0.5 * face_h)), int(min(height, y1))
        if right > left and bottom > top:
            motion[t] = np.abs(gray[t, top:bottom, left:right] - gray[t - 1, top:bottom, left:right]).mean()
    motion[0] = motion[1] if len(motion) > 1 else 0.0
    return motion


def build_detector(config: FacesConfig) -> FaceDetector:
    """The configured detector; MTCNN gets the minimum face size of the detection resolution."""
    if config.detector == "mtcnn" or (config.detector == "auto" and not config.insightface_pack):
        return MTCNNDetector(min_face_size=config.min_face_size)
    return build_face_detector(config.detector, config.insightface_pack)


class FaceStage(Stage):
    """Actor: holds the detector. Fills `tracks` [P, T, 4] (clip pixels, left to right) and `mouth_motion` [P, T]."""

    name = "faces"  # its CPUs and actor count come from the faces config

    def __init__(self, config: CurationConfig) -> None:
        self.config = config.faces
        self.detector = build_detector(config.faces)

    def process(self, clip: Clip) -> None:
        frames, clip.detect_frames = clip.detect_frames, None
        num_frames = len(frames)
        detected_at = sorted({*range(0, num_frames, self.config.detect_every), num_frames - 1})
        detections = [[np.asarray(face.box) for face in self.detector.detect(frames[t])] for t in detected_at]
        tracks = [
            track
            for track in track_faces(detections, self.config.track_iou)
            if len(track) >= self.config.min_track_coverage * len(detected_at)
        ]
        if clip.kind == "auto":
            self._decide_kind(clip, len(tracks))
            if clip.rejected:
                return
        required = _REQUIRED_FACES.get(clip.kind)
        if required is not None and len(tracks) != required:
            clip.reject(self.name, RejectReason.FACE_COUNT, f"{clip.kind} needs {required} faces, found {len(tracks)}")
            return
        boxes = np.stack([self._interpolate(track, detected_at, num_frames) for track in tracks]) if tracks else None
        if boxes is None:
            clip.tracks, clip.mouth_motion = np.zeros((0, num_frames, 4)), np.zeros((0, num_frames))
            return
        boxes = boxes[np.argsort(boxes[:, :, [0, 2]].mean(axis=(1, 2)))]  # persons left to right
        face_size = float(np.median(boxes[:, :, 3] - boxes[:, :, 1], axis=1).min()) / frames.shape[1]
        stability = min(self._stability(track) for track in tracks)
        clip.scores.update(face_size=face_size, face_stability=stability)
        if required is not None and face_size < self.config.min_face_fraction:
            clip.reject(self.name, RejectReason.SMALL_FACE, f"face height {face_size:.3f} of the frame")
            return
        if required is not None and stability < self.config.min_stability:
            clip.reject(self.name, RejectReason.UNSTABLE_FACE, f"track IoU {stability:.2f}")
            return
        gray = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        clip.mouth_motion = np.stack([mouth_motion(gray, person) for person in boxes])
        clip.tracks = boxes * clip.detect_scale
        clip.scores["motion"] = float(clip.mouth_motion.mean())

    @staticmethod
    def _decide_kind(clip: Clip, num_tracks: int) -> None:
        """`default_kind: auto`: one steady face makes a single-speaker clip, two a conversation; whether they speak
        is for the speaker and sync stages to judge, as for a given kind."""
        kinds = {count: kind for kind, count in _REQUIRED_FACES.items()}
        if num_tracks not in kinds:
            detail = f"auto: {num_tracks} face tracks, neither single (1) nor dual (2)"
            clip.reject("faces", RejectReason.FACE_COUNT, detail)
            return
        clip.kind = kinds[num_tracks]
        clip.kind_reason = f"auto: {num_tracks} face track{'s' if num_tracks > 1 else ''}"

    @staticmethod
    def _interpolate(track: dict[int, np.ndarray], detected_at: list[int], num_frames: int) -> np.ndarray:
        """[T, 4] boxes: linear between detections, held constant before the first and after the last."""
        known = sorted(track)
        times = np.array([detected_at[k] for k in known], dtype=np.float64)
        boxes = np.stack([track[k] for k in known])
        frames = np.arange(num_frames)
        return np.stack([np.interp(frames, times, boxes[:, c]) for c in range(4)], axis=1)

    @staticmethod
    def _stability(track: dict[int, np.ndarray]) -> float:
        known = sorted(track)
        ious = [box_iou(track[a], track[b]) for a, b in zip(known, known[1:], strict=False)]
        return float(np.mean(ious)) if ious else 1.0
