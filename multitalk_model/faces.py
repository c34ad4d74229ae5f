"""Face detectors behind one interface: `detect(rgb_uint8_image) -> list[Face]`, largest face first.

MTCNN is the default because its weights ship inside the facenet-pytorch wheel, so it works offline; the
networks and the cascade are ported here from facenet-pytorch (`models/mtcnn.py`, `models/utils/detect_face.py`)
because importing that package needs torchvision. insightface's SCRFD is used when a local model pack is given.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .regions import FACE_DETECTOR_KINDS, FaceDetectorKind


@dataclass(frozen=True)
class Face:
    """One detected face: a box in source pixels and the detector's confidence."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


class FaceDetector(Protocol):
    """What generation and curation need from a detector."""

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image, largest first."""
        ...


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected an HxWx3 uint8 RGB array, got shape {image.shape} dtype {image.dtype}")


def _largest_first(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda face: face.area, reverse=True)


# ----------------------------------------------------------------------------------------------------- MTCNN


class _PNet(nn.Module):
    """Proposal net: fully convolutional, scores every 12x12 window of one pyramid level."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


class _RNet(nn.Module):
    """Refine net: rescores and regresses 24x24 crops of the P-Net proposals."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The weights were converted from Caffe/TF: flatten in (W, H, C) order as they expect.
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class _ONet(nn.Module):
    """Output net: final score and box of 48x48 crops (its landmark head is loaded but unused here)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), F.softmax(self.dense6_1(x), dim=1)


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: Literal["union", "min"]) -> torch.Tensor:
    """Greedy NMS; returns kept indices, best score first.

    "union" is torchvision's `nms` (continuous areas, IoU); "min" is facenet-pytorch's final-stage numpy NMS
    (inclusive pixel areas, overlap over the smaller box), which also drops a small box nested in a big one.
    """
    x0, y0, x1, y1 = boxes.unbind(1)
    one = 1.0 if mode == "min" else 0.0
    areas = (x1 - x0 + one) * (y1 - y0 + one)
    order = torch.argsort(scores, descending=True)
    keep = []
    while order.numel() > 0:
        i, rest = order[0], order[1:]
        keep.append(i)
        inter_w = (torch.minimum(x1[i], x1[rest]) - torch.maximum(x0[i], x0[rest]) + one).clamp(min=0)
        inter_h = (torch.minimum(y1[i], y1[rest]) - torch.maximum(y0[i], y0[rest]) + one).clamp(min=0)
        inter = inter_w * inter_h
        if mode == "min":
            overlap = inter / torch.minimum(areas[i], areas[rest])
        else:
            overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return torch.stack(keep) if keep else torch.empty(0, dtype=torch.long, device=boxes.device)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (facenet's `rerec`)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    boxes = boxes.clone()
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply a net's box regression, in units of the (inclusive) box size (facenet's `bbreg`)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes = boxes.clone()
    boxes[:, :4] = boxes[:, :4] + offsets * torch.stack([w, h, w, h], dim=1)
    return boxes


