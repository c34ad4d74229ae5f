"""InfiniteTalk: each piece of its sampler against the reference's own procedure, and video dubbing end to end.

The `reference_*` functions restate, on tiny inputs, what MeiGen-AI/InfiniteTalk wan/multitalk.py
`generate_infinitetalk` and wan/utils/utils.py `extract_specific_frames` do (its loop, its mask, its pastes, its
audio padding, its frame choice); the project's functions must give the same results.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalk_model.audio import load_audio_track
from multitalk_model.components import encode_image, vae_encode
from multitalk_model.conditioning import condition_mask, given_latent_frames
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.generate import main as generate_main
from multitalk_model.generation import (
    GenerationError,
    MultiTalkPipeline,
    _reflect_to,
    _StepHooks,
    _to_pixels,
    plan_clips,
)
from multitalk_model.guidance import GuidanceScales, GuidedDenoiser
from multitalk_model.infinitetalk import (
    InfiniteTalkPipeline,
    audio_frames_needed,
    reference_frame_indices,
    video_frame_count,
)
from multitalk_model.jobs import GenerationJob, JobError, load_job
from multitalk_model.media import probe_media, write_video
from multitalk_model.sampling import add_noise, shifted_timesteps
from multitalk_model.wav2vec import audio_windows
from serving.api import _stored_spec
from serving.config import ServingConfig
from serving.generator import _local_job
from serving.storage import Storage, job_file
from serving.submission import RequestRejected, Upload, build_job
from training.config import ObjectiveConfig
from training.data import AI2V, ClipBatch
from training.encoders import FrozenEncoders
from training.objective import (
    _paste_context,
    drop_conditions,
    model_inputs,
    sample_given_frames,
    sample_reference_positions,
    velocity_loss,
)

# ------------------------------------------------------------------------------- the reference's procedure


def reference_clip_loop(audio_frames: int, frame_num: int, motion_frame: int, max_frames_num: int):
    """generate_infinitetalk's while loop with the sampling left out: each clip's audio_start_idx, the end of the
    audio it reads after padding, and the length of the returned video."""
    starts, kept, miss_lengths = [], 0, []
    audio_len = audio_frames
    is_first_clip, arrive_last_frame, cur_motion_frames_num = True, False, 1
    audio_start_idx = 0
    audio_end_idx = audio_start_idx + frame_num
    while True:
        starts.append(audio_start_idx)
        kept += frame_num if is_first_clip else frame_num - cur_motion_frames_num
        if arrive_last_frame:
            break
        is_first_clip = False
        cur_motion_frames_num = motion_frame
        audio_start_idx += frame_num - cur_motion_frames_num
        audio_end_idx = audio_start_idx + frame_num
        if audio_end_idx >= min(max_frames_num, audio_len):
            arrive_last_frame = True
            miss_lengths = []
            if audio_end_idx >= audio_len:
                miss_length = audio_end_idx - audio_len + 3
                audio_len += miss_length
                miss_lengths.append(miss_length)
            else:
                miss_lengths.append(0)
        if max_frames_num <= frame_num:
            break
    length = min(kept, max_frames_num)
    if max_frames_num > frame_num and sum(miss_lengths) > 0:
        length = min(length, audio_frames)
    return starts, audio_len, length


def reference_condition_mask(frame_num: int, lat_h: int, lat_w: int) -> torch.Tensor:
    msk = torch.ones(1, frame_num, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)


def reference_denoise(latent, latent_motion_frames, timesteps, model, is_first_clip):
    """The sampling loop of one clip (the guided prediction is `model`), with its re-noised pastes."""
    cur_motion_frames_latent_num = latent_motion_frames.shape[1]
    if not is_first_clip:
        noise = torch.randn_like(latent_motion_frames)
        latent[:, :cur_motion_frames_latent_num] = add_noise(latent_motion_frames, noise, timesteps[0])
    for i in range(len(timesteps) - 1):
        latent[:, :cur_motion_frames_latent_num] = latent_motion_frames
        noise_pred = -model(latent, timesteps[i])
        dt = (timesteps[i] - timesteps[i + 1]) / 1000
        latent = latent + noise_pred * dt
        if not is_first_clip:
            noise = torch.randn_like(latent_motion_frames)
            latent[:, :cur_motion_frames_latent_num] = add_noise(latent_motion_frames, noise, timesteps[i + 1])
        latent[:, :cur_motion_frames_latent_num] = latent_motion_frames
    return latent


def reference_audio_windows(features: torch.Tensor, audio_start_idx: int, audio_end_idx: int) -> torch.Tensor:
    """The last clip's audio: the reversed tail appended past the end, then 5-frame windows clamped."""
    if audio_end_idx >= len(features):
        miss_length = audio_end_idx - len(features) + 3
        features = torch.cat([features, torch.flip(features[-miss_length:], dims=[0])])
    indices = torch.arange(audio_start_idx, audio_end_idx)[:, None] + (torch.arange(5) - 2)[None]
    return features[indices.clamp(0, len(features) - 1)]


