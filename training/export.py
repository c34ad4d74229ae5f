"""Export a training checkpoint's audio weights as an official-format multitalk.safetensors.

    python training/export.py --checkpoint OUTPUT/RUN/checkpoint_00001000 --out multitalk.safetensors

The file has the keys of the released MultiTalk weights (blocks.N.audio_cross_attn.*, blocks.N.norm_x.*,
audio_proj.*): the model-core loader and the reference implementation both read it, beside the base Wan2.1-I2V
weights. A finished run exports its final weights to OUTPUT/multitalk.safetensors by itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multitalk_model.checkpoints import CheckpointError, build_model, export_audio_weights
from multitalk_model.config import get_preset
from training.checkpointing import checkpoint_config, trainable_state_dict


def export_checkpoint(checkpoint_dir: str | Path, out_path: str | Path) -> Path:
    """Writes the checkpoint's audio weights under their official names to out_path."""
    config = checkpoint_config(checkpoint_dir)
    model = build_model(get_preset(config.model.preset), "meta")
    state = trainable_state_dict(checkpoint_dir)
    expected = set(model.audio_parameter_names())
    if set(state) != expected:
        unknown, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise CheckpointError(f"{checkpoint_dir}: not the audio branch; unknown keys {unknown}, missing keys {missing}")
    model.load_state_dict(state, strict=False, assign=True)
    return export_audio_weights(model, out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory of a training run")
    parser.add_argument("--out", required=True, help="the multitalk.safetensors to write")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
