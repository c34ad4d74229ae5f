"""Quality metrics on the shared real media: does the offline lip-sync score rank a video's own audio above other
videos' audio (AUC), next to the energy-motion correlation curation used before, on the same pairs; the binding of
the conversation's two halves; and how many seconds of video each metric scores per second of wall time.

    python benchmarks/quality.py [--media ../shared/media] [--threads 2]

Pairs: each single-speaker talking video with its own audio (in sync) and with every other audio (out of sync),
scored whole and per 81-frame clip (the curation unit). The conversation's audio is left out of the pairs: its
halves are two of these videos' own audio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.binding import bind, binding_matrix
from evaluation.identity import face_descriptors
from evaluation.landmarks import detect_tracks, landmarks_68, mouth_signals
from evaluation.lipsync import SAMPLES_PER_FRAME, shifted_correlations, speech_signal, sync_score
from evaluation.syncnet import SyncNet, syncnet_score
from multitalk_model.audio import load_speech
from multitalk_model.media import probe_media, read_video_frames
from pipelines.config import SyncConfig
from pipelines.stages.faces import mouth_motion as grey_mouth_motion

VIDEOS = [
    "talking_man_25fps.mp4",
    "talking_woman_25fps.mp4",
    "talking_man_30fps.mp4",
    "talking_portrait_hevc_30fps.mp4",
]
OTHER_AUDIO = ["dubbing_speech_16k.wav", "one_person_studio.wav", "two_speakers_16k.wav"]
CLIP_FRAMES = 81
MAX_FRAMES = 250  # the first 10 s of each video: the 20 s 1080p portrait alone would be 3 GB of decoded frames
OLD_MAX_OFFSET = 5  # the correlation's search range in curation's config before this change


def old_correlation_score(grey_motion: np.ndarray, wave: np.ndarray) -> float:
    """The sync score curation used before (pipelines/stages/sync.py at 8e15e5c): the best Pearson correlation,
    within 5 frames' offset, of the audio's RMS energy per frame and the grey-level change in the lower middle of
    the face box (`pipelines.stages.faces.mouth_motion`)."""
    num_frames = len(grey_motion)
    energy = np.sqrt(np.mean(np.square(wave[: num_frames * SAMPLES_PER_FRAME].reshape(num_frames, -1)), axis=1))
    return float(shifted_correlations(grey_motion, energy, OLD_MAX_OFFSET).max())


def auc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a positive outscores a negative (ties count half): the ROC AUC."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # progress shows while the slow parts run
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "media")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenCV threads (the CI machine has 2 CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    audio = {name: load_speech(args.media / name) for name in VIDEOS + OTHER_AUDIO}
    seconds = {"decode": 0.0, "face tracks (MTCNN)": 0.0, "landmarks (dlib 68)": 0.0, "offline sync score": 0.0}
    video_s = 0.0
    per_video = {}
    for name in VIDEOS:
        num_frames = min(MAX_FRAMES, int(probe_media(args.media / name).duration_s * 25))
        frames, elapsed = timed(read_video_frames, args.media / name, 25.0, 0.0, num_frames)
        seconds["decode"] += elapsed
        boxes, elapsed = timed(detect_tracks, frames, 1)
        seconds["face tracks (MTCNN)"] += elapsed
        landmarks, elapsed = timed(landmarks_68, frames, boxes)
        seconds["landmarks (dlib 68)"] += elapsed
        grey = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]).astype(np.float32)
        per_video[name] = (mouth_signals(landmarks)[0], grey_mouth_motion(grey, boxes[0]))
        video_s += len(frames) / 25
        print(f"{name}: {len(frames)} frames")
        del frames, grey  # a 20 s 1080p video is 3 GB of frames

    rows = {"whole video": ([], [], [], []), f"{CLIP_FRAMES}-frame clips": ([], [], [], [])}
    for name, (motion, grey_motion) in per_video.items():
        for audio_name, wave in audio.items():
            if audio_name != name and audio_name in VIDEOS and len(wave) < motion.shape[-1] * SAMPLES_PER_FRAME:
                continue
            num_frames = min(motion.shape[-1], len(wave) // SAMPLES_PER_FRAME)
            start = time.perf_counter()
            speech = speech_signal(wave, num_frames)
            score = sync_score(motion[:, :num_frames], speech).confidence
            seconds["offline sync score"] += time.perf_counter() - start
            windows = [(0, num_frames)] + [(s, s + CLIP_FRAMES) for s in range(0, num_frames - CLIP_FRAMES + 1, 40)]
            for index, (first, last) in enumerate(windows):
                key = "whole video" if index == 0 else f"{CLIP_FRAMES}-frame clips"
                clip_wave = wave[first * SAMPLES_PER_FRAME : last * SAMPLES_PER_FRAME]
                offline = (
                    score
                    if index == 0
                    else sync_score(motion[:, first:last], speech_signal(clip_wave, last - first)).confidence
                )
                old = old_correlation_score(grey_motion[first:last], clip_wave)
                own = audio_name == name
                rows[key][0 if own else 1].append(offline)
                rows[key][2 if own else 3].append(old)

    threshold = SyncConfig().min_confidence
    print("\nown audio vs another video's audio, ROC AUC (1 = every own pair above every swapped one)")
    print(f"{'pairs':22s} {'own':>5s} {'other':>6s} {'offline (landmarks)':>20s} {'old correlation':>16s}")
    for key, (own, other, old_own, old_other) in rows.items():
        print(f"{key:22s} {len(own):5d} {len(other):6d} {auc(own, other):20.3f} {auc(old_own, old_other):16.3f}")
        print(f"{'':22s} offline own {np.round(sorted(own), 2).tolist()}")
        print(f"{'':22s} offline other (top 8) {np.round(sorted(other)[-8:], 2).tolist()}")
        kept_own, kept_other = np.mean(np.array(own) >= threshold), np.mean(np.array(other) >= threshold)
        print(f"{'':22s} kept at curation's threshold {threshold}: own {kept_own:.0%}, other {kept_other:.0%}")

    # Binding: the conversation with its audio split at the turn, in order and swapped.
    conversation = args.media / "conversation_left_then_right.mp4"
    frames = read_video_frames(conversation)
    wave = load_speech(conversation)
    turn = int(5.04 * 16000)
    left, right = wave.copy(), wave.copy()
    left[turn:], right[:turn] = 0, 0
    start = time.perf_counter()
    boxes = detect_tracks(frames, 2)
    motion = mouth_signals(landmarks_68(frames, boxes))
    speech = np.stack([speech_signal(stream, len(frames)) for stream in (left, right)])
    binding = bind(binding_matrix(motion, speech))
    binding_s = time.perf_counter() - start
    swapped = bind(binding_matrix(motion, speech[::-1]))
    print(f"\nbinding on {conversation.name}: assignment {binding.assignment}, swapped streams {swapped.assignment}")
    print(f"matrix {np.round(binding.matrix, 3).tolist()}")

    # SyncNet (random weights: the cost is the same as the released model's) and identity on 2 s of one video.
    frames = read_video_frames(args.media / VIDEOS[0], num_frames=50)
    boxes = detect_tracks(frames, 1)[0]
    torch.manual_seed(0)
    model = SyncNet().eval()
    _, syncnet_s = timed(syncnet_score, model, frames, boxes, audio[VIDEOS[0]][: 50 * SAMPLES_PER_FRAME], 15, 50)
    landmarks = landmarks_68(frames[::25], boxes[None, ::25])
    _, identity_s = timed(face_descriptors, frames[::25], landmarks[0])

    print(f"\nseconds of video scored per second of wall time ({args.threads} threads), {video_s:.1f} s of video")
    for metric, elapsed in seconds.items():
        print(f"  {metric:28s} {video_s / elapsed:8.3g}")
    total = sum(seconds.values())
    print(f"  {'offline sync, end to end':28s} {video_s / total:8.3g}")
    print(f"  {'binding (2 persons, no decode)':28s} {10.04 / binding_s:8.3g}")
    print(f"  {'SyncNet (Sync-C/D, CPU)':28s} {2.0 / syncnet_s:8.3g}")
    print(f"  {'identity (1 descriptor/s)':28s} {2.0 / identity_s:8.3g}")


if __name__ == "__main__":
    main()