def reference_frame_index(frame_id: int, num_frames: int) -> int:
    """extract_specific_frames: the frame at frame_id, or the last one past the end."""
    return frame_id if frame_id < num_frames else num_frames - 1


# ------------------------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("frame_num, motion_frames", [(81, 9), (33, 9), (17, 5)])
@pytest.mark.parametrize("audio_frames", [82, 153, 154, 465, 1200])
@pytest.mark.parametrize("max_frames", [1000, 150])
def test_clip_plan_output_length_and_reference_frames_follow_the_reference(
    frame_num, motion_frames, audio_frames, max_frames
):
    ref_starts, _, ref_length = reference_clip_loop(audio_frames, frame_num, motion_frames, max_frames)
    # What prepare gives streaming mode: the audio's frames, capped by max_duration_s.
    num_frames = min(audio_frames, max_frames)
    starts = plan_clips(num_frames, frame_num, motion_frames, streaming=True)
    assert starts == ref_starts
    kept = frame_num + (len(starts) - 1) * (frame_num - motion_frames)
    assert min(kept, num_frames) == ref_length
    source_frames = 300  # a 12 s source video: later clips take its last frame
    assert reference_frame_indices(starts, source_frames) == [reference_frame_index(s, source_frames) for s in starts]


def test_clip_mode_is_one_clip_of_frame_num_frames_as_the_reference():
    ref_starts, _, ref_length = reference_clip_loop(465, 81, 9, max_frames_num=81)
    assert plan_clips(min(465, 81), 81, 9, streaming=False) == ref_starts == [0] and ref_length == 81


def test_condition_mask_marks_frame_0_only():
    np.testing.assert_array_equal(condition_mask(1, 21, 3, 5), reference_condition_mask(21, 3, 5))


@pytest.mark.parametrize("audio_frames, last_start", [(465, 432), (441, 360), (470, 360), (60, 0)])
def test_audio_of_the_last_clip_is_padded_as_the_reference(audio_frames, last_start):
    features = torch.randn(audio_frames, 2, 3, generator=torch.Generator().manual_seed(1))
    end = last_start + 81
    ours = audio_windows(_reflect_to(features, audio_frames_needed(end, audio_frames)))[last_start:end]
    torch.testing.assert_close(ours, reference_audio_windows(features, last_start, end), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- with the tiny model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "infinitetalk", family="infinitetalk")


@pytest.fixture(scope="module")
def pipeline(model_dir) -> InfiniteTalkPipeline:
    return MultiTalkPipeline.from_model_dir(model_dir)


