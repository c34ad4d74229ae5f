"""The curation pipeline end to end on the shared real media, on a real local Ray: dual clips follow the turns
of a conversation, single-speaker clips carry their wav2vec features, bad inputs become rejects with their
reason, the shards read back with webdataset and Ray Data, and a killed run resumes with every clip exactly once."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import decord
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import soundfile as sf
import webdataset as wds
import yaml

from multitalk_model.faces import MTCNNDetector
from multitalk_model.fixtures.corpus import write_corpus
from multitalk_model.fixtures.speech import synthesize_speech
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from multitalk_model.media import read_video_frames, write_video
from pipelines.config import ConfigError, load_config
from pipelines.curate import run
from pipelines.plan import curation_steps, run_serially
from pipelines.record import Clip
from pipelines.schema import (
    MANIFEST_FILE,
    REJECTS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    WAV2VEC_KEY,
    Word,
    clip_id,
    parse_shard_name,
    person_audio_key,
)
from pipelines.sink import CorpusSink
from pipelines.stages.asr import AsrStage
from pipelines.stages.faces import mouth_motion
from pipelines.stages.probe import ProbeStage
from pipelines.stages.shots import ShotStage
from pipelines.storage import file_hash, list_inputs

REPO = Path(__file__).resolve().parents[1]
TURN_S = 5.04  # conversation_left_then_right.mp4: the left person speaks before, the right one after
FRAME_NUM = 81  # one window of the conversation holds both turns: [3.24, 6.48) s


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a `ray start` cluster on the machine
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def wav2vec_dir(tmp_path_factory) -> Path:
    return build_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"))


def _write_config(path: Path, wav2vec_dir: Path, frame_num: int, shard_size: int, **fields) -> Path:
    config = {
        "clips": {"frame_num": frame_num},
        # Two CPUs: the two model actors take one between them, the tasks the other.
        "faces": {"detect_every": 10, "num_cpus": 0.5},
        # Batches of one clip: clips stream to the writer one by one instead of waiting for each other.
        "wav2vec": {"model_path": str(wav2vec_dir), "num_cpus": 0.5, "batch_size": 1},
        "shards": {"size": shard_size},
        **fields,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def corpus(local_ray, wav2vec_dir, shared_media, tmp_path_factory) -> Path:
    """One run over every kind of input; the tests below read its output."""
    work = tmp_path_factory.mktemp("curation")
    (work / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(4000))
    (work / "notes.txt").write_text("not a video\n")
    inputs = [("conversation_left_then_right.mp4", "dual")] + [
        (name, "single")
        for name in (
            "talking_man_25fps.mp4",
            "talking_woman_25fps.mp4",
            "talking_man_30fps.mp4",
            "no_audio_track.mp4",
            "silent_audio_track.mp4",
        )
    ]
    rows = [{"path": str(shared_media / name), "kind": kind} for name, kind in inputs]
    # Relative paths resolve against the manifest's folder.
    rows += [{"path": "corrupt.mp4", "kind": "single"}, {"path": "notes.txt", "kind": "single"}]
    (work / "inputs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config_path = _write_config(work / "config.yaml", wav2vec_dir, FRAME_NUM, shard_size=2)
    run(load_config(config_path, input=str(work / "inputs.jsonl"), output=str(work / "out")))
    return work / "out"


def _manifest(output: Path) -> list[dict]:
    return pq.read_table(output / MANIFEST_FILE).to_pylist()


def _rejects(output: Path) -> list[dict]:
    return pq.read_table(output / REJECTS_FILE).to_pylist()


def _shards(output: Path) -> list[str]:
    return sorted(str(path) for path in output.glob("*.tar"))


def _samples(output: Path) -> dict[str, dict]:
    return {sample["__key__"]: sample for sample in wds.WebDataset(_shards(output), shardshuffle=False)}


def _energy_fraction(wave: np.ndarray, start_s: float, window_s: tuple[float, float]) -> float:
    """Share of a stream's energy that lies inside a window of source time."""
    times = start_s + np.arange(len(wave)) / 16000
    inside = (times >= window_s[0]) & (times < window_s[1])
    return float(np.sum(wave[inside] ** 2) / np.sum(wave**2))


