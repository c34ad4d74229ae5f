"""SyncNet (Chung & Zisserman, "Out of time", ACCV 2016 workshops), the audio-visual sync model behind Sync-C and
Sync-D, as joonson/syncnet_python defines it (`SyncNetModel.py: S`), so that its released `syncnet_v2.model`
state dict loads unchanged: the layer names and the Sequential indices below are the checkpoint's keys.

Inputs, as `SyncNetInstance.evaluate` prepares them:
- lips: [N, 3, 5, 224, 224] float, 5 consecutive 25 fps BGR face crops (`face_crops`), pixel values 0..255;
- audio: [N, 1, 13, 20] float, the 13 MFCCs (`evaluation.mfcc`, 100 frames per second) of the same 0.2 s.
Both streams end in a 1024-d embedding; the distance between them is small where lips and audio agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.signal import medfilt
from torch import nn
from torch.nn import functional as F

from evaluation.mfcc import mfcc

LIP_FRAMES = 5  # video frames per lip window
CROP_SIZE = 224  # face crop side, pixels
MFCC_PER_FRAME = 4  # MFCC frames (100 per second) per video frame (25 per second)
MFCC_WINDOW = LIP_FRAMES * MFCC_PER_FRAME  # 20 MFCC frames = 0.2 s, the audio of one lip window
NUM_CEPSTRA = 13
AUDIO_RATE = 16000
SAMPLES_PER_FRAME = AUDIO_RATE // 25
_INT16_SCALE = 32768  # syncnet_python reads 16-bit PCM: MFCC energies are on that scale


def _conv_block(conv: nn.Module, channels: int, batch_norm: type[nn.Module]) -> list[nn.Module]:
    return [conv, batch_norm(channels), nn.ReLU(inplace=True)]


class SyncNet(nn.Module):
    """The two-stream SyncNet: `forward_lip` and `forward_aud` embed lip and audio windows into one space."""

    def __init__(self, embedding_dim: int = 1024) -> None:
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_conv_block(nn.Conv2d(1, 64, kernel_size=3, padding=1), 64, nn.BatchNorm2d),
            nn.MaxPool2d(kernel_size=1, stride=1),
            *_conv_block(nn.Conv2d(64, 192, kernel_size=3, padding=1), 192, nn.BatchNorm2d),
            nn.MaxPool2d(kernel_size=3, stride=(1, 2)),
            *_conv_block(nn.Conv2d(192, 384, kernel_size=3, padding=1), 384, nn.BatchNorm2d),
            *_conv_block(nn.Conv2d(384, 256, kernel_size=3, padding=1), 256, nn.BatchNorm2d),
            *_conv_block(nn.Conv2d(256, 256, kernel_size=3, padding=1), 256, nn.BatchNorm2d),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv_block(nn.Conv2d(256, 512, kernel_size=(5, 4)), 512, nn.BatchNorm2d),
        )
        self.netfcaud = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding_dim)
        )
        self.netfclip = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding_dim)
        )
        self.netcnnlip = nn.Sequential(
            *_conv_block(nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2)), 96, nn.BatchNorm3d),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv_block(
                nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), 256, nn.BatchNorm3d
            ),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *_conv_block(nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),
            *_conv_block(nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),
            *_conv_block(nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv_block(nn.Conv3d(256, 512, kernel_size=(1, 6, 6)), 512, nn.BatchNorm3d),
        )

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """[N, 1, 13, 20] MFCC windows -> [N, embedding_dim]."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, lips: torch.Tensor) -> torch.Tensor:
        """[N, 3, 5, 224, 224] BGR face-crop windows -> [N, embedding_dim]."""
        return self.netfclip(self.netcnnlip(lips).flatten(1))


