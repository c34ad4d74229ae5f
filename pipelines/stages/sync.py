"""Stage 6: audio-visual sync per person. With SyncNet weights configured: Sync-C, Sync-D and the AV offset as
joonson/syncnet_python's `SyncNetInstance.evaluate` computes them; otherwise the offline lip-sync score of
evaluation.lipsync (dlib landmarks, no weights to download). A dual clip's streams must also bind to their own
persons in the persons x streams matrix of evaluation.binding."""

from __future__ import annotations

import numpy as np
import torch

from evaluation.binding import bind, binding_matrix
from evaluation.lipsync import speech_signal, sync_score
from evaluation.syncnet import SyncNet, load_syncnet, syncnet_score
from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import RejectReason
from pipelines.stages.base import Stage, clip_frames, lip_motion


class SyncStage(Stage):
    """Fills `sync_confidence`, `sync_offset` (and with SyncNet `sync_distance`) per person; rejects single and dual
    clips below the threshold. An actor holding the model when SyncNet is configured, a light task otherwise."""

    name = "sync"
    num_cpus = 0.5  # the speakers stage fitted the landmarks: light signal work; SyncNet actors take the config's

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
            self._landmarks(clip)
            threshold = self.config.min_confidence
        else:
            self._syncnet(clip)
            threshold = self.config.min_syncnet_confidence
        clip.scores.update(sync_confidence=min(clip.sync_confidence), sync_offset=float(np.mean(clip.sync_offset)))
        if min(clip.sync_confidence) < threshold and not clip.rejected:
            clip.reject(self.name, RejectReason.LOW_SYNC, f"sync scores {[round(s, 2) for s in clip.sync_confidence]}")

    def _landmarks(self, clip: Clip) -> None:
        motion = lip_motion(clip)
        streams = [clip.audio] if len(clip.tracks) == 1 else list(clip.person_audio)
        speech = np.stack([speech_signal(stream, clip.num_frames) for stream in streams])
        max_offset = self.config.max_offset_frames
        scores = [sync_score(motion[p], speech[p], max_offset) for p in range(len(streams))]
        clip.sync_source = "landmarks"
        clip.sync_confidence = [score.confidence for score in scores]
        clip.sync_offset = [score.offset_frames for score in scores]
        if len(streams) > 1:
            binding = bind(binding_matrix(motion, speech, max_offset))
            clip.scores["binding_accuracy"] = binding.accuracy
            if binding.accuracy < 1:
                detail = f"streams bind to persons {binding.assignment}, not in order"
                clip.reject(self.name, RejectReason.SPEAKER_NOT_BOUND, detail)

    def _syncnet(self, clip: Clip) -> None:
        frames = clip_frames(clip)
        # syncnet_python scores a face against the whole soundtrack; with several persons each face is scored
        # against its own stream, as the two-person Sync-C of the MultiTalk paper scores each half with its audio.
        streams = [clip.audio] if len(clip.tracks) == 1 else list(clip.person_audio)
        vshift, batch_size = self.config.syncnet_vshift, self.config.syncnet_batch_size
        results = [
            syncnet_score(self.syncnet, frames, track, stream, vshift, batch_size)
            for track, stream in zip(clip.tracks, streams, strict=False)
        ]
        clip.sync_source = "syncnet"
        clip.sync_offset = [result.offset for result in results]
        clip.sync_confidence = [result.sync_c for result in results]
        clip.sync_distance = [result.sync_d for result in results]
        clip.scores["sync_distance"] = max(clip.sync_distance)