def test_conversation_gives_dual_clips_whose_streams_follow_the_turns(corpus):
    samples = _samples(corpus)
    dual = [row for row in _manifest(corpus) if row["kind"] == "dual"]

    assert dual, "the window holding both turns must become a dual clip"
    for row in dual:
        sample = samples[row["clip_id"]]
        metadata = json.loads(sample["json"])
        assert len(metadata["persons"]) == 2 and row["n_person"] == 2
        left, right = metadata["persons"]
        assert left["bbox_xyxy"][0] < right["bbox_xyxy"][0]  # persons left to right
        left_wave, rate = sf.read(io.BytesIO(sample[person_audio_key(0)]))
        right_wave, _ = sf.read(io.BytesIO(sample[person_audio_key(1)]))
        assert rate == 16000 and len(left_wave) == len(right_wave) == FRAME_NUM * 640
        assert _energy_fraction(left_wave, row["start_s"], (0.0, TURN_S)) >= 0.9
        assert _energy_fraction(right_wave, row["start_s"], (TURN_S, 10.04)) >= 0.9
        assert min(left["binding_confidence"], right["binding_confidence"]) >= 0.2


def test_conversation_windows_with_one_speaker_are_rejected_as_unbound(corpus):
    rejects = [row for row in _rejects(corpus) if row["input"].endswith("conversation_left_then_right.mp4")]

    assert {row["reason"] for row in rejects} == {"speaker not bound"}
    assert all(row["end_s"] <= TURN_S or row["start_s"] >= TURN_S for row in rejects)


@pytest.mark.parametrize("name", ["talking_man_25fps.mp4", "talking_woman_25fps.mp4", "talking_man_30fps.mp4"])
def test_single_speaker_video_gives_single_clips_at_25fps_with_wav2vec_features(corpus, name):
    samples = _samples(corpus)
    rows = [row for row in _manifest(corpus) if row["source"].endswith(name)]

    assert rows and all(row["kind"] == "single" and row["n_person"] == 1 for row in rows)
    for row in rows:
        sample = samples[row["clip_id"]]
        features = np.load(io.BytesIO(sample[WAV2VEC_KEY]))
        assert features.shape == (1, FRAME_NUM, 12, 32) and features.dtype == np.float16
        assert np.isfinite(features).all()
        video = decord.VideoReader(io.BytesIO(sample["mp4"]))
        assert (len(video), round(video.get_avg_fps())) == (FRAME_NUM, 25)
        metadata = json.loads(sample["json"])
        assert (metadata["fps"], metadata["num_frames"]) == (25, FRAME_NUM)
        assert len(metadata["persons"][0]["track"]) == FRAME_NUM


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("no_audio_track.mp4", "no audio track"),
        ("silent_audio_track.mp4", "silent audio track"),
        ("corrupt.mp4", "unreadable"),
        ("notes.txt", "unreadable"),
    ],
)
def test_unusable_input_is_rejected_with_its_reason(corpus, name, reason):
    rejects = [row for row in _rejects(corpus) if Path(row["input"]).name == name]

    assert [(row["reason"], row["clip_id"]) for row in rejects] == [(reason, None)]
    assert not any(Path(row["source"]).name == name for row in _manifest(corpus))


def test_shards_read_back_with_webdataset_and_ray_data(corpus, local_ray):
    manifest = _manifest(corpus)

    samples = _samples(corpus)
    rows = ray.data.read_webdataset(_shards(corpus), decoder=None).take_all()

    assert sorted(samples) == sorted(row["clip_id"] for row in manifest)
    assert sorted(row["__key__"] for row in rows) == sorted(samples)
    for row in manifest:
        assert parse_shard_name(row["shard"])[0] == row["kind"]
        assert row["clip_id"] in {key for key, sample in samples.items() if sample["__url__"].endswith(row["shard"])}


def test_report_and_summary_describe_the_run(corpus):
    summary = json.loads((corpus / SUMMARY_FILE).read_text())

    assert summary["clips"] == len(_manifest(corpus))
    assert summary["rejects"] == len(_rejects(corpus))
    assert summary["rejects_by_reason"]["unreadable"] == 2
    assert "<img" in (corpus / REPORT_FILE).read_text()