@pytest.mark.parametrize("motion_frames", [1, 9])
def test_a_clip_is_denoised_as_the_reference_denoises_it(pipeline, shared_media, motion_frames):
    """The first clip (its reference frame as the one motion frame) and a later one (9 motion frames): the same
    condition channels, CLIP input, motion latents and pastes give the reference's latent."""
    job = GenerationJob.model_validate(
        {
            "image": str(shared_media / "one_person_studio.png"),
            "persons": [{"audio": str(shared_media / "one_person_studio.wav")}],
            "steps": 3,
            "frame_num": 17,
            "resolution": (32, 48),
            "seed": 3,
        }
    )
    prepared = pipeline.prepare(job)
    conditions = pipeline._job_conditions(prepared, [0], job.frame_num)
    audio = conditions.audio[:, :, : job.frame_num]
    reference = _to_pixels(prepared.image)[:, None]  # [3, 1, H, W]
    motion = reference if motion_frames == 1 else torch.rand(3, motion_frames, 32, 48) * 2 - 1
    clip = pipeline.encode_clip(prepared.image, motion, job.frame_num)
    hooks = _StepHooks(1, 1, job.steps, None, None)
    text = conditions.clip_texts[0]
    generator = torch.Generator().manual_seed(5)
    ours = pipeline._denoise_clip(prepared.job, clip, text, conditions, audio, None, generator, hooks)

    c = pipeline.components
    padded = torch.cat([reference, torch.zeros(3, job.frame_num - 1, 32, 48)], dim=1)
    y = torch.cat([reference_condition_mask(job.frame_num, 4, 6), vae_encode(c, padded[None])], dim=1)
    latent_motion_frames = vae_encode(c, motion[None])[0]  # the reference encodes the motion frames alone
    denoiser = GuidedDenoiser(
        c.transformer,
        GuidanceScales(job.text_guidance, job.audio_guidance),
        conditions.clip_texts[0],
        conditions.negative_text,
        pipeline.encode_clip(prepared.image, reference, job.frame_num).image_states,  # CLIP of the reference frame
        audio,
        None,
    )
    noise = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5))
    timesteps = shifted_timesteps(job.steps, job.resolved_shift)

    def model(latent, t):
        return denoiser(torch.cat([latent[None], y], dim=1), t)[0]

    expected = reference_denoise(noise[0].clone(), latent_motion_frames, timesteps, model, motion_frames == 1)
    torch.testing.assert_close(ours[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[0, :, : latent_motion_frames.shape[1]], latent_motion_frames, rtol=1e-5, atol=1e-5)


def test_the_model_directory_picks_the_sampler(model_dir, tmp_path, shared_media):
    pipeline = MultiTalkPipeline.from_model_dir(model_dir)
    assert type(pipeline) is InfiniteTalkPipeline
    multitalk = MultiTalkPipeline.from_model_dir(build_tiny_model_dir(tmp_path / "multitalk"))
    assert type(multitalk) is MultiTalkPipeline
    job = GenerationJob.model_validate(
        {
            "video": str(shared_media / "talking_man_25fps.mp4"),
            "persons": [{"audio": str(shared_media / "dubbing_speech_16k.wav")}],
        }
    )
    with pytest.raises(GenerationError, match="video: dubbing a video needs an InfiniteTalk model"):
        multitalk.prepare(job)
    # Each family fills in its own motion frames: the reference CLIs' defaults.
    assert pipeline.prepare(job).job.motion_frames == 9
    with pytest.raises(GenerationError, match="motion_frames must be < frame_num, got 9 >= 9"):
        pipeline.prepare(job.model_copy(update={"frame_num": 9}))
    index = json.loads((tmp_path / "multitalk" / "model_index.json").read_text())
    (tmp_path / "multitalk" / "model_index.json").write_text(json.dumps({**index, "family": "wan"}))
    with pytest.raises(ValueError, match="family 'wan' is not one of multitalk, infinitetalk"):
        MultiTalkPipeline.from_model_dir(tmp_path / "multitalk")


def test_each_clip_is_conditioned_on_the_source_frame_at_its_start(pipeline, shared_media, tmp_path):
    # A 25 fps video whose frame i is flat grey at 8 i: the chosen frames say their index.
    levels = 8 * np.arange(20)
    frames = np.broadcast_to(levels[:, None, None, None], (20, 64, 48, 3)).astype(np.uint8)
    video = write_video(tmp_path / "counter.mp4", frames, 25)
    assert video_frame_count(str(video)) == 20
    job = GenerationJob.model_validate(
        {
            "video": str(video),
            "persons": [{"audio": str(shared_media / "dubbing_speech_16k.wav")}],
            "resolution": (32, 32),
        }
    )
    prepared = pipeline.prepare(job)
    starts = [0, 12, 24, 36]
    chosen = pipeline.reference_frames(prepared, starts)
    expected = [levels[reference_frame_index(start, 20)] for start in starts]  # 0, 96, 152 (last), 152
    assert [round(float(frame.mean())) for frame in chosen] == pytest.approx(expected, abs=2)


def test_official_infinitetalk_json_reads_cond_video_as_a_video_or_an_image(shared_media, tmp_path):
    def official(cond_video: str) -> Path:
        path = tmp_path / f"{Path(cond_video).stem}.json"
        audio = {"person1": str(shared_media / "dubbing_speech_16k.wav")}
        path.write_text(json.dumps({"prompt": "a man is talking", "cond_video": cond_video, "cond_audio": audio}))
        return path

    video_job = load_job(official(str(shared_media / "talking_man_25fps.mp4")))
    assert video_job.video == str(shared_media / "talking_man_25fps.mp4") and video_job.image is None
    image_job = load_job(official(str(shared_media / "one_person_studio.png")))
    assert image_job.image == str(shared_media / "one_person_studio.png") and image_job.video is None
    with pytest.raises(JobError, match="video: no such file"):
        load_job(official(str(tmp_path / "missing.mp4")))
    with pytest.raises(ValueError, match="either image .* or video"):
        GenerationJob.model_validate(
            {"image": "a.png", "video": "b.mp4", "persons": [{"audio": "a.wav"}]}  # both
        )


def test_dubbing_the_portrait_video_from_the_command_line(model_dir, shared_media, tmp_path):
    speech = shared_media / "dubbing_speech_16k.wav"
    job_file = tmp_path / "dub.json"
    job_file.write_text(
        json.dumps(
            {
                "prompt": "a man is talking",
                "cond_video": str(shared_media / "talking_portrait_hevc_30fps.mp4"),
                "cond_audio": {"person1": str(speech)},
            }
        )
    )
    out = tmp_path / "dubbed.mp4"
    # Three clips of 25 frames advancing by 16: the 18.6 s speech capped at 2 s (the reference's max_frame_num).
    flags = ["--steps", "1", "--frame-num", "25", "--max-duration-s", "2", "--resolution", "112", "64"]
    args = ["--input", str(job_file), "--model-dir", str(model_dir), "--out", str(out), "--mode", "streaming"]
    assert generate_main(args + flags) == 0

    info = probe_media(out)
    _, _, expected_frames = reference_clip_loop(int(18.6 * 25), 25, 9, max_frames_num=50)
    assert info.fps == 25 and info.num_frames == expected_frames == 50
    assert (info.width, info.height) == (64, 112)
    # The sound is the new speech (16 kHz mono), not the source video's own voice (44.1 kHz stereo).
    assert info.has_audio and (info.audio_rate, info.audio_channels) == (16000, 1)
    dubbed, _ = load_audio_track(out)
    original, _ = load_audio_track(speech)
    # Normalised correlation with the speech's first 1.5 s, at the best lag within the AAC encoder's delay.
    segment = original[0, 2048 : 2048 + 24000]
    correlations = [
        np.corrcoef(dubbed[0, 2048 + lag : 2048 + lag + 24000], segment)[0, 1] for lag in range(-2048, 2049, 8)
    ]
    assert max(correlations) > 0.9


# ------------------------------------------------------------------------------------------- the jobs API


def _upload(field: str, path: Path) -> Upload:
    return Upload(field=field, filename=path.name, path=path, size=path.stat().st_size)


def test_jobs_api_takes_a_video_where_the_image_goes(model_dir, shared_media, tmp_path):
    config = ServingConfig(model_dir=str(model_dir), api_keys=["key"], storage_uri=str(tmp_path / "files"))
    video = _upload("video", shared_media / "talking_man_25fps.mp4")
    speech = [_upload("audio 1", shared_media / "dubbing_speech_16k.wav")]
    job = build_job({"mode": "streaming"}, video, speech, config)
    assert job.video == str(video.path) and job.image is None

    official = {"cond_video": "ref_video.mp4", "cond_audio": {"person1": "1.wav"}, "prompt": "a man is talking"}
    assert build_job(official, video, speech, config).video == str(video.path)

    # Stored as the generator replica finds it again.
    storage = Storage(config.storage_uri)
    spec, files = _stored_spec(job, video, speech)
    for name, local in files.items():
        storage.upload(local, job_file("job1", name))
    fetched = _local_job(spec, "job1", storage, tmp_path / "work")
    assert Path(fetched.video).read_bytes() == video.path.read_bytes() and fetched.image is None

    multitalk = build_tiny_model_dir(tmp_path / "multitalk")
    with pytest.raises(RequestRejected, match="video: dubbing a video needs an InfiniteTalk model"):
        build_job({}, video, speech, config.model_copy(update={"model_dir": multitalk}))
    with pytest.raises(RequestRejected, match="video .*'no_audio_track.png'.*"):
        broken = tmp_path / "no_audio_track.png"
        broken.write_bytes(b"not a video")
        build_job({}, _upload("video", broken), speech, config)


# -------------------------------------------------------------------------------------------------- training


def test_training_the_infinitetalk_family_conditions_as_its_sampler(pipeline):
    """Frame 0 given (the reference's mask), its VAE latent and CLIP from the frame at the sampled position, the
    context frames pasted clean as the sampler pastes its motion frames, and no loss on them."""
    c = pipeline.components
    gen = torch.Generator().manual_seed(3)
    tiny = c.config
    batch = ClipBatch(
        keys=["a", "b", "c"],
        epochs=[0, 0, 0],
        sources=[AI2V] * 3,
        stream=0,
        video=torch.randint(0, 256, (3, 17, 32, 48, 3), generator=gen, dtype=torch.uint8),
        audio=torch.randn(3, 1, 17, tiny.audio_window, tiny.audio_layers, tiny.audio_channels, generator=gen),
        audio_streams=torch.tensor([1, 1, 1]),
        region_masks=torch.ones(3, 2, 4, 6),
        captions=["a man is talking"] * 3,
    )
    config = ObjectiveConfig(
        family="infinitetalk", motion_condition_ratio=0.5, motion_frames=9, text_dropout=0, audio_dropout=0
    )
    inputs = model_inputs(batch, FrozenEncoders(c), config, torch.Generator().manual_seed(1), "cpu", torch.float32)

    replay = torch.Generator().manual_seed(1)
    drop_conditions(batch, config, replay)
    context = sample_given_frames(3, config, replay)
    positions = sample_reference_positions(batch, context, replay)
    assert inputs.given_frames == context and sorted(set(context)) == [1, 9]  # this seed gives both kinds
    assert all(position == 0 for position, frames in zip(positions, context, strict=True) if frames == 1)
    assert any(position > 0 for position in positions)
    for i, position in enumerate(positions):
        reference = batch.video[i, position]
        padded = torch.cat([_to_pixels(reference.numpy())[:, None], torch.zeros(3, 16, 32, 48)], dim=1)
        expected = torch.cat([reference_condition_mask(17, 4, 6)[0], vae_encode(c, padded[None])[0]])
        torch.testing.assert_close(inputs.condition[i], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inputs.image[i], encode_image(c, reference.numpy())[0])

    noisy = torch.randn(inputs.latents.shape, generator=gen)
    pasted = _paste_context(noisy, inputs)
    for i, frames in enumerate(context):
        kept = given_latent_frames(frames)
        assert torch.equal(pasted[i, :, :kept], inputs.latents[i, :, :kept])  # clean, as at inference
        assert torch.equal(pasted[i, :, kept:], noisy[i, :, kept:])
    loss = velocity_loss(c.transformer, inputs, config, torch.Generator().manual_seed(2))
    assert torch.isfinite(loss)
