"""A complete tiny MultiTalk model directory with random weights, written offline in seconds.

It has the layout `load_components` reads (see multitalk_model.components) with every component at toy size: the
transformer of the "tiny" preset, a 2-layer umT5 with a small T5-style tokenizer (whole words, single characters
and byte fallback), a 2-layer CLIP vision tower that still yields 257 tokens (224 px, patch 14), a narrow Wan VAE
with the real strides (4x8x8) and latent normalisation, the flow-matching scheduler at shift 7 and a tiny wav2vec2.
Tests, the demo and CI use it in place of the real weights; the same seed writes the same weights.

    python -m multitalk_model.build_tiny --out DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from .checkpoints import build_model
from .config import get_preset
from .wav2vec import build_tiny_wav2vec2

# Whole words a prompt is likely to use; anything else splits into characters, then UTF-8 bytes.
_WORDS = """
a an the and or of in on at to with without from by for is are was be his her their its this that these those it
he she they we you i who while as into over under near behind front side left right center middle top bottom
man woman men women person people boy girl child old young speaker host guest singer actor reporter couple friends
face head eyes eye mouth lips teeth smile hair hand hands arm arms shoulder shoulders body clothes shirt jacket suit
dress glasses hat scarf tie
talk talks talking speak speaks speaking say says saying sing sings singing laugh laughs laughing nod nods nodding
look looks looking listen listens listening sit sits sitting stand stands standing turn turns turning move moves
moving gesture gestures gesturing conversation interview podcast discussion dialogue debate meeting song news
camera shot close up medium wide view portrait background foreground light lighting bright dark soft natural warm
cold color colors studio room office kitchen car street outdoor indoor window table chair sofa desk wall door city
park garden night day sunny realistic high quality detailed sharp clear natural expression expressive emotional
calm happy sad angry serious friendly animated lively slow fast gently slightly naturally each other two one both
video frame scene blurred blurry static still overexposed low worst ugly deformed subtitles text watermark
"""
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random initialisation from `seed` without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-style (sentencepiece unigram) tokenizer over a few hundred pieces with byte fallback; works offline."""
    words = sorted(set(_WORDS.split()))
    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-"
    # Unigram picks the segmentation of highest total score: a whole word (one piece) beats its characters, and the
    # byte pieces only serve characters no piece covers.
    vocab = [(token, 0.0) for token in _SPECIAL_TOKENS]
    vocab += [(f"<0x{byte:02X}>", -20.0) for byte in range(256)]
    vocab += [("\u2581" + word, -1.0) for word in words]
    vocab += [("\u2581", -2.0)] + [(char, -2.0) for char in characters + characters.upper()]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=_SPECIAL_TOKENS.index("<unk>"), byte_fallback=True))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    eos_id = _SPECIAL_TOKENS.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_tiny_model_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model directory (all components) to out_dir, deterministically for the seed."""
    config = get_preset("tiny")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with _seeded(seed):
        build_model(config, "cpu").save_pretrained(out_dir / "transformer")

    tokenizer = _tiny_tokenizer()
    tokenizer.save_pretrained(out_dir / "tokenizer")
    text_config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=config.text_dim,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # as umT5-XXL
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        UMT5EncoderModel(text_config).save_pretrained(out_dir / "text_encoder")

    image_config = CLIPVisionConfig(
        hidden_size=config.image_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=14,  # (224 / 14)^2 patches + the class token = 257 tokens, as ViT-H/14
        hidden_act="gelu",
    )
    with _seeded(seed):
        CLIPVisionModel(image_config).save_pretrained(out_dir / "image_encoder")
    CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    ).save_pretrained(out_dir / "image_processor")

    with _seeded(seed):  # the default latents_mean / latents_std are Wan2.1's 16 channels
        # The smallest Wan VAE that keeps its 4x8x8 strides: one residual block per level, narrow channels.
        AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(out_dir / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0).save_pretrained(out_dir / "scheduler")
    build_tiny_wav2vec2(out_dir / "wav2vec2", seed=seed)

    model_index = {
        "_class_name": "WanImageToVideoPipeline",
        "_diffusers_version": diffusers.__version__,
        "image_encoder": ["transformers", "CLIPVisionModel"],
        "image_processor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["multitalk_model", "MultiTalkTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "wav2vec2": ["transformers", "Wav2Vec2Model"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random MultiTalk model directory.")
    parser.add_argument("--out", required=True, type=Path, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    print(build_tiny_model_dir(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
