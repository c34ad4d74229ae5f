"""The transformer reproduces the golden outputs of the reference MultiTalk implementation.

Every `*.safetensors` in MULTITALK_REFERENCE_DIR (default ../shared/reference) holds a reference config, weights
under the original key names, inputs and the output of one fp32 forward pass.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multitalk_model.checkpoints import load_original
from multitalk_model.config import MultiTalkConfig

REFERENCE_DIR = Path(
    os.environ.get("MULTITALK_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)
GOLDEN_FILES = sorted(REFERENCE_DIR.glob("*.safetensors")) if REFERENCE_DIR.is_dir() else []


def read_golden(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


@pytest.mark.skipif(not GOLDEN_FILES, reason=f"no golden files in {REFERENCE_DIR} (set MULTITALK_REFERENCE_DIR)")
@pytest.mark.parametrize("golden", GOLDEN_FILES, ids=lambda path: path.stem)
def test_forward_matches_reference_output(golden: Path, tmp_path: Path) -> None:
    metadata, tensors = read_golden(golden)
    config = MultiTalkConfig.from_reference(metadata["config"])
    weights = tmp_path / "original.safetensors"
    save_file(with_prefix(tensors, "weights."), str(weights))
    model = load_original(config, [weights]).eval()

    inputs = with_prefix(tensors, "inputs.")
    persons = inputs["audio"].shape[0]
    assert persons == int(metadata.get("persons", persons))
    with torch.no_grad():
        out = model(
            hidden_states=torch.cat([inputs["x"], inputs["y"]])[None],
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["context"][None],
            encoder_hidden_states_image=inputs["clip_fea"],
            audio=inputs["audio"][None],
            region_masks=inputs["ref_target_masks"][None],
        ).sample
    torch.testing.assert_close(out, tensors["output"], rtol=1e-4, atol=1e-4)
