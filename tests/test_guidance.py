"""Text + audio guidance: pass layout, combination algebra, APG, batched passes and the step cache."""

import pytest
import torch

from multitalk_model.checkpoints import build_model
from multitalk_model.config import get_preset
from multitalk_model.guidance import (
    APGState,
    GuidanceScales,
    GuidedDenoiser,
    StepCache,
    combine,
    guidance_passes,
)
from multitalk_model.sampling import euler_step, shifted_timesteps

TINY = get_preset("tiny")
LATENT = (3, 8, 8)  # T, H, W
THREE_PASS, TWO_PASS = GuidanceScales(text=5.0, audio=4.0), GuidanceScales(text=1.0, audio=2.5)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY, "cpu").eval()


def clip_conditions(persons: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One clip's conditions: texts of different lengths, per-person audio, left/right person regions."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = LATENT
    frames = TINY.vae_scale * (t - 1) + 1
    masks = torch.zeros(1, persons + 1, h, w)
    for p in range(persons):
        masks[0, p, 2:, p * w // persons : (p + 1) * w // persons] = 1
    masks[0, persons, :2] = 1  # background: the top rows
    audio_shape = (1, persons, frames, TINY.audio_window, TINY.audio_layers, TINY.audio_channels)
    return {
        "text": torch.randn(1, 7, TINY.text_dim, generator=gen),
        "negative_text": torch.randn(1, 5, TINY.text_dim, generator=gen),
        "image": torch.randn(1, 257, TINY.image_dim, generator=gen),
        "audio": torch.randn(*audio_shape, generator=gen),
        "region_masks": masks,
    }


def latent_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, TINY.in_channels, *LATENT, generator=torch.Generator().manual_seed(seed))


def sample(denoiser: GuidedDenoiser, steps: int) -> torch.Tensor:
    """A few Euler steps on the noisy-latent channels; the condition channels stay fixed."""
    x = latent_input()
    latent, condition = x[:, : TINY.out_channels], x[:, TINY.out_channels :]
    timesteps = shifted_timesteps(steps, 7.0)
    for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=False):
        velocity = denoiser(torch.cat([latent, condition], dim=1), t)
        latent = euler_step(latent, velocity, t, t_next)
    return latent


def test_text_scale_one_switches_to_two_passes():
    assert guidance_passes(THREE_PASS) == ["cond", "drop_text", "uncond"]
    assert guidance_passes(TWO_PASS) == ["cond", "drop_audio"]


def test_combine_matches_the_hand_computed_guidance():
    cond, drop_text, uncond, drop_audio = (torch.full((1, 2), value) for value in (3.0, 2.0, 0.5, 1.0))
    # e_u + 5 (e_c - e_dt) + 4 (e_dt - e_u) = 0.5 + 5 * 1 + 4 * 1.5
    three = combine({"cond": cond, "drop_text": drop_text, "uncond": uncond}, THREE_PASS)
    assert torch.equal(three, torch.full((1, 2), 11.5))
    # e_da + 2.5 (e_c - e_da) = 1 + 2.5 * 2
    assert torch.equal(combine({"cond": cond, "drop_audio": drop_audio}, TWO_PASS), torch.full((1, 2), 6.0))
    with pytest.raises(ValueError, match="drop_audio"):
        combine({"cond": cond, "drop_text": drop_text, "uncond": uncond}, TWO_PASS)


