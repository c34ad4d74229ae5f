"""diffusers' own model checks for the Wan transformer, run on MultiTalkTransformer3DModel through a small adapter.

Ported from huggingface/diffusers tests/models/transformers/test_models_transformer_wan.py and the mixins it
composes (tests/models/testing_utils/: common.py, memory.py, attention.py, compile.py, training.py); the checks are
re-stated here for our model, not copied. The adapter (`SuiteConfig`) gives them what Wan's tester config gives:
the model class, a tiny init dict and dummy inputs (here with audio, two persons and their region masks). Ported:

- ModelTesterMixin: save/load, sharded checkpoints, load in float16/bfloat16 with _keep_in_fp32_modules (our
  norm_audio among them), determinism, outputs equivalence (return_dict), layerwise casting keeps the fp32 modules;
- MemoryTesterMixin: group offloading (block and leaf level) equals the plain forward; layerwise casting inference;
- AttentionTesterMixin: fuse / unfuse QKV projections, get / set processor, processor dict and count mismatch;
- TorchCompileTesterMixin: fullgraph without recompilation, compile_repeated_blocks within one recompile;
- TrainingTesterMixin: gradient checkpointing is applied and gives the same loss and gradients.

Not ported: LoRA (peft is not a dependency), bitsandbytes / GGUF (CUDA only), torchao (tests/test_quantization.py
covers our torchao path), single-file loading (tests/test_transformer.py covers our converters), AOT compilation (needs
a C++ toolchain), accelerate's device_map CPU / disk offload.
"""

import pytest
import torch
from diffusers.models.attention import AttentionModuleMixin
from test_parallel import make_inputs

from multitalk_model.checkpoints import build_model
from multitalk_model.config import get_preset
from multitalk_model.transformer import (
    MultiTalkAudioAttnProcessor,
    MultiTalkSelfAttnProcessor,
    MultiTalkTransformer3DModel,
)

TINY = get_preset("tiny")


class SuiteConfig:
    """What diffusers' WanTransformer3DTesterConfig provides, for MultiTalk."""

    model_class = MultiTalkTransformer3DModel

    @staticmethod
    def model() -> MultiTalkTransformer3DModel:
        torch.manual_seed(0)
        return build_model(TINY, "cpu").eval()

    @staticmethod
    def inputs() -> dict[str, torch.Tensor]:
        return make_inputs((3, 6, 10), persons=2, streams=[2, 1])

    @staticmethod
    def single_person_inputs() -> dict[str, torch.Tensor]:
        return make_inputs((3, 4, 4), persons=1, streams=[1])


suite = SuiteConfig()


@pytest.fixture(scope="module")
def base_output() -> torch.Tensor:
    with torch.no_grad():
        return suite.model()(**suite.inputs()).sample


def forward(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or suite.inputs()), return_dict=False)[0]


# ------------------------------------------------------------------------------------------------ ModelTesterMixin


@pytest.mark.parametrize("max_shard_size", [None, "100KB"], ids=["one file", "sharded"])
def test_from_save_pretrained(base_output, tmp_path, max_shard_size):
    suite.model().save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if max_shard_size:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = suite.model_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(forward(loaded), base_output, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_save_pretrained_dtype_keeps_the_fp32_modules(tmp_path, dtype):
    suite.model().save_pretrained(tmp_path)
    loaded = suite.model_class.from_pretrained(tmp_path, torch_dtype=dtype)
    keep = suite.model_class._keep_in_fp32_modules
    assert "norm_audio" in keep
    for name, param in loaded.named_parameters():
        expected = torch.float32 if any(part in name.split(".") for part in keep) else dtype
        assert param.dtype == expected, name
    assert loaded.blocks[0].norm_audio.weight.dtype == torch.float32


def test_determinism_and_outputs_equivalence():
    model = suite.model()
    first, second = forward(model), forward(model)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-5)
    with torch.no_grad():
        as_dict = model(**suite.inputs(), return_dict=True).sample
    torch.testing.assert_close(as_dict, first, rtol=0, atol=0)
    assert first.shape == (2, TINY.out_channels, 3, 6, 10)


