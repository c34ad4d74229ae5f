"""The memory plan from shapes, its command line, and the serving config refusing what cannot fit."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from multitalk_model.accounting import parameter_counts
from multitalk_model.config import get_preset
from multitalk_model.plan_memory import GiB, Options, main, parse_bytes, plan
from serving.config import ServingConfig

BIG = get_preset("multitalk-14b")
INFRA = Path(__file__).resolve().parents[1] / "infra" / "kuberay"


def test_memory_sizes_parse_in_both_units():
    assert parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("24 gigs")


def test_the_plans_weights_follow_the_options():
    gpu = parse_bytes("24GiB")
    whole = plan(Options(), 1, gpu, BIG)
    transformer = parameter_counts(BIG).total * 2  # bf16
    assert whole.weights > transformer  # plus the encoders and the VAE
    sharded = plan(Options(sharding=True), 4, gpu, BIG)
    # Sharding over 4 saves about 3/4 of the transformer and umT5 (less the gathered blocks and the root).
    assert 0.5 * transformer < whole.weights - sharded.weights < 0.75 * (whole.weights)
    int8 = plan(Options(quantization="int8"), 1, gpu, BIG)
    # The Wan linears of the blocks go from 2 bytes to 1; the audio branch (~2.5B) and the norms stay bf16.
    assert 0.4 * transformer < whole.weights - int8.weights < 0.5 * transformer
    with pytest.raises(ValueError, match="FSDP2 cannot shard torchao's quantised weights"):
        plan(Options(sharding=True, quantization="int8"), 4, gpu, BIG)
    offloaded = plan(Options(offload="group"), 1, gpu, BIG)
    assert offloaded.weights < 0.2 * whole.weights
    # Sequence parallel splits the tokens, so the activations shrink with K.
    assert plan(Options(sharding=True), 4, gpu, BIG).activations < whole.activations / 3


def test_fleets(capsys):
    gpu24, gpu80 = parse_bytes("24GiB"), parse_bytes("80GB")
    assert not plan(Options(), 1, gpu24, BIG).fits
    assert plan(Options(offload="group"), 1, gpu24, BIG).fits  # the reference's 24 GB card, with offload
    assert plan(Options(), 1, gpu80, BIG).fits
    assert not plan(Options(), 4, gpu24, BIG).fits
    assert plan(Options(sharding=True), 4, gpu24, BIG).fits  # the goal: 4 x 24 GB
    assert plan(Options(sharding=True), 8, gpu80, BIG).fits

    main(["--gpus", "4", "--gpu-memory", "24GiB", "--resolution", "480p"])
    out = capsys.readouterr().out
    assert "multitalk-14b on 4 x 24.0 GiB, 480p" in out
    rows = {line[:52].strip(): line.split()[-1] for line in out.splitlines() if "parallel" in line}
    assert rows["fsdp, none, offload none, sequence parallel"] == "yes"
    assert rows["replicated, none, offload none, sequence parallel"] == "no"
    assert "combinations fit" in out.splitlines()[-1]


def serving_config(**fields) -> ServingConfig:
    return ServingConfig.model_validate(
        {"model_dir": "models/multitalk", "device": "cuda", "dtype": "bfloat16", **fields}
    )


def test_serving_config_refuses_a_combination_that_cannot_fit():
    with pytest.raises(ValidationError, match=r"gpu_memory: 4 x 24GiB cannot hold multitalk-14b at 480p"):
        serving_config(devices_per_replica=4, gpu_memory="24GiB")
    config = serving_config(devices_per_replica=4, gpu_memory="24GiB", shard_weights=True)
    assert config.memory_plan().fits
    assert serving_config(gpu_memory="24GiB", offload="group").memory_plan().fits
    with pytest.raises(ValidationError, match="gpu_memory"):
        serving_config(gpu_memory="lots")
    with pytest.raises(ValidationError, match="fp8 needs a GPU"):
        serving_config(device="cpu", quantization="fp8")
    with pytest.raises(ValidationError, match="do not combine"):
        serving_config(devices_per_replica=2, shard_weights=True, offload="group")
    with pytest.raises(ValidationError, match="quantization: int8 and shard_weights do not combine"):
        serving_config(devices_per_replica=2, shard_weights=True, quantization="int8")


@pytest.mark.parametrize("fleet", ["1x24gb", "1x80gb", "8x80gb"])
def test_kuberay_examples_are_valid_serving_configs_that_fit(fleet):
    manifest = yaml.safe_load((INFRA / f"rayservice-{fleet}.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    config = ServingConfig.model_validate(serve_config["applications"][0]["args"])
    assert config.gpu_memory is not None and config.memory_plan().fits
    gpus = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0]
    assert gpus["resources"]["limits"]["nvidia.com/gpu"] == str(config.devices_per_replica)
