"""Video and image I/O on the real shared media: probing, 30 -> 25 fps decoding, mp4 writing with audio, images."""

import bisect
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from multitalk_model.media import MediaError, load_image, probe_media, read_video_frames, write_video


def _source_frames(path: Path) -> tuple[list[float], list[np.ndarray]]:
    """Every frame of the file, decoded from the start without seeking, with its presentation time."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return [frame.time for frame in frames], [frame.to_ndarray(format="rgb24") for frame in frames]


def _frame_on_screen(times: list[float], frames: list[np.ndarray], t: float) -> np.ndarray:
    """The source frame shown at time t: the last one with pts <= t (the first one before the stream starts)."""
    return frames[max(bisect.bisect_right(times, t + 1e-6) - 1, 0)]


def test_probe_reads_frame_rate_and_audio_of_a_30fps_file(shared_media):
    info = probe_media(shared_media / "talking_man_30fps.mp4")

    assert info.fps == 30.0
    assert (info.width, info.height) == (700, 700)
    assert info.duration_s == pytest.approx(6.13, abs=0.01)
    assert info.num_frames == 135  # the source drops frames: fewer than duration * fps
    assert info.video_codec == "h264"
    assert info.has_audio and info.audio_codec == "aac"
    assert (info.audio_rate, info.audio_channels) == (44100, 2)


def test_probe_accepts_a_file_without_audio(shared_media):
    info = probe_media(shared_media / "no_audio_track.mp4")

    assert not info.has_audio
    assert info.audio_rate is None and info.audio_channels is None and info.audio_codec is None
    assert (info.fps, info.width, info.height, info.num_frames) == (25.0, 704, 1216, 268)


def test_read_resamples_30fps_to_25fps_by_presentation_time(shared_media):
    path = shared_media / "talking_man_30fps.mp4"
    times, frames = _source_frames(path)

    first_two_seconds = read_video_frames(path, fps=25, num_frames=50)
    # 5.0 s lies past the file's second keyframe (4.57 s): this read seeks instead of decoding from 0.
    from_five_seconds = read_video_frames(path, fps=25, start_s=5.0, num_frames=25)

    assert first_two_seconds.shape == (50, 700, 700, 3) and first_two_seconds.dtype == np.uint8
    assert from_five_seconds.shape == (25, 700, 700, 3)
    for index, frame in enumerate(first_two_seconds):
        assert np.array_equal(frame, _frame_on_screen(times, frames, index / 25)), f"frame {index}"
    for index, frame in enumerate(from_five_seconds):
        assert np.array_equal(frame, _frame_on_screen(times, frames, 5.0 + index / 25)), f"frame {index} from 5 s"


def test_read_without_num_frames_covers_the_whole_video(shared_media):
    path = shared_media / "talking_man_30fps.mp4"

    frames = read_video_frames(path, fps=25, start_s=4.0)

    # 6.133 s of video from 4.0 s on at 25 fps: output times 4.00 .. 6.12 s.
    assert len(frames) == 54


def test_read_past_the_end_raises_naming_the_file(shared_media):
    with pytest.raises(MediaError, match=r"talking_man_30fps\.mp4: asked for 50 frames"):
        read_video_frames(shared_media / "talking_man_30fps.mp4", start_s=5.0, num_frames=50)


def test_written_video_with_stereo_audio_reads_back_at_25fps(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, size=(50, 48, 64, 3), dtype=np.uint8)
    # 3 s of 44.1 kHz stereo for a 2 s video (the writer must cut it): 440 Hz left, 660 Hz right.
    t = np.arange(3 * 44100) / 44100
    audio = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)

    path = write_video(tmp_path / "out.mp4", frames, fps=25, audio=audio, audio_rate=44100)

    info = probe_media(path)
    assert (info.fps, info.num_frames, info.width, info.height) == (25.0, 50, 64, 48)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert (info.audio_rate, info.audio_channels) == (44100, 2)
    assert info.duration_s == pytest.approx(50 / 25, abs=1 / 25)
    assert read_video_frames(path, fps=25).shape == (50, 48, 64, 3)
    assert [file.name for file in tmp_path.iterdir()] == ["out.mp4"]  # no temporary file left behind
    with av.open(str(path)) as container:
        decoded = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    spectrum = np.abs(np.fft.rfft(decoded[:, 4096 : 4096 + 32768], axis=1))
    peak_hz = np.fft.rfftfreq(32768, 1 / 44100)[spectrum.argmax(axis=1)]
    assert peak_hz == pytest.approx([440, 660], abs=3)  # both channels kept apart, not a mono downmix


def test_written_video_without_audio_has_no_audio_stream(tmp_path):
    frames = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :16] = 255  # left half white: the decoded frame must keep it there

    info = probe_media(write_video(tmp_path / "silent.mp4", frames, fps=25))
    decoded = read_video_frames(tmp_path / "silent.mp4")

    assert not info.has_audio
    assert (info.fps, info.num_frames) == (25.0, 10)
    assert decoded[0, :, :12].min() > 240 and decoded[0, :, 20:].max() < 15


def test_write_rejects_odd_frame_sizes(tmp_path):
    with pytest.raises(ValueError, match="even width and height, got 33x32"):
        write_video(tmp_path / "odd.mp4", np.zeros((4, 32, 33, 3), dtype=np.uint8))
    assert not any(tmp_path.iterdir())


def test_load_image_turns_the_rgba_studio_photo_into_rgb(shared_media):
    path = shared_media / "one_person_studio.png"

    image = load_image(path)

    assert image.shape == (1318, 2366, 3) and image.dtype == np.uint8
    # The photo is fully opaque: its colours come through unchanged.
    assert np.array_equal(image, np.asarray(Image.open(path))[..., :3])


def test_load_image_composites_transparency_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 0, 128], [0, 0, 255, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "pixels.png")

    image = load_image(tmp_path / "pixels.png")

    assert image[0, 0].tolist() == [255, 255, 255]  # transparent: white, whatever its colour
    assert all(126 <= value <= 128 for value in image[0, 1])  # half-transparent black on white: mid grey
    assert image[0, 2].tolist() == [0, 0, 255]


def test_text_file_is_neither_image_nor_video(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not media\n")

    with pytest.raises(MediaError, match=r"notes\.txt: not an image"):
        load_image(text)
    with pytest.raises(MediaError, match=r"notes\.txt: not a readable media file"):
        probe_media(text)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MediaError, match=r"missing\.mp4: no such file"):
        read_video_frames(tmp_path / "missing.mp4")