def test_keep_in_fp32_modules_layerwise_casting():
    model = suite.model()
    model.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    keep = suite.model_class._keep_in_fp32_modules
    for name, param in model.named_parameters():
        if any(part in name.split(".") for part in keep):
            assert param.dtype == torch.float32, name
    assert any(param.dtype == torch.float16 for param in model.parameters())


# ----------------------------------------------------------------------------------------------- MemoryTesterMixin


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading(base_output, offload_type):
    model = suite.model()
    model.enable_group_offload(torch.device("cpu"), offload_type=offload_type, num_blocks_per_group=1)
    hooked = [module for module in model.modules() if hasattr(module, "_diffusers_hook")]
    assert hooked and all(module._diffusers_hook.get_hook("group_offloading") for module in hooked)
    torch.testing.assert_close(forward(model), base_output, rtol=0, atol=1e-5)


@pytest.mark.parametrize("persons", ["one person", "two persons"])
def test_layerwise_casting_inference(persons):
    inputs = suite.single_person_inputs() if persons == "one person" else suite.inputs()
    model = suite.model()
    expected = forward(model, inputs)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    actual = forward(model, inputs)
    assert ((actual - expected).norm() / expected.norm()).item() < 0.1  # float8 storage: a few percent


# -------------------------------------------------------------------------------------------- AttentionTesterMixin


@pytest.mark.parametrize("persons", ["one person", "two persons"])
def test_fuse_unfuse_qkv_projections(persons):
    inputs = suite.single_person_inputs() if persons == "one person" else suite.inputs()
    model = suite.model()
    before = forward(model, inputs)
    model.fuse_qkv_projections()
    block = model.blocks[0]
    assert block.attn1.fused_projections and hasattr(block.attn1, "to_qkv")
    # The audio cross-attention fuses only its keys and values (queries come from the video, of another width).
    assert block.attn_audio.fused_projections and hasattr(block.attn_audio, "to_kv")
    torch.testing.assert_close(forward(model, inputs), before, rtol=0, atol=1e-5)
    model.unfuse_qkv_projections()
    for module in model.modules():
        if isinstance(module, AttentionModuleMixin):
            assert not hasattr(module, "to_qkv") and not hasattr(module, "to_kv") and not module.fused_projections
    torch.testing.assert_close(forward(model, inputs), before, rtol=0, atol=1e-5)


def test_get_set_processor_and_processor_dict():
    model = suite.model()
    processors = model.attn_processors
    kinds = {type(processor) for processor in processors.values()}
    assert {MultiTalkSelfAttnProcessor, MultiTalkAudioAttnProcessor} <= kinds
    for module in model.modules():
        if isinstance(module, AttentionModuleMixin):
            new = type(module.get_processor())()
            module.set_processor(new)
            assert module.get_processor() is new
    replacements = {name: type(processor)() for name, processor in processors.items()}
    model.set_attn_processor(dict(replacements))  # diffusers pops the entries it sets
    assert all(model.attn_processors[name] is replacements[name] for name in processors)
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({next(iter(processors)): MultiTalkSelfAttnProcessor()})


# --------------------------------------------------------------------------------------- TorchCompileTesterMixin
# The "eager" backend runs Dynamo's whole capture (graph breaks, guards, recompiles) without a C++ toolchain.


def test_torch_compile_recompilation_and_graph_break(base_output):
    torch._dynamo.reset()
    model = torch.compile(suite.model(), fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        forward(model)
        torch.testing.assert_close(forward(model), base_output, rtol=0, atol=1e-5)


def test_torch_compile_repeated_blocks(base_output):
    torch._dynamo.reset()
    model = suite.model()
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    with torch._dynamo.config.patch(recompile_limit=1):
        forward(model)
        torch.testing.assert_close(forward(model), base_output, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- TrainingTesterMixin


def test_gradient_checkpointing_equivalence():
    inputs = suite.inputs()
    results = []
    for checkpointing in (False, True):
        model = suite.model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.gradient_checkpointing
        loss = model(**inputs).sample.square().mean()
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-5)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=5e-5, msg=name)