def test_serial_run_in_one_process_curates_the_same_clips_as_ray(corpus, tmp_path):
    """The benchmark's baseline and the debugging mode run the very stages of the Ray graph."""
    work = corpus.parent
    seconds_by_step: dict[str, float] = {}
    config = load_config(work / "config.yaml", input=str(work / "inputs.jsonl"), output=str(tmp_path / "out"))

    run(config, serial=True, seconds_by_step=seconds_by_step)

    def without_shard(rows):
        return sorted(({k: v for k, v in row.items() if k != "shard"} for row in rows), key=lambda row: row["clip_id"])

    def reject_key(row):
        return (Path(row["input"]).name, row["clip_id"] or "", row["stage"], row["reason"])

    serial, parallel = without_shard(_manifest(tmp_path / "out")), without_shard(_manifest(corpus))
    assert [row["clip_id"] for row in serial] == [row["clip_id"] for row in parallel]
    for serial_row, parallel_row in zip(serial, parallel, strict=False):
        # Equal up to float noise: Ray gives each task fewer threads, which changes the order of float sums.
        assert serial_row == {
            key: pytest.approx(value, rel=1e-6) if isinstance(value, float) else value
            for key, value in parallel_row.items()
        }
    assert sorted(map(reject_key, _rejects(tmp_path / "out"))) == sorted(map(reject_key, _rejects(corpus)))
    assert {"probe", "shots", "faces", "wav2vec", "write"} <= set(seconds_by_step)
    assert all(seconds > 0 for seconds in seconds_by_step.values())


def test_rerun_over_a_finished_output_cuts_no_window_again(corpus, tmp_path):
    """Committed clips and clips rejected for what they are (here: unbound conversation windows) are finished work."""
    work = corpus.parent
    config = load_config(work / "config.yaml", input=str(work / "inputs.jsonl"), output=str(corpus))
    assert any(row["clip_id"] for row in _rejects(corpus))
    probe_and_shots = curation_steps(config, CorpusSink(str(corpus)).done_clip_ids)[:2]

    rows = run_serially(probe_and_shots, list_inputs(config.input, config.default_kind))

    assert rows and all(row["clip"].rejected and row["clip"].clip_id is None for row in rows)  # whole-input rejects


