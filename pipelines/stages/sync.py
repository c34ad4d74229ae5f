"""Stage 6: audio-visual sync per person. With SyncNet weights configured: Sync-C, Sync-D and the AV offset as
joonson/syncnet_python's `SyncNetInstance.evaluate` computes them; otherwise the best correlation between the
person's audio energy and their mouth motion over a range of offsets (the binding signal of stage 5)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.mfcc import mfcc
from evaluation.syncnet import LIP_FRAMES, MFCC_PER_FRAME, MFCC_WINDOW, SyncNet, face_crops, load_syncnet
from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import AUDIO_RATE, SAMPLE_FPS, RejectReason
from pipelines.stages.base import Stage, clip_frames

_INT16_SCALE = 32768  # syncnet_python reads 16-bit PCM: MFCC energies are on that scale


def sync_score(energy: np.ndarray, motion: np.ndarray, max_offset: int) -> tuple[float, int]:
    """(best Pearson correlation, its offset): the audio of frame t matches the mouth at frame t + offset."""
    best, best_offset = -1.0, 0
    for offset in range(-max_offset, max_offset + 1):
        audio = energy[max(0, -offset) : len(energy) - max(0, offset)]
        video = motion[max(0, offset) : len(motion) - max(0, -offset)]
        if len(audio) < 3 or audio.std() == 0 or video.std() == 0:
            continue
        correlation = float(np.corrcoef(audio, video)[0, 1])
        # Ties (a flat correlation curve) go to the smallest offset.
        if correlation > best + 1e-9 or (abs(correlation - best) <= 1e-9 and abs(offset) < abs(best_offset)):
            best, best_offset = correlation, offset
    return best, best_offset


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


class SyncStage(Stage):
    """Fills `sync_confidence`, `sync_offset` (and with SyncNet `sync_distance`) per person; rejects single and dual
    clips below the threshold. An actor holding the model when SyncNet is configured, a light task otherwise."""

    name = "sync"
    num_cpus = 0.5  # the correlation is light signal work and shares a core; SyncNet actors take the sync config's

    def __init__(self, config: CurationConfig) -> None:
        self.config = config.sync
        self.syncnet: SyncNet | None = None
        if config.sync.syncnet_path:
            on_gpu = config.sync.num_gpus > 0 and torch.cuda.is_available()
            self.device = torch.device("cuda" if on_gpu else "cpu")
            self.syncnet = load_syncnet(config.sync.syncnet_path, self.device)

    def process(self, clip: Clip) -> None:
        if clip.kind == "multi_event":
            return
        if self.syncnet is None:
            self._correlate(clip)
            threshold = self.config.min_confidence
        else:
            self._syncnet(clip)
            threshold = self.config.min_syncnet_confidence
        clip.scores.update(sync_confidence=min(clip.sync_confidence), sync_offset=float(np.mean(clip.sync_offset)))
        if min(clip.sync_confidence) < threshold:
            clip.reject(self.name, RejectReason.LOW_SYNC, f"sync scores {[round(s, 2) for s in clip.sync_confidence]}")

    def _correlate(self, clip: Clip) -> None:
        frames = clip.person_audio.reshape(len(clip.person_audio), clip.num_frames, AUDIO_RATE // SAMPLE_FPS)
        energy = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=2))
        scores = [
            sync_score(energy[p], clip.mouth_motion[p], self.config.max_offset_frames) for p in range(len(energy))
        ]
        clip.sync_source = "correlation"
        clip.sync_confidence = [score for score, _ in scores]
        clip.sync_offset = [offset for _, offset in scores]

    def _syncnet(self, clip: Clip) -> None:
        frames = clip_frames(clip)
        # syncnet_python scores a face against the whole soundtrack; with several persons each face is scored
        # against its own stream, as the two-person Sync-C of the MultiTalk paper scores each half with its audio.
        streams = [clip.audio] if len(clip.tracks) == 1 else list(clip.person_audio)
        results = [
            offset_and_confidence(self._distances(face_crops(frames, track), stream), self.config.syncnet_vshift)
            for track, stream in zip(clip.tracks, streams, strict=False)
        ]
        clip.sync_source = "syncnet"
        clip.sync_offset = [offset for offset, _, _ in results]
        clip.sync_confidence = [confidence for _, confidence, _ in results]
        clip.sync_distance = [distance for _, _, distance in results]
        clip.scores["sync_distance"] = max(clip.sync_distance)

    @torch.inference_mode()
    def _distances(self, crops: np.ndarray, wave: np.ndarray) -> np.ndarray:
        """The distance table of one face track [T, 224, 224, 3] (BGR) and its 16 kHz audio."""
        pcm = np.clip(np.round(wave * _INT16_SCALE), -_INT16_SCALE, _INT16_SCALE - 1)
        cepstra = torch.from_numpy(mfcc(pcm, AUDIO_RATE).T.copy()).float().to(self.device)  # [13, 4T - 1]
        lips = torch.from_numpy(crops).to(self.device).permute(3, 0, 1, 2).float()  # [3, T, 224, 224]
        # As the reference: the last window that would fit is left out (it stops at T - 5).
        num_windows = min(len(crops), len(wave) // (AUDIO_RATE // SAMPLE_FPS)) - LIP_FRAMES
        if num_windows < 1:
            raise ValueError(f"SyncNet needs more than {LIP_FRAMES} frames, the clip has {len(crops)}")
        lip_features, audio_features = [], []
        for first in range(0, num_windows, self.config.syncnet_batch_size):
            starts = range(first, min(num_windows, first + self.config.syncnet_batch_size))
            lip_features.append(self.syncnet.forward_lip(torch.stack([lips[:, t : t + LIP_FRAMES] for t in starts])))
            windows = [cepstra[None, :, MFCC_PER_FRAME * t : MFCC_PER_FRAME * t + MFCC_WINDOW] for t in starts]
            audio_features.append(self.syncnet.forward_aud(torch.stack(windows)))
        return distance_table(torch.cat(lip_features), torch.cat(audio_features), self.config.syncnet_vshift)
