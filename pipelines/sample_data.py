"""A demo corpus the project makes itself: faces from photos that ship with scikit-image, mouths opened by the
energy of synthesised speech, a two-person scene with known turn-taking, a captioned scene for the image-to-video
corpus, and a silent video; plus the input manifest and a tiny random wav2vec2 to curate it with.

    python -m pipelines.sample_data --out demo_data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from multitalk_model.media import write_video
from multitalk_model.synth import synthesize_speech
from multitalk_model.wav2vec import build_tiny_wav2vec2
from pipelines.schema import AUDIO_RATE, SAMPLE_FPS

_SAMPLES_PER_FRAME = AUDIO_RATE // SAMPLE_FPS
# Where the mouth and chin are in each photo (pixels), read off the faces MTCNN finds there.
_ASTRONAUT = {"image": skimage.data.astronaut, "mouth": (224, 150), "mouth_width": 44, "chin_y": 178}
_CAMERAMAN = {"image": skimage.data.camera, "mouth": (230, 183), "mouth_width": 26, "chin_y": 202}
_MAX_OPENING_PX = 12.0


def _photo(face: dict) -> np.ndarray:
    image = face["image"]()
    return np.ascontiguousarray(np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3])


def mouth_openings(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """[num_frames] mouth opening in 0..1 from the speech's RMS per video frame."""
    padded = np.zeros(num_frames * _SAMPLES_PER_FRAME, dtype=np.float32)
    padded[: min(len(wave), len(padded))] = wave[: len(padded)]
    rms = np.sqrt(np.mean(padded.reshape(num_frames, _SAMPLES_PER_FRAME) ** 2, axis=1))
    return np.clip(rms / (rms.max() + 1e-9), 0.0, 1.0)


def open_mouth(photo: np.ndarray, face: dict, opening: float) -> np.ndarray:
    """The photo with the jaw pulled down by `opening` (0..1) and the gap between the lips darkened."""
    if opening <= 0:
        return photo.copy()
    mouth_x, mouth_y = face["mouth"]
    half_width, chin_y = face["mouth_width"] / 2, face["chin_y"]
    height, width = photo.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    # Rows between the lips and the chin slide down, most at the lips; the pull fades out sideways.
    below = np.clip((ys - mouth_y) / (chin_y + 10 - mouth_y), 0.0, 1.0)
    vertical = np.where(ys >= mouth_y, 1.0 - below, 0.0)
    sideways = np.clip(1.0 - np.abs(xs - mouth_x) / half_width, 0.0, 1.0)
    shift = _MAX_OPENING_PX * opening * vertical * sideways
    frame = cv2.remap(photo, xs, ys - shift, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    gap = (ys >= mouth_y) & (ys < mouth_y + shift) & (sideways > 0.2)
    frame[gap] = (frame[gap] * 0.25).astype(np.uint8)
    return frame


def talking_frames(face: dict, openings: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] frames of a photo whose mouth follows `openings`."""
    photo = _photo(face)
    return np.stack([open_mouth(photo, face, opening) for opening in openings])


def _crop_around_mouth(frames: np.ndarray, face: dict, size_hw: tuple[int, int]) -> np.ndarray:
    mouth_x, mouth_y = face["mouth"]
    top = int(np.clip(mouth_y - size_hw[0] * 0.55, 0, frames.shape[1] - size_hw[0]))
    left = int(np.clip(mouth_x - size_hw[1] // 2, 0, frames.shape[2] - size_hw[1]))
    return frames[:, top : top + size_hw[0], left : left + size_hw[1]]


def write_corpus(out_dir: str | Path, duration_s: float = 7.0) -> Path:
    """Write the demo videos, `inputs.jsonl` (path, kind, caption) and `wav2vec2-tiny/`; return the manifest."""
    out_dir = Path(out_dir)
    videos = out_dir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    num_frames = round(duration_s * SAMPLE_FPS)
    rows = []

    for name, face, seed, pitch in (("astronaut", _ASTRONAUT, 1, 210.0), ("cameraman", _CAMERAMAN, 2, 110.0)):
        wave = synthesize_speech(duration_s, AUDIO_RATE, seed=seed, pitch_hz=pitch)
        frames = talking_frames(face, mouth_openings(wave, num_frames))
        write_video(videos / f"single_{name}.mp4", frames, SAMPLE_FPS, audio=wave[None], audio_rate=AUDIO_RATE)
        rows.append({"path": f"videos/single_{name}.mp4", "kind": "single"})

    # Two people side by side taking turns of 1.6 s, the astronaut (left) first, so that every clip window holds
    # both voices.
    turn = 40  # frames
    voices = [np.zeros(num_frames * _SAMPLES_PER_FRAME, dtype=np.float32) for _ in range(2)]
    turns = []
    for index, start in enumerate(range(0, num_frames, turn)):
        person, end = index % 2, min(start + turn, num_frames)
        pitch_hz = (210.0, 110.0)[person]
        speech = synthesize_speech((end - start) / SAMPLE_FPS, AUDIO_RATE, seed=3 + index, pitch_hz=pitch_hz)
        voices[person][start * _SAMPLES_PER_FRAME : start * _SAMPLES_PER_FRAME + len(speech)] = speech
        turns.append({"person": person, "start_s": start / SAMPLE_FPS, "end_s": end / SAMPLE_FPS})
    left = talking_frames(_ASTRONAUT, mouth_openings(voices[0], num_frames))
    right = talking_frames(_CAMERAMAN, mouth_openings(voices[1], num_frames))
    panels = [_crop_around_mouth(left, _ASTRONAUT, (320, 256)), _crop_around_mouth(right, _CAMERAMAN, (320, 256))]
    mix = (voices[0] + voices[1])[None]
    write_video(videos / "dual_turns.mp4", np.concatenate(panels, axis=2), SAMPLE_FPS, audio=mix, audio_rate=AUDIO_RATE)
    rows.append({"path": "videos/dual_turns.mp4", "kind": "dual", "turns": turns})

    # A captioned scene without audio for the image-to-video corpus: the photo pans slowly.
    photo = _photo(_ASTRONAUT)
    pan = np.stack([np.roll(photo, shift=t // 5, axis=1) for t in range(num_frames)])
    write_video(videos / "multi_event_pan.mp4", pan, SAMPLE_FPS)
    caption = "an astronaut in a white suit smiles in front of the American flag"
    rows.append({"path": "videos/multi_event_pan.mp4", "kind": "multi_event", "caption": caption})

    # A talking face with a silent track: curation rejects it as such.
    frames = talking_frames(_ASTRONAUT, mouth_openings(synthesize_speech(duration_s, seed=5), num_frames))
    silence = np.zeros((1, num_frames * _SAMPLES_PER_FRAME), dtype=np.float32)
    write_video(videos / "silent_track.mp4", frames, SAMPLE_FPS, audio=silence, audio_rate=AUDIO_RATE)
    rows.append({"path": "videos/silent_track.mp4", "kind": "single"})

    build_tiny_wav2vec2(out_dir / "wav2vec2-tiny")
    manifest = out_dir / "inputs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the demo curation corpus")
    parser.add_argument("--out", default="demo_data", help="folder to write into")
    parser.add_argument("--duration", type=float, default=7.0, help="seconds per video")
    args = parser.parse_args(argv)
    print(write_corpus(args.out, args.duration))


if __name__ == "__main__":
    main()
