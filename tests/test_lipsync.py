"""Lip sync: SyncNet's Sync-C / Sync-D / offset equal to joonson/syncnet_python's `SyncNetInstance.evaluate` on the
same random weights and inputs; the offline landmark score finds a known offset, and on real media ranks a video's
own audio above another video's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.landmarks import face_tracks, mouth_signals
from evaluation.lipsync import SAMPLES_PER_FRAME, speech_signal, sync_score
from evaluation.mfcc import mfcc
from evaluation.syncnet import SyncNet, face_crops, syncnet_score
from multitalk_model.audio import load_speech
from multitalk_model.media import read_video_frames


def _syncnet_python_evaluate(model: SyncNet, crops: np.ndarray, audio: np.ndarray, vshift: int, batch_size: int):
    """SyncNetInstance.evaluate (joonson/syncnet_python, SyncNetInstance.py), from the frames it reads back from
    the crop video (BGR, cv2.imread) and the 16-bit audio (wavfile.read) on: python_speech_features.mfcc is
    evaluation.mfcc (tested equal in test_syncnet.py)."""
    im = np.expand_dims(np.stack(list(crops), axis=3), axis=0)  # [1, H, W, 3, T]
    im = np.transpose(im, (0, 3, 4, 1, 2))  # [1, 3, T, H, W]
    imtv = torch.from_numpy(im.astype(float)).float()
    cc = np.expand_dims(np.expand_dims(np.stack(list(zip(*mfcc(audio, 16000), strict=True))), axis=0), axis=0)
    cct = torch.from_numpy(cc.astype(float)).float()
    min_length = min(len(crops), math.floor(len(audio) / 640))
    lastframe = min_length - 5
    im_feat, cc_feat = [], []
    with torch.no_grad():
        for i in range(0, lastframe, batch_size):
            im_batch = [imtv[:, :, vframe : vframe + 5, :, :] for vframe in range(i, min(lastframe, i + batch_size))]
            im_feat.append(model.forward_lip(torch.cat(im_batch, 0)))
            cc_batch = [
                cct[:, :, :, vframe * 4 : vframe * 4 + 20] for vframe in range(i, min(lastframe, i + batch_size))
            ]
            cc_feat.append(model.forward_aud(torch.cat(cc_batch, 0)))
    im_feat, cc_feat = torch.cat(im_feat, 0), torch.cat(cc_feat, 0)
    # calc_pdist
    win_size = vshift * 2 + 1
    feat2p = torch.nn.functional.pad(cc_feat, (0, 0, vshift, vshift))
    dists = [
        torch.nn.functional.pairwise_distance(im_feat[[i], :].repeat(win_size, 1), feat2p[i : i + win_size, :])
        for i in range(len(im_feat))
    ]
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    offset = vshift - minidx
    conf = torch.median(mdist) - minval
    return int(offset), float(conf), float(minval)


def test_syncnet_scores_equal_syncnet_python_on_random_weights_and_inputs():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = SyncNet().eval()
    num_frames, vshift, batch_size = 12, 3, 4
    frames = rng.integers(0, 256, size=(num_frames, 96, 96, 3), dtype=np.uint8)
    boxes = np.tile([24.0, 20.0, 72.0, 68.0], (num_frames, 1)) + rng.normal(0, 1.5, size=(num_frames, 4))
    pcm = np.round(rng.normal(0, 3000, size=num_frames * 640 + 123)).clip(-32768, 32767).astype(np.int16)

    score = syncnet_score(model, frames, boxes, pcm / 32768.0, vshift=vshift, batch_size=5)

    offset, confidence, distance = _syncnet_python_evaluate(model, face_crops(frames, boxes), pcm, vshift, batch_size)
    assert score.offset == offset
    assert score.sync_c == pytest.approx(confidence, rel=1e-4, abs=1e-5)
    assert score.sync_d == pytest.approx(distance, rel=1e-5)


@pytest.mark.parametrize("lag", [2, 0, -1])
def test_offline_score_finds_a_known_lag_between_mouth_and_speech(lag):
    rng = np.random.default_rng(1)
    wave = (rng.normal(size=100 * SAMPLES_PER_FRAME) * np.repeat(rng.random(100) > 0.5, SAMPLES_PER_FRAME)) * 0.1
    speech = speech_signal(wave, 100)
    # The lips of frame t + lag move as fast as frame t's sound rises, falls and changes, and open as wide as its
    # formants are loud (a speed and a height: positive, in interocular distances).
    standard = (speech[:3] - speech[:3].mean(axis=1, keepdims=True)) / speech[:3].std(axis=1, keepdims=True)
    speed = 0.02 * np.exp(np.roll(standard[:2].sum(axis=0), lag) / 2 + 0.05 * rng.normal(size=100))
    opening = 0.1 + 0.02 * np.roll(standard[2], lag) + 0.001 * rng.normal(size=100)
    mouth = np.stack([speed, np.maximum(opening, 0)])

    score = sync_score(mouth, speech, max_offset=3)

    assert score.offset_frames == lag and score.confidence > 0.4


def test_offline_score_ranks_the_own_audio_above_another_videos(shared_media):
    video = shared_media / "talking_man_30fps.mp4"
    frames = read_video_frames(video, num_frames=100)
    motion = mouth_signals(face_tracks(frames, num_persons=1).landmarks)[0]

    own = sync_score(motion, speech_signal(load_speech(video), 100))
    other = sync_score(motion, speech_signal(load_speech(shared_media / "dubbing_speech_16k.wav"), 100))

    assert own.confidence > 0.3 > other.confidence
