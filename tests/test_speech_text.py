"""A person's speech given as text: spoken by espeak-ng offline (or a configured Kokoro model), then used like audio."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from multitalk_model import generate
from multitalk_model.audio import VIDEO_FPS
from multitalk_model.fixtures.speech import synthesize_speech, write_wav
from multitalk_model.fixtures.tiny_model import build_tiny_model_dir
from multitalk_model.media import probe_media
from multitalk_model.tts import SpeechError, TtsSettings, synthesize_speech_file

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is missing (CI installs it)")


@needs_espeak
def test_espeak_speaks_text_into_a_wav_whose_length_follows_the_text(tmp_path):
    short = synthesize_speech_file("Hello.", tmp_path / "short.wav")
    long = synthesize_speech_file("Hello there, it is a fine day for a long conversation.", tmp_path / "long.wav")
    short_audio, rate = sf.read(short)
    long_audio, _ = sf.read(long)
    assert rate > 0 and np.abs(short_audio).max() > 0.01  # sound, not silence
    assert len(long_audio) > 2 * len(short_audio)


@needs_espeak
def test_text_that_cannot_be_spoken_is_refused_naming_why(tmp_path):
    for text, settings, message in [
        ("   ", TtsSettings(), "empty text"),
        ("x" * 2001, TtsSettings(), "over the limit of 2000"),
        ("hi", TtsSettings(voice="qqq"), "espeak-ng \\(voice 'qqq'\\) failed: .*voice does not exist"),
        ("hi", TtsSettings(voice="en; rm -rf"), "letters, digits"),
        ("hi", TtsSettings(model_dir=tmp_path), "kokoro is not installed|config.json is missing"),
    ]:
        with pytest.raises(SpeechError, match=message):
            synthesize_speech_file(text, tmp_path / "out.wav", settings)


@needs_espeak
def test_the_command_line_speaks_each_speech_text_for_its_person(tmp_path):
    image, audio = tmp_path / "face.png", tmp_path / "placeholder.wav"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    write_wav(audio, synthesize_speech(0.3), 16000)
    job = {"image": "face.png", "persons": [{"audio": "placeholder.wav"}], "steps": 1, "resolution": [32, 32]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    text = "Good morning to you."
    spoken = synthesize_speech_file(text, tmp_path / "expected.wav")
    out = tmp_path / "video.mp4"
    arguments = ["--input", str(tmp_path / "job.json"), "--model-dir", str(build_tiny_model_dir(tmp_path / "m"))]
    arguments += ["--out", str(out), "--device", "cpu", "--speech", text, "--mode", "streaming", "--frame-num", "5"]
    arguments += ["--motion-frames", "1"]
    assert generate.main(arguments) == 0
    expected_frames = int(sf.info(spoken).duration * VIDEO_FPS)  # the spoken text, not the 0.3 s placeholder
    assert probe_media(out).num_frames == expected_frames
