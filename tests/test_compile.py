"""The whole transformer traces into one graph: torch.compile(fullgraph=True) and torch.export, as stock Wan does.

Which samples use L-RoPE and which have fewer streams is data; the forward branches only on shapes and on which
arguments are given, so a batch that mixes a two-person sample with a one-stream one traces without a break.
"""

import pytest
import torch
from test_parallel import make_inputs, tiny_transformer

CASES = {"one person": ((3, 4, 4), 1, [1]), "two persons beside a silent pass": ((3, 6, 10), 2, [2, 1])}


@pytest.fixture(scope="module")
def model():
    return tiny_transformer()


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_fullgraph_compile_matches_eager(model, case):
    inputs = make_inputs(*CASES[case])
    torch._dynamo.reset()
    # The "eager" backend runs Dynamo's whole capture (fullgraph fails on any graph break) without a C++ compiler.
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**inputs).sample, model(**inputs).sample, rtol=0, atol=0)


@torch.no_grad()
def test_export_matches_eager(model):
    inputs = make_inputs(*CASES["two persons beside a silent pass"])
    program = torch.export.export(model, (), kwargs=inputs)
    torch.testing.assert_close(program.module()(**inputs).sample, model(**inputs).sample, rtol=0, atol=0)


def test_eager_forward_still_checks_the_stream_counts(model):
    inputs = make_inputs(*CASES["two persons beside a silent pass"])
    with pytest.raises(ValueError, match=r"audio_streams must hold 2 counts in \[1, 2\]"):
        model(**{**inputs, "audio_streams": torch.tensor([3, 1])})
    with pytest.raises(ValueError, match=r"2 audio streams need region_masks"):
        model(**{**inputs, "region_masks": None})
