"""Stage 9a: pack a clip into its webdataset members (DESIGN.md "Dataset format")."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from pipelines.record import Clip
from pipelines.schema import (
    AUDIO_RATE,
    JSON_KEY,
    MP4_KEY,
    SAMPLE_FPS,
    WAV2VEC_KEY,
    ClipMetadata,
    PersonMetadata,
    Scores,
    SpeakerTurn,
    Word,
    person_audio_key,
)
from pipelines.stages.base import Stage


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _flac_bytes(wave: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, AUDIO_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def clip_metadata(clip: Clip) -> ClipMetadata:
    """The sample's json metadata."""
    persons = []
    for p, track in enumerate(clip.tracks):
        has_speech = clip.person_masks is not None
        persons.append(
            PersonMetadata(
                bbox_xyxy=[round(float(v), 1) for v in track[0]],
                track=np.round(track, 1).tolist(),
                speaking_s=float(clip.person_masks[p].sum()) / SAMPLE_FPS if has_speech else 0.0,
                binding_confidence=clip.binding_confidence[p] if has_speech else None,
                sync_confidence=clip.sync_confidence[p] if clip.sync_confidence else None,
                sync_offset=clip.sync_offset[p] if clip.sync_offset else None,
                sync_distance=clip.sync_distance[p] if clip.sync_distance else None,
            )
        )
    return ClipMetadata(
        kind=clip.kind,
        kind_reason=clip.kind_reason,
        source=clip.source,
        source_hash=clip.source_hash,
        start_s=clip.start_s,
        end_s=clip.end_s,
        num_frames=clip.num_frames,
        fps=SAMPLE_FPS,
        width=clip.width,
        height=clip.height,
        caption=clip.caption,
        caption_source=clip.caption_source,
        persons=persons,
        scores=Scores(**clip.scores),
        sync_source=clip.sync_source,
        words=[Word(**word) for word in clip.words],
        turns=[SpeakerTurn(**turn) for turn in clip.turns],
    )


class SampleStage(Stage):
    """Fills `sample`: mp4, json, and for clips with audio streams wav2vec.npy and person{i}.flac."""

    name = "sample"
    num_cpus = 0.25

    def process(self, clip: Clip) -> None:
        sample = {MP4_KEY: clip.mp4, JSON_KEY: clip_metadata(clip).model_dump_json().encode()}
        # multi_event clips (image-to-video) train without audio: they carry no audio members.
        if clip.person_audio is not None:
            sample[WAV2VEC_KEY] = _npy_bytes(clip.wav2vec)
            for p, wave in enumerate(clip.person_audio):
                sample[person_audio_key(p)] = _flac_bytes(wave)
        clip.sample = sample
        # Only the members travel on to the shard writer.
        clip.mp4 = clip.audio = clip.person_audio = clip.wav2vec = clip.mouth_motion = clip.lip_motion = None