def _clipped_corners(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer corners clipped to the image, 1-based inclusive like facenet's `pad`: [N, 4] (x0, y0, x1, y1)."""
    corners = boxes[:, :4].trunc().long()
    corners[:, :2] = corners[:, :2].clamp(min=1)
    corners[:, 2] = corners[:, 2].clamp(max=width)
    corners[:, 3] = corners[:, 3].clamp(max=height)
    return corners


def _on_image(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes that leave a non-empty crop once clipped. facenet skips the others while cropping, which misaligns
    its scores with its boxes; dropping them first keeps the two in step."""
    corners = _clipped_corners(boxes, height, width)
    return boxes[(corners[:, 3] > corners[:, 1] - 1) & (corners[:, 2] > corners[:, 0] - 1)]


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut each (on-image) box and resample it to size x size, normalised as the nets expect."""
    height, width = image.shape[2:]
    crops = [
        F.interpolate(image[:, :, y0 - 1 : y1, x0 - 1 : x1], size=(size, size), mode="area")
        for x0, y0, x1, y1 in _clipped_corners(boxes, height, width).tolist()
    ]
    return (torch.cat(crops) - 127.5) * 0.0078125


def _in_batches(net: nn.Module, crops: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a refinement net in fixed batches so thousands of proposals do not blow up memory."""
    outputs = [net(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def _mtcnn_weights_dir() -> Path:
    """The folder of the MTCNN weights inside the installed facenet-pytorch wheel (found without importing it)."""
    install_hint = "pip install --no-deps facenet-pytorch"
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MTCNN weights: facenet-pytorch is not installed; run `{install_hint}`")
    data_dir = Path(spec.submodule_search_locations[0]) / "data"
    missing = [name for name in ("pnet.pt", "rnet.pt", "onet.pt") if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"MTCNN weights: {', '.join(missing)} missing in {data_dir}; run `{install_hint}`")
    return data_dir


class MTCNNDetector:
    """MTCNN (P-Net, R-Net, O-Net cascade), faithful to facenet-pytorch's `MTCNN.detect` with `keep_all=True`."""

    def __init__(
        self,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        min_score: float = 0.9,  # above O-Net's 0.7: keeps every true face of a group photo and drops hands, patterns
        device: str | torch.device = "cpu",
    ):
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.factor = factor
        self.min_score = min_score
        self.device = torch.device(device)
        data_dir = _mtcnn_weights_dir()
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for net, name in ((self.pnet, "pnet.pt"), (self.rnet, "rnet.pt"), (self.onet, "onet.pt")):
            net.load_state_dict(torch.load(data_dir / name, map_location="cpu", weights_only=True))
            net.to(self.device).eval()

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image, largest first."""
        _check_rgb(image)
        boxes = self._cascade(torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float().contiguous())
        faces = [Face(box=tuple(float(v) for v in row[:4]), score=float(row[4])) for row in boxes.cpu().tolist()]
        return _largest_first([face for face in faces if face.score >= self.min_score])

    def _cascade(self, image: torch.Tensor) -> torch.Tensor:
        """[1, 3, H, W] float in 0..255 -> [N, 5] boxes (x0, y0, x1, y1, score)."""
        height, width = image.shape[2:]
        empty = torch.zeros(0, 5, device=self.device)

        # Stage 1: P-Net over an image pyramid whose first level maps min_face_size onto P-Net's 12-pixel window.
        scale = 12.0 / self.min_face_size
        min_side = min(height, width) * scale
        proposals = []
        while min_side >= 12:
            level = F.interpolate(image, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
            offsets, probs = self.pnet((level - 127.5) * 0.0078125)
            level_boxes = self._proposals(offsets[0], probs[0, 1], scale)
            proposals.append(level_boxes[_nms(level_boxes[:, :4], level_boxes[:, 4], 0.5, "union")])
            scale *= self.factor
            min_side *= self.factor
        boxes = torch.cat(proposals) if proposals else torch.zeros(0, 9, device=self.device)
        boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], 0.7, "union")]
        if len(boxes) == 0:
            return empty
        size = (boxes[:, 2:4] - boxes[:, 0:2]).repeat(1, 2)
        boxes = torch.cat([boxes[:, :4] + boxes[:, 5:9] * size, boxes[:, 4:5]], dim=1)
        boxes = _on_image(_square(boxes), height, width)
        if len(boxes) == 0:
            return empty

        # Stage 2: R-Net on 24x24 crops.
        offsets, probs = _in_batches(self.rnet, _crops(image, boxes, 24))
        keep = probs[:, 1] > self.thresholds[1]
        boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
        offsets = offsets[keep]
        pick = _nms(boxes[:, :4], boxes[:, 4], 0.7, "union")
        boxes = _on_image(_square(_regress(boxes[pick], offsets[pick])), height, width)
        if len(boxes) == 0:
            return empty

        # Stage 3: O-Net on 48x48 crops, then overlap-over-smaller NMS to drop boxes nested in others.
        offsets, probs = _in_batches(self.onet, _crops(image, boxes, 48))
        keep = probs[:, 1] > self.thresholds[2]
        boxes = _regress(torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1), offsets[keep])
        return boxes[_nms(boxes[:, :4], boxes[:, 4], 0.7, "min")]

    def _proposals(self, offsets: torch.Tensor, face_prob: torch.Tensor, scale: float) -> torch.Tensor:
        """P-Net map -> [N, 9] source-pixel boxes: x0, y0, x1, y1, score, 4 offsets (facenet: generateBoundingBox)."""
        stride, cell = 2, 12
        mask = face_prob >= self.thresholds[0]
        cells = mask.nonzero().to(offsets.dtype).flip(1)  # (x, y) of each cell
        start = ((stride * cells + 1) / scale).floor()
        end = ((stride * cells + cell) / scale).floor()
        return torch.cat([start, end, face_prob[mask][:, None], offsets[:, mask].T], dim=1)


# ------------------------------------------------------------------------------------------------------ Haar


class HaarDetector:
    """OpenCV's frontal-face Haar cascade: weak (misses turned faces) but needs nothing beyond opencv-python < 5."""

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 30):
        cascade_dir = getattr(getattr(cv2, "data", None), "haarcascades", "")
        cascade_path = Path(cascade_dir) / "haarcascade_frontalface_default.xml"
        if not hasattr(cv2, "CascadeClassifier") or not cascade_path.is_file():
            raise RuntimeError(
                f"Haar cascade: {cascade_path} or cv2.CascadeClassifier is missing (opencv-python >= 5 dropped them); "
                "install opencv-python<5"
            )
        self.cascade = cv2.CascadeClassifier(str(cascade_path))
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size = min_size

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image, largest first (score 1.0: the cascade gives no confidence)."""
        _check_rgb(image)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        found = self.cascade.detectMultiScale(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(self.min_size, self.min_size)
        )
        faces = [Face(box=(float(x), float(y), float(x + w), float(y + h)), score=1.0) for x, y, w, h in found]
        return _largest_first(faces)


# ------------------------------------------------------------------------------------------------ insightface


class InsightFaceDetector:
    """insightface's SCRFD detector from a local model pack (e.g. buffalo_l/det_10g.onnx); never downloads."""

    def __init__(self, pack_dir: str, input_size: tuple[int, int] = (640, 640), min_score: float = 0.5):
        pack = Path(pack_dir).expanduser()
        # Packs name their detector det_*.onnx (buffalo_*) or scrfd_*.onnx (antelopev2).
        candidates = sorted(pack.glob("det_*.onnx")) + sorted(pack.glob("scrfd*.onnx")) if pack.is_dir() else []
        if not candidates:
            raise FileNotFoundError(
                f"insightface pack {pack}: no detector model (det_*.onnx or scrfd*.onnx) in that directory; "
                "unpack a model pack such as buffalo_l there"
            )
        from insightface.model_zoo import get_model

        self.model = get_model(str(candidates[0]), providers=["CPUExecutionProvider"])
        if getattr(self.model, "taskname", None) != "detection":
            raise ValueError(f"insightface pack {pack}: {candidates[0].name} is not a face detection model")
        self.model.prepare(ctx_id=-1, input_size=input_size, det_thresh=min_score)

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image, largest first."""
        _check_rgb(image)
        detections, _ = self.model.detect(np.ascontiguousarray(image[:, :, ::-1]))  # insightface expects BGR
        faces = [Face(box=tuple(float(v) for v in row[:4]), score=float(row[4])) for row in detections]
        return _largest_first(faces)


def build_face_detector(kind: FaceDetectorKind = "auto", insightface_pack: str | None = None) -> FaceDetector:
    """A face detector by name; "auto" is insightface when a pack is given, else MTCNN."""
    if kind == "auto":
        kind = "insightface" if insightface_pack else "mtcnn"
    if kind == "mtcnn":
        return MTCNNDetector()
    if kind == "haar":
        return HaarDetector()
    if kind == "insightface":
        if not insightface_pack:
            raise ValueError("insightface_pack: required when the face detector kind is 'insightface'")
        return InsightFaceDetector(insightface_pack)
    raise ValueError(f"face detector kind: {kind!r} is not one of {', '.join(FACE_DETECTOR_KINDS)}")
