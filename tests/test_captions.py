"""Captions (stage 8): a vision-language model loaded from a local directory captions the clip's middle frame and
the caption records where it came from; without a model the manifest's caption is used, and multi_event clips
without one are rejected. The model is a tiny random BLIP built and saved here. Last, a curation run with both
model stages as actor pools (the captioner and SyncNet) writes their captions and Sync-C/Sync-D to the corpus."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import webdataset as wds
import yaml
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
)

from evaluation.syncnet import SyncNet
from multitalk_model.fixtures.tiny_wav2vec2 import build_tiny_wav2vec2
from multitalk_model.media import read_video_frames, write_video
from pipelines.config import ConfigError, CurationConfig, load_config
from pipelines.curate import run
from pipelines.record import Clip
from pipelines.schema import MANIFEST_FILE
from pipelines.stages.captions import CaptionStage
from pipelines.stages.sample import clip_metadata

NUM_FRAMES = 9
_WORDS = ["a", "man", "woman", "talking", "to", "the", "camera", "in", "room", "smiling", "two", "people"]


def _build_tiny_blip(out_dir: Path) -> Path:
    """A random BLIP captioner (32-d, one layer per tower) with a word-level vocabulary, saved as a model directory."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate(specials + _WORDS)}
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(vocab=vocab, bos_token="[DEC]"),
    )
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
                eos_token_id=vocab["[SEP]"], sep_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(
        out_dir
    )
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return _build_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


@pytest.fixture(scope="module")
def talking_clip(shared_media, tmp_path_factory) -> Clip:
    frames = read_video_frames(shared_media / "talking_woman_25fps.mp4", num_frames=NUM_FRAMES)
    path = write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, 25)
    return Clip(
        source="talking_woman_25fps.mp4",
        kind="multi_event",
        source_hash="0" * 64,
        num_frames=NUM_FRAMES,
        mp4=path.read_bytes(),
        width=frames.shape[2],
        height=frames.shape[1],
        tracks=np.zeros((0, NUM_FRAMES, 4)),
    )


def _config(tmp_path: Path, **captions: object) -> CurationConfig:
    config = {"input": "in", "output": "out", "wav2vec": {"model_path": str(tmp_path)}, "captions": captions}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return load_config(tmp_path / "config.yaml")


def test_model_caption_is_recorded_with_the_model_name(blip_dir, talking_clip, tmp_path):
    clip = dataclasses.replace(talking_clip)

    CaptionStage(_config(tmp_path, model_path=str(blip_dir), max_new_tokens=6))({"clip": clip})

    assert not clip.rejected
    assert clip.caption and set(clip.caption.split()) <= set(_WORDS)  # random weights: vocabulary words
    assert clip.caption_source == "model:tiny-blip"
    metadata = clip_metadata(clip)  # the sample's json accepts it
    assert (metadata.caption, metadata.caption_source) == (clip.caption, "model:tiny-blip")


def test_manifest_caption_is_kept_unless_the_model_replaces_it(blip_dir, talking_clip, tmp_path):
    kept = dataclasses.replace(talking_clip, caption="a woman speaks to the camera")
    replaced = dataclasses.replace(kept)

    CaptionStage(_config(tmp_path, model_path=str(blip_dir)))({"clip": kept})
    CaptionStage(_config(tmp_path, model_path=str(blip_dir), replace_manifest=True))({"clip": replaced})

    assert (kept.caption, kept.caption_source) == ("a woman speaks to the camera", "manifest")
    assert replaced.caption != kept.caption and replaced.caption_source == "model:tiny-blip"


def test_without_a_model_multi_event_clips_need_a_manifest_caption(talking_clip, tmp_path):
    uncaptioned = dataclasses.replace(talking_clip)
    single = dataclasses.replace(talking_clip, kind="single")

    stage = CaptionStage(_config(tmp_path))
    stage({"clip": uncaptioned})
    stage({"clip": single})

    assert (uncaptioned.reject_reason, uncaptioned.caption_source) == ("no caption", "none")
    assert "input manifest has none" in uncaptioned.reject_detail
    assert not single.rejected and single.caption_source == "none"


def test_captions_model_path_must_be_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"captions\.model_path: .*missing is not a directory"):
        _config(tmp_path, model_path=str(tmp_path / "missing"))


@pytest.mark.slow
def test_curation_run_with_model_stages_records_model_captions_and_syncnet_scores(shared_media, blip_dir, tmp_path):
    torch.save(SyncNet().state_dict(), tmp_path / "syncnet.model")
    source = shared_media / "talking_woman_25fps.mp4"
    (tmp_path / "inputs.jsonl").write_text(json.dumps({"path": str(source), "kind": "single"}) + "\n")
    config = {
        "input": str(tmp_path / "inputs.jsonl"),
        "output": str(tmp_path / "out"),
        "clips": {"frame_num": 33, "stride": 200},  # one clip: SyncNet on a CPU takes a while per window
        "faces": {"detect_every": 8, "num_cpus": 0.25},
        "sync": {"syncnet_path": str(tmp_path / "syncnet.model"), "min_syncnet_confidence": 0.0, "num_cpus": 0.25},
        "wav2vec": {"model_path": str(build_tiny_wav2vec2(tmp_path / "wav2vec2")), "num_cpus": 0.25, "batch_size": 1},
        "captions": {"model_path": str(blip_dir), "max_new_tokens": 6, "num_cpus": 0.25},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        run(load_config(tmp_path / "config.yaml"))
    finally:
        ray.shutdown()

    [row] = pq.read_table(tmp_path / "out" / MANIFEST_FILE).to_pylist()
    assert (row["caption_source"], row["sync_source"]) == ("model:tiny-blip", "syncnet")
    assert row["sync_confidence"] >= 0 and row["sync_distance"] > 0
    [sample] = wds.WebDataset(sorted(str(path) for path in (tmp_path / "out").glob("*.tar")), shardshuffle=False)
    metadata = json.loads(sample["json"])
    assert metadata["caption"] == row["caption"] and metadata["persons"][0]["sync_distance"] == row["sync_distance"]
