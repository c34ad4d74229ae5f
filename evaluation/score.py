"""Score one talking video: offline lip sync against its audio, the binding of several audio streams to the persons,
identity against a reference image, mouth-landmark distance (and FID / FVD with configured Inception / I3D
weights) to a ground-truth video, and SyncNet's Sync-C/Sync-D with configured weights.

    python -m evaluation.score --video V.mp4 [--audio A ...] [--reference-image I.png] [--ground-truth G.mp4]
        [--syncnet-weights syncnet_v2.model] [--inception-weights inception.pt] [--i3d-weights i3d.pt] --json

The last line of the output is one JSON object (see `score_video`). An unreadable input, or a video without a
face, exits with code 2 and a message naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.binding import bind, binding_matrix
from evaluation.frechet import FVD_CLIP_FRAMES, fid, fvd, load_detector, video_clips
from evaluation.identity import identity_scores
from evaluation.landmarks import FaceTracks, NoFaceError, detect_faces, face_tracks, landmark_distance, mouth_signals
from evaluation.lipsync import speech_signal, sync_score
from evaluation.syncnet import load_syncnet, syncnet_score
from multitalk_model.audio import AudioError, load_speech
from multitalk_model.media import MediaError, load_image, read_video_frames

PathLike = str | os.PathLike


class ScoreInputError(ValueError):
    """An input of a score that cannot be used; the message names the file."""


def _frames(path: PathLike) -> np.ndarray:
    try:
        return read_video_frames(path)
    except (MediaError, OSError) as error:
        raise ScoreInputError(f"{path}: cannot read the video ({error})") from error


def _speech(path: PathLike) -> np.ndarray:
    try:
        return load_speech(path)
    except (AudioError, MediaError, OSError) as error:
        raise ScoreInputError(f"{path}: cannot read the audio ({error})") from error


def _tracks(path: PathLike, frames: np.ndarray, num_persons: int | None) -> FaceTracks:
    try:
        return face_tracks(frames, num_persons)
    except NoFaceError as error:
        raise ScoreInputError(f"{path}: {error}") from error


def score_video(
    video: PathLike,
    audio: Sequence[PathLike] | None = None,
    reference_image: PathLike | None = None,
    ground_truth: PathLike | None = None,
    syncnet_weights: PathLike | None = None,
    max_offset: int = 3,
    inception_weights: PathLike | None = None,
    i3d_weights: PathLike | None = None,
) -> dict:
    """Every metric the inputs allow, as a nested dict of plain numbers and lists:

    - `sync`: `confidence` (-1..1), `offset_frames`, `source` ("landmarks"), `per_stream` (one {confidence,
      offset_frames, person} per audio stream, scored against its bound person); always present;
    - `binding` (two or more audio streams): `matrix` [persons][streams], `assignment` (stream per person, left to
      right), `accuracy` (share of persons given their own stream, stream i for person i);
    - `identity` (with `reference_image`), `lmd` (with `ground_truth`), `syncnet` {sync_c, sync_d, offset} (with
      `syncnet_weights`), `fid` (with `ground_truth` and `inception_weights`: the video's frames against the ground
      truth's) and `fvd` (with `ground_truth` and `i3d_weights`: their 16-frame clips, StyleGAN-V protocol).

    `audio` are audio files or videos (their track is used); by default the video's own track.
    """
    if (inception_weights is not None or i3d_weights is not None) and ground_truth is None:
        raise ScoreInputError("FID and FVD compare with a ground-truth video: give --ground-truth")
    frames = _frames(video)
    streams = [_speech(path) for path in audio] if audio else [_speech(video)]
    tracks = _tracks(video, frames, len(streams) if len(streams) >= 2 else None)
    mouth = mouth_signals(tracks.landmarks)
    speech = np.stack([speech_signal(wave, len(frames)) for wave in streams])
    matrix = binding_matrix(mouth, speech, max_offset)
    binding = bind(matrix)
    # Each stream is scored against the face it is bound to; a single stream against the face that follows it best.
    owners = [binding.assignment.index(s) if s in binding.assignment else int(np.argmax(matrix[:, s]))
              for s in range(len(streams))]  # fmt: skip
    per_stream = []
    for stream, person in enumerate(owners):
        result = sync_score(mouth[person], speech[stream], max_offset)
        per_stream.append(
            {"confidence": result.confidence, "offset_frames": result.offset_frames, "person": int(person)}
        )
    scores: dict = {
        "video": str(video),
        "num_frames": len(frames),
        "num_persons": tracks.num_persons,
        "sync": {
            "confidence": float(np.mean([entry["confidence"] for entry in per_stream])),
            "offset_frames": int(round(float(np.median([entry["offset_frames"] for entry in per_stream])))),
            "source": "landmarks",
            "per_stream": per_stream,
        },
    }
    if len(streams) >= 2:
        scores["binding"] = {
            "matrix": matrix.tolist(),
            "assignment": binding.assignment,
            "accuracy": binding.accuracy,
        }
    if reference_image is not None:
        scores["identity"] = _identity(reference_image, frames, tracks)
    if ground_truth is not None:
        truth_frames = _frames(ground_truth)
        truth = _tracks(ground_truth, truth_frames, tracks.num_persons)
        length = min(len(frames), truth.landmarks.shape[1])
        scores["lmd"] = landmark_distance(tracks.landmarks[:, :length], truth.landmarks[:, :length])
        if inception_weights is not None:
            scores["fid"] = fid(_detector(inception_weights), truth_frames, frames)
        if i3d_weights is not None:
            real, generated = video_clips(truth_frames), video_clips(frames)
            if min(len(real), len(generated)) < 2:
                raise ScoreInputError(f"FVD needs two or more {FVD_CLIP_FRAMES}-frame clips of each video")
            scores["fvd"] = fvd(_detector(i3d_weights), real, generated)
    if syncnet_weights is not None:
        try:
            model = load_syncnet(syncnet_weights)
        except ValueError as error:
            raise ScoreInputError(str(error)) from error
        results = [syncnet_score(model, frames, tracks.boxes[person], streams[stream])
                   for stream, person in enumerate(owners)]  # fmt: skip
        scores["syncnet"] = {
            "sync_c": float(np.mean([result.sync_c for result in results])),
            "sync_d": float(np.mean([result.sync_d for result in results])),
            "offset": int(round(float(np.median([result.offset for result in results])))),
            "per_stream": [{"sync_c": r.sync_c, "sync_d": r.sync_d, "offset": r.offset} for r in results],
        }
    return scores


def _detector(path: PathLike):
    try:
        return load_detector(path)
    except ValueError as error:
        raise ScoreInputError(str(error)) from error


def _identity(path: PathLike, frames: np.ndarray, tracks: FaceTracks) -> dict:
    try:
        image = load_image(path)
    except (MediaError, OSError) as error:
        raise ScoreInputError(f"{path}: cannot read the image ({error})") from error
    boxes = detect_faces(image, max_side=640)
    if len(boxes) != tracks.num_persons:
        raise ScoreInputError(f"{path}: {len(boxes)} face(s) found, the video shows {tracks.num_persons}")
    return identity_scores(image, np.stack(boxes), frames, tracks.boxes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", required=True, type=Path, help="the talking video to score")
    parser.add_argument("--audio", nargs="+", type=Path, help="audio streams (files or videos), person i's first")
    parser.add_argument("--reference-image", type=Path, help="the image the video was generated from (identity)")
    parser.add_argument("--ground-truth", type=Path, help="the real video the generated one should match (LMD)")
    parser.add_argument("--syncnet-weights", type=Path, help="syncnet_python's syncnet_v2.model (Sync-C, Sync-D)")
    parser.add_argument("--inception-weights", type=Path, help="Inception TorchScript (FID against --ground-truth)")
    parser.add_argument("--i3d-weights", type=Path, help="StyleGAN-V I3D TorchScript (FVD against --ground-truth)")
    parser.add_argument("--max-offset", type=int, default=3, help="largest audio-video offset searched, frames")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    try:
        scores = score_video(
            args.video,
            args.audio,
            args.reference_image,
            args.ground_truth,
            args.syncnet_weights,
            args.max_offset,
            args.inception_weights,
            args.i3d_weights,
        )
    except ScoreInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.json:
        sync = scores["sync"]
        print(f"{args.video}: sync confidence {sync['confidence']:.3f} at offset {sync['offset_frames']} frames")
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