def load_syncnet(path: str | os.PathLike, device: str | torch.device = "cpu") -> SyncNet:
    """A SyncNet in eval mode with the state dict at `path` (syncnet_python's `syncnet_v2.model` format)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot read SyncNet weights ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    model = SyncNet()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The released checkpoint predates BatchNorm's num_batches_tracked counter, which evaluation never reads.
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: not a SyncNet state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()


def face_crops(frames: np.ndarray, boxes: np.ndarray, crop_scale: float = 0.4) -> np.ndarray:
    """[T, 224, 224, 3] uint8 BGR face crops of RGB `frames` [T, H, W, 3] along a face track `boxes` [T, 4] (xyxy).

    As syncnet_python's `crop_video`: the box's half size and centre are median-filtered over 13 frames; the crop
    spans from half a box above the centre to 0.9 boxes below it, 0.7 boxes each side, with grey 110 where it
    leaves the frame.
    """
    if len(frames) != len(boxes):
        raise ValueError(f"face_crops: {len(frames)} frames but {len(boxes)} boxes")
    # A kernel longer than the track would take its medians among medfilt's zero padding: shorter tracks take
    # the longest odd kernel that fits.
    kernel = min(13, len(boxes) - (len(boxes) + 1) % 2)
    half = medfilt(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2, kernel)
    centre_x = medfilt((boxes[:, 0] + boxes[:, 2]) / 2, kernel)
    centre_y = medfilt((boxes[:, 1] + boxes[:, 3]) / 2, kernel)
    crops = np.empty((len(frames), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        size = half[t]
        pad = int(size * (1 + 2 * crop_scale))
        padded = np.pad(frame[..., ::-1], ((pad, pad), (pad, pad), (0, 0)), constant_values=110)
        y, x = centre_y[t] + pad, centre_x[t] + pad
        top, bottom = int(y - size), int(y + size * (1 + 2 * crop_scale))
        left, right = int(x - size * (1 + crop_scale)), int(x + size * (1 + crop_scale))
        crops[t] = cv2.resize(padded[top:bottom, left:right], (CROP_SIZE, CROP_SIZE))
    return crops


def distance_table(lip: torch.Tensor, audio: torch.Tensor, vshift: int) -> np.ndarray:
    """[N, 2 * vshift + 1] distances between lip window i and audio window i + k - vshift (syncnet_python's
    `calc_pdist`: audio windows beyond either end are zero vectors)."""
    padded = F.pad(audio, (0, 0, vshift, vshift))
    shifted = padded.unfold(0, 2 * vshift + 1, 1).transpose(1, 2)  # [N, 2v + 1, D]: window i holds i - v .. i + v
    return F.pairwise_distance(lip[:, None, :], shifted).cpu().numpy()


def offset_and_confidence(table: np.ndarray, vshift: int) -> tuple[int, float, float]:
    """(AV offset, Sync-C, Sync-D) of a distance table: the shift of the least mean distance, the median mean
    distance minus that least one, and the least one. A positive offset: the audio of frame t - offset goes with
    the lips of frame t."""
    mean_distance = table.mean(axis=0)
    best = int(np.argmin(mean_distance))
    minimum = float(mean_distance[best])
    return vshift - best, float(np.median(mean_distance)) - minimum, minimum


@dataclass(frozen=True)
class SyncNetScore:
    """Sync-C (confidence), Sync-D (least mean distance) and the AV offset of one face track and its audio."""

    sync_c: float
    sync_d: float
    offset: int  # positive: the audio of frame t - offset goes with the lips of frame t


@torch.inference_mode()
def syncnet_distances(model: SyncNet, crops: np.ndarray, wave: np.ndarray, vshift: int = 15, batch_size: int = 20):
    """The distance table of one face track's crops [T, 224, 224, 3] (BGR, `face_crops`) and its 16 kHz audio."""
    device = next(model.parameters()).device
    pcm = np.clip(np.round(wave * _INT16_SCALE), -_INT16_SCALE, _INT16_SCALE - 1)
    cepstra = torch.from_numpy(mfcc(pcm, AUDIO_RATE).T.copy()).float().to(device)  # [13, 4T - 1]
    lips = torch.from_numpy(crops).to(device).permute(3, 0, 1, 2).float()  # [3, T, 224, 224]
    # As the reference: the last window that would fit is left out (it stops at T - 5).
    num_windows = min(len(crops), len(wave) // SAMPLES_PER_FRAME) - LIP_FRAMES
    if num_windows < 1:
        raise ValueError(f"SyncNet needs more than {LIP_FRAMES} frames, the clip has {len(crops)}")
    lip_features, audio_features = [], []
    for first in range(0, num_windows, batch_size):
        starts = range(first, min(num_windows, first + batch_size))
        lip_features.append(model.forward_lip(torch.stack([lips[:, t : t + LIP_FRAMES] for t in starts])))
        windows = [cepstra[None, :, MFCC_PER_FRAME * t : MFCC_PER_FRAME * t + MFCC_WINDOW] for t in starts]
        audio_features.append(model.forward_aud(torch.stack(windows)))
    return distance_table(torch.cat(lip_features), torch.cat(audio_features), vshift)


def syncnet_score(
    model: SyncNet, frames: np.ndarray, boxes: np.ndarray, wave: np.ndarray, vshift: int = 15, batch_size: int = 20
) -> SyncNetScore:
    """Sync-C / Sync-D / offset of RGB `frames` [T, H, W, 3] along a face track `boxes` [T, 4] with 16 kHz audio,
    as syncnet_python's `SyncNetInstance.evaluate` computes them on the crops its `crop_video` writes."""
    table = syncnet_distances(model, face_crops(frames, boxes), wave, vshift, batch_size)
    offset, confidence, distance = offset_and_confidence(table, vshift)
    return SyncNetScore(sync_c=confidence, sync_d=distance, offset=offset)