def parallel_part(diff: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per sample: the component of diff along direction."""
    unit = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    return (diff * unit).flatten(1).sum(1).view(-1, 1, 1, 1, 1) * unit


def test_apg_without_momentum_or_clipping_is_plain_guidance_minus_the_parallel_components():
    gen = torch.Generator().manual_seed(0)
    cond, drop_text, uncond = torch.randn(3, 2, 4, 3, 2, 2, dtype=torch.float64, generator=gen).unbind(0)
    preds = {"cond": cond, "drop_text": drop_text, "uncond": uncond}
    apg = APGState(momentum=0.0, norm_threshold=1e9)
    guided = combine(preds, THREE_PASS, apg)
    expected = (
        combine(preds, THREE_PASS)
        - (THREE_PASS.text - 1) * parallel_part(cond - drop_text, cond)
        - (THREE_PASS.audio - 1) * parallel_part(drop_text - uncond, cond)
    )
    torch.testing.assert_close(guided, expected)
    assert not torch.allclose(guided, combine(preds, THREE_PASS))


def test_apg_momentum_and_norm_clipping_carry_over_steps():
    gen = torch.Generator().manual_seed(1)
    cond, drop_audio = torch.randn(2, 1, 4, 3, 2, 2, dtype=torch.float64, generator=gen).unbind(0)
    cond_2 = cond + 0.1
    apg = APGState(momentum=-0.75, norm_threshold=0.5)
    combine({"cond": cond, "drop_audio": drop_audio}, TWO_PASS, apg)
    second = combine({"cond": cond_2, "drop_audio": drop_audio}, TWO_PASS, apg)
    # Step 2 guides with the running average d2 - 0.75 d1, scaled down to norm 0.5, minus its part along e_c.
    running = (cond_2 - drop_audio) - 0.75 * (cond - drop_audio)
    clipped = running * 0.5 / running.norm()
    expected = cond_2 + (TWO_PASS.audio - 1) * (clipped - parallel_part(clipped, cond_2))
    torch.testing.assert_close(second, expected)


@pytest.mark.parametrize("scales", [THREE_PASS, TWO_PASS], ids=["three_passes", "two_passes"])
def test_batched_passes_equal_separate_passes_for_two_persons(tiny_model, scales):
    conditions = clip_conditions(persons=2)
    x, t = latent_input(), torch.tensor(700.0)
    batched = GuidedDenoiser(tiny_model, scales, **conditions)(x, t)
    separate = GuidedDenoiser(tiny_model, scales, **conditions, batched=False)(x, t)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    assert batched.shape == (1, TINY.out_channels, *LATENT)


def test_step_cache_with_threshold_zero_never_skips_and_is_exact(tiny_model):
    conditions = clip_conditions(persons=2)
    cache = StepCache(threshold=0.0, warmup_steps=1)
    cached = sample(GuidedDenoiser(tiny_model, THREE_PASS, **conditions, step_cache=cache), steps=4)
    plain = sample(GuidedDenoiser(tiny_model, THREE_PASS, **conditions), steps=4)
    assert torch.equal(cached, plain)
    assert cache.skipped == 0 and cache.computed == 4 * 3


@pytest.mark.parametrize("scales", [THREE_PASS, TWO_PASS], ids=["three_passes", "two_passes"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "separate"])
def test_step_cache_skips_after_warmup_with_one_state_per_pass(tiny_model, scales, batched):
    conditions = clip_conditions(persons=2)
    cache = StepCache(threshold=1e9, warmup_steps=2)
    denoiser = GuidedDenoiser(tiny_model, scales, **conditions, step_cache=cache, batched=batched)
    sample(denoiser, steps=8)
    passes = guidance_passes(scales)
    assert cache.passes == passes
    assert cache.computed == 2 * len(passes) and cache.skipped == 6 * len(passes)
    assert cache.skipped_fraction == pytest.approx(0.75)

    # Each pass reuses its own residual: at the inputs of the last computed step, a skipped step reproduces
    # the uncached velocity exactly (a residual reused across passes would not).
    x, t = latent_input(seed=5), torch.tensor(400.0)
    cache = StepCache(threshold=1e9, warmup_steps=1)
    denoiser = GuidedDenoiser(tiny_model, scales, **conditions, step_cache=cache, batched=batched)
    denoiser(x, t)
    reused = denoiser(x, t)
    assert cache.skipped == len(passes)
    torch.testing.assert_close(reused, GuidedDenoiser(tiny_model, scales, **conditions)(x, t), rtol=1e-5, atol=1e-5)


def test_step_cache_accumulates_the_rescaled_change_until_the_threshold():
    # A constant polynomial makes every step add 0.3: with threshold 0.5, one step in two is skipped.
    cache = StepCache(threshold=0.5, coefficients=[0.3], warmup_steps=1)
    decisions = []
    for step in range(7):
        compute = cache.must_compute("cond", torch.full((6, 4), float(step + 1)))
        decisions.append(compute)
        if compute:
            cache.store("cond", torch.zeros(1))
        else:
            cache.reuse("cond")
    assert decisions == [True, False, True, False, True, False, True]
