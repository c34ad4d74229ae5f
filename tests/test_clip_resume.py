"""A long streaming job resumes after its last finished clip, and holds one clip's frames at a time.

The tiny model on the CPU, a 4-clip streaming job, its clips kept where serving keeps them (serving/clips.py over a
Storage). A run interrupted after its second clip leaves two clips stored; its retry takes them from the store,
generates clips 3 and 4 only (the pipeline's own progress events say which clips ran) and writes the same video as
an uninterrupted run: the noise generator resumes where it was, and the stored frames are lossless.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

from multitalk_model.generation import ClipState, GenerationCancelled, MultiTalkPipeline
from multitalk_model.jobs import GenerationJob
from multitalk_model.media import read_video_frames
from serving.clips import JobClips
from serving.storage import Storage

CLIPS = 4  # frame_num 5, motion 1: clips start at frames 0, 4, 8, 12; 16 frames need all four


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir) -> MultiTalkPipeline:
    return MultiTalkPipeline.from_model_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def job(shared_media) -> GenerationJob:
    return GenerationJob.model_validate(
        {
            "image": str(shared_media / "one_person_studio.png"),
            "persons": [{"audio": str(shared_media / "one_person_studio.wav")}],
            "prompt": "a person talks",
            "mode": "streaming",
            "steps": 2,
            "frame_num": 5,
            "motion_frames": 1,
            "resolution": (32, 64),
            "max_duration_s": 16 / 25,
            "seed": 3,
        }
    )


def test_a_retry_generates_only_the_clips_after_the_last_stored_one_and_gives_the_same_video(pipeline, job, tmp_path):
    storage = Storage(str(tmp_path / "files"))
    whole_clips = JobClips(storage, "whole")
    whole = pipeline.generate(job, tmp_path / "whole.mp4", clip_store=whole_clips)
    assert (whole.clips, whole.resumed_clips, whole.num_frames) == (CLIPS, 0, 16)

    clips = JobClips(storage, "interrupted")

    def two_clips_stored() -> bool:  # asked before every step: stops the run at the first step of clip 3
        last = clips.last()
        return last is not None and last.clip == 1

    with pytest.raises(GenerationCancelled, match="clip 3, step 1"):
        pipeline.generate(job, tmp_path / "interrupted.mp4", cancelled=two_clips_stored, clip_store=clips)
    assert not (tmp_path / "interrupted.mp4").exists()

    ran = []
    retried = pipeline.generate(job, tmp_path / "retried.mp4", progress=ran.append, clip_store=clips)

    assert retried.resumed_clips == 2 and retried.clips == CLIPS
    assert sorted({event.clip for event in ran}) == [3, 4]  # clips 1 and 2 came from the store
    for clip in range(CLIPS):
        assert np.array_equal(clips.frames(clip), whole_clips.frames(clip)), f"clip {clip + 1}"
    assert np.array_equal(read_video_frames(retried.path), read_video_frames(whole.path))
    assert retried.path.read_bytes() == whole.path.read_bytes()


def test_the_stored_state_is_what_the_next_clip_needs(pipeline, job, tmp_path):
    clips = JobClips(Storage(str(tmp_path / "files")), "job")
    states = [state for state, _ in pipeline.stream(pipeline.prepare(job))]
    for state, frames in zip(states, (np.zeros((4, 32, 64, 3), np.uint8),) * CLIPS, strict=True):
        clips.save(state, frames)

    last = clips.last()
    assert isinstance(last, ClipState) and (last.clip, last.clips) == (CLIPS - 1, CLIPS)
    assert np.array_equal(last.motion, states[-1].motion) and last.motion.shape == (1, 32, 64, 3)
    assert np.array_equal(last.noise_state.numpy(), states[-1].noise_state.numpy())
    clips.clear()
    assert clips.last() is None


def test_generate_frees_each_clips_frames_before_the_next_clip_runs(pipeline, job, tmp_path):
    class WatchedClips(JobClips):
        """Keeps a weak reference to each saved clip's frames: it sees them freed without holding them."""

        def __init__(self, storage: Storage, job_id: str) -> None:
            super().__init__(storage, job_id)
            self.saved: list[weakref.ref] = []

        def save(self, state: ClipState, frames: np.ndarray) -> None:
            super().save(state, frames)
            self.saved.append(weakref.ref(frames))

    clips = WatchedClips(Storage(str(tmp_path / "files")), "job")
    alive_during_steps = []

    def count_earlier_clips_alive(_) -> None:
        gc.collect()
        alive_during_steps.append(sum(ref() is not None for ref in clips.saved))

    pipeline.generate(job, Path(tmp_path / "video.mp4"), progress=count_earlier_clips_alive, clip_store=clips)

    assert len(clips.saved) == CLIPS and len(alive_during_steps) == CLIPS * job.steps
    assert alive_during_steps == [0] * len(alive_during_steps)  # no earlier clip's frames while a clip runs