def test_killed_run_resumes_with_every_clip_exactly_once(local_ray, wav2vec_dir, shared_media, tmp_path):
    source = shared_media / "talking_woman_25fps.mp4"  # 5.0 s: 3 windows of 33 frames
    (tmp_path / "inputs.jsonl").write_text(json.dumps({"path": str(source)}) + "\n")
    inputs = str(tmp_path / "inputs.jsonl")
    config = _write_config(tmp_path / "config.yaml", wav2vec_dir, 33, shard_size=1, input=inputs)
    output = tmp_path / "out"

    # The job's driver dies as soon as it has committed its first shard.
    log = tmp_path / "first.log"
    env = {**os.environ, "RAY_ADDRESS": local_ray, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, str(REPO / "pipelines" / "curate.py"), "--config", str(config), "--output", str(output)]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not _shards(output) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, log.read_text()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    before_rerun = {path: Path(path).read_bytes() for path in _shards(output)}
    assert before_rerun and not (output / MANIFEST_FILE).exists()

    run(load_config(config, output=str(output)))

    manifest = _manifest(output)
    keys = [sample["__key__"] for sample in wds.WebDataset(_shards(output), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == len(manifest)
    assert sorted(keys) == sorted(row["clip_id"] for row in manifest)
    # Each window is a clip or a reject, never both.
    windows = {clip_id(file_hash(source), start, 33) for start in (0, 33, 66)}
    rejected = {row["clip_id"] for row in _rejects(output)}
    assert set(keys) | rejected == windows and not set(keys) & rejected
    assert not list(output.glob(".*"))  # no partial shard left behind
    for path, data in before_rerun.items():  # finished work is not redone
        assert Path(path).read_bytes() == data


def test_clip_ids_come_from_content_and_window():
    assert clip_id("abc", 0, 81) == clip_id("abc", 0, 81)
    assert len({clip_id("abc", 0, 81), clip_id("abc", 81, 81), clip_id("abd", 0, 81), clip_id("abc", 0, 33)}) == 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"clips": {"frame_num": 80}}, "clips.frame_num: Value error, must be 4n + 1"),
        ({"faces": {"detect_evry": 4}}, "faces.detect_evry: Extra inputs are not permitted"),
        ({"default_kind": "trio"}, "default_kind: Input should be 'auto', 'single', 'multi_event' or 'dual'"),
        ({"wav2vec": {"model_path": None}}, "wav2vec.model_path: required"),
        ({"wav2vec": {"model_path": "/nonexistent/w2v"}}, "wav2vec.model_path: /nonexistent/w2v is not a directory"),
    ],
)
def test_bad_config_fails_naming_the_field(tmp_path, fields, message):
    config = {"input": "videos", "output": "out", "wav2vec": {"model_path": str(tmp_path)}}
    for section, value in fields.items():
        config[section] = {**config.get(section, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_sample_corpus_has_every_kind_and_its_mouths_move_in_their_own_turns(tmp_path):
    manifest = write_corpus(tmp_path, duration_s=3.4)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]

    assert {row["kind"] for row in rows} == {"single", "dual", "multi_event"}
    assert all((tmp_path / row["path"]).is_file() for row in rows)
    assert (tmp_path / "wav2vec2-tiny" / "config.json").is_file()
    dual = next(row for row in rows if row["kind"] == "dual")
    frames = read_video_frames(tmp_path / dual["path"])
    faces = sorted(MTCNNDetector().detect(frames[0]), key=lambda face: face.box[0])
    assert len(faces) == 2
    gray = frames.astype(np.float32).mean(axis=-1)
    motion = [mouth_motion(gray, np.tile(face.box, (len(frames), 1))) for face in faces]
    for turn in dual["turns"]:
        inside = slice(round(turn["start_s"] * 25) + 1, round(turn["end_s"] * 25))
        speaker, listener = turn["person"], 1 - turn["person"]
        assert motion[speaker][inside].mean() > 3 * motion[listener][inside].mean()


def test_clip_windows_never_cross_a_cut(shared_media, wav2vec_dir, tmp_path):
    man = read_video_frames(shared_media / "talking_man_25fps.mp4", num_frames=40)
    woman = read_video_frames(shared_media / "talking_woman_25fps.mp4", num_frames=40)
    size = (man.shape[2], man.shape[1])
    cut = np.concatenate([man, np.stack([cv2.resize(frame, size) for frame in woman])])
    video = write_video(tmp_path / "cut.mp4", cut, 25, audio=np.zeros((1, 80 * 640), np.float32), audio_rate=16000)
    config = load_config(_write_config(tmp_path / "config.yaml", wav2vec_dir, 33, 1, input="in", output="out"))
    source = ProbeStage(config)({"clip": Clip(source=str(video), kind="multi_event")})

    windows = ShotStage(config)(source)

    # Without the cut at frame 40 a window would also start at 33.
    assert [row["clip"].start_frame for row in windows] == [0, 40]


def test_a_folder_input_lists_its_visible_files_with_the_default_kind(tmp_path):
    for name in ("b.mp4", "a.mkv", ".hidden.mp4", "sub/c.webm"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")

    rows = list_inputs(str(tmp_path), "dual")

    names = [Path(row["source"]).relative_to(tmp_path).as_posix() for row in rows]
    assert names == ["a.mkv", "b.mp4", "sub/c.webm"]
    assert {row["kind"] for row in rows} == {"dual"}


def _build_tiny_whisper(out_dir: Path) -> Path:
    """A random 1-layer Whisper with a byte-level vocabulary and Whisper's special tokens, converted for
    faster-whisper (CTranslate2)."""
    import ctranslate2
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>"]
    specials += ["<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    specials += [f"<|{i * 0.02:.2f}|>" for i in range(1501)]  # timestamp tokens
    vocab = {symbol: i for i, symbol in enumerate(pre_tokenizers.ByteLevel.alphabet())}  # every byte: no OOV
    vocab.update({token: len(vocab) + i for i, token in enumerate(specials)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    hf_dir = out_dir / "hf"
    hf_dir.mkdir(parents=True)
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    end, start = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=end, bos_token_id=end,
        eos_token_id=end, decoder_start_token_id=start, suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(hf_dir)
    converter = ctranslate2.converters.TransformersConverter(str(hf_dir), copy_files=["tokenizer.json"])
    return Path(converter.convert(str(out_dir / "ct2"), quantization="float32"))


def test_asr_words_carry_clip_times_and_the_person_speaking_then(tmp_path, wav2vec_dir):
    whisper_dir = _build_tiny_whisper(tmp_path / "whisper")
    config_path = _write_config(tmp_path / "config.yaml", wav2vec_dir, 81, 1, input="in", output="out")
    config = load_config(config_path)
    config.asr.model_path, config.asr.language, config.asr.compute_type = str(whisper_dir), "en", "float32"
    masks = np.zeros((2, 81), dtype=bool)
    masks[0, :40], masks[1, 40:] = True, True  # person 0 speaks the first 1.6 s, person 1 the rest
    clip = Clip(source="talk.mp4", kind="dual", num_frames=81, audio=synthesize_speech(3.24), person_masks=masks)

    AsrStage(config)({"clip": clip})

    assert clip.words and not clip.rejected  # a random model transcribes garbage, but with word timings
    for word in clip.words:
        assert 0 <= word["start_s"] <= word["end_s"] <= 3.24
        middle_frame = min(int((word["start_s"] + word["end_s"]) / 2 * 25), 80)
        assert word["person"] == (0 if middle_frame < 40 else 1)
    assert [Word(**word).model_dump() for word in clip.words] == clip.words  # valid sample metadata
