"""Speech from text, for a person given as words instead of a recording.

With a configured model directory, a Kokoro-82M TTS model synthesises it (the reference InfiniteTalk/MultiTalk
demos voice their text with Kokoro); without one, espeak-ng does, offline and always available on the machine
(`apt-get install espeak-ng`). Either way the result is a 16-bit WAV file that the job then uses like any upload.

    synthesize_speech_file("Hello there.", "person1.wav")                       # espeak-ng
    synthesize_speech_file("Hello there.", "person1.wav", TtsSettings(model_dir="models/Kokoro-82M", voice="af_heart"))
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

KOKORO_SAMPLE_RATE = 24000
_VOICE_PATTERN = re.compile(r"[A-Za-z0-9_+\-]{1,40}")
MAX_TEXT_CHARS = 2000


class SpeechError(ValueError):
    """Text that cannot be spoken, or a speech synthesiser that cannot run; the message says which."""


@dataclass(frozen=True)
class TtsSettings:
    """Which synthesiser speaks text: a Kokoro model directory (config.json, the .pth weights, voices/) or, when
    model_dir is None, espeak-ng with `voice` as its voice name (e.g. en, en-us, de)."""

    model_dir: Path | None = None
    voice: str | None = None


def synthesize_speech_file(text: str, out_path: str | Path, settings: TtsSettings = TtsSettings()) -> Path:
    """Speaks `text` into a WAV file at out_path; SpeechError names what is wrong."""
    text = text.strip()
    if not text:
        raise SpeechError("empty text: give the words the person says")
    if len(text) > MAX_TEXT_CHARS:
        raise SpeechError(f"{len(text)} characters, over the limit of {MAX_TEXT_CHARS}")
    if settings.voice is not None and not _VOICE_PATTERN.fullmatch(settings.voice):
        raise SpeechError(f"voice {settings.voice!r}: letters, digits, '_', '-' and '+' only")
    out_path = Path(out_path)
    if settings.model_dir is not None:
        wave = _kokoro(text, Path(settings.model_dir), settings.voice)
        sf.write(out_path, wave, KOKORO_SAMPLE_RATE, subtype="PCM_16", format="WAV")
    else:
        _espeak(text, out_path, settings.voice or "en")
    return out_path


def _espeak(text: str, out_path: Path, voice: str) -> None:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SpeechError("espeak-ng is not installed (apt-get install espeak-ng), and no TTS model is configured")
    # The text goes in on stdin: never on the command line, where a leading '-' would read as an option.
    done = subprocess.run(
        [binary, "-v", voice, "-w", str(out_path), "--stdin"],
        input=text.encode(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0 or not out_path.is_file() or out_path.stat().st_size <= 44:
        message = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise SpeechError(f"espeak-ng (voice {voice!r}) failed: {message}")


def _kokoro(text: str, model_dir: Path, voice: str | None) -> np.ndarray:
    """Kokoro's KModel from local files only (config.json, one .pth, voices/<voice>.pt), never from a hub."""
    try:
        import torch
        from kokoro import KModel, KPipeline
    except ImportError as error:
        raise SpeechError(f"a TTS model is configured ({model_dir}) but kokoro is not installed: {error}") from None
    voice = voice or "af_heart"
    config, weights = model_dir / "config.json", sorted(model_dir.glob("*.pth"))
    voice_file = model_dir / "voices" / f"{voice}.pt"
    for needed in (config, voice_file):
        if not needed.is_file():
            raise SpeechError(f"TTS model {model_dir}: {needed.name} is missing")
    if not weights:
        raise SpeechError(f"TTS model {model_dir}: no .pth weights")
    model = KModel(config=str(config), model=str(weights[0])).eval()
    # The language code is the voice's first letter in Kokoro's naming (a = American English, b = British, ...).
    pipeline = KPipeline(lang_code=voice[0], model=model)
    with torch.no_grad():
        pieces = [result.audio.numpy() for result in pipeline(text, voice=str(voice_file)) if result.audio is not None]
    if not pieces:
        raise SpeechError(f"TTS model {model_dir} produced no audio for the text")
    return np.concatenate(pieces).astype(np.float32)
