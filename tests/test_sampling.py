"""The flow-matching sampler arithmetic: shifted timesteps, Euler steps, re-noising."""

import pytest
import torch

from multitalk_model.sampling import add_noise, euler_step, shifted_timesteps


def test_shifted_timesteps_follow_the_reference_schedule():
    steps, shift = 4, 7.0
    timesteps = shifted_timesteps(steps, shift)
    # linspace(1000, 1, 4) = 1000, 667, 334, 1, then 0; each t/1000 -> 7 t / (1 + 6 t).
    expected = [1000 * shift * (t / 1000) / (1 + (shift - 1) * t / 1000) for t in (1000, 667, 334, 1, 0)]
    assert timesteps.dtype == torch.float32 and timesteps.shape == (steps + 1,)
    torch.testing.assert_close(timesteps, torch.tensor(expected), rtol=1e-6, atol=1e-4)
    # A larger shift spends more of the steps at high noise.
    assert (shifted_timesteps(40, 11.0)[1:-1] > shifted_timesteps(40, 7.0)[1:-1]).all()
    torch.testing.assert_close(shifted_timesteps(5, 1.0), torch.tensor([1000.0, 750.25, 500.5, 250.75, 1.0, 0.0]))


def test_euler_steps_along_the_true_velocity_land_on_the_clean_latent():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 3, 4, 4, generator=gen).unbind(0)
    velocity = noise - x0  # the straight path's velocity, the quantity the model predicts
    timesteps = shifted_timesteps(6, 7.0)
    latent = add_noise(x0, noise, timesteps[0])
    torch.testing.assert_close(latent, noise)
    for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=False):
        latent = euler_step(latent, velocity, t, t_next)
        torch.testing.assert_close(latent, add_noise(x0, noise, t_next), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent, x0, rtol=1e-5, atol=1e-5)


def test_add_noise_interpolates_linearly_in_t():
    x0, noise = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(add_noise(x0, noise, 0.0), x0)
    assert torch.equal(add_noise(x0, noise, torch.tensor([250.0])), torch.full((2, 3), 0.25))
    with pytest.raises(ValueError, match="one timestep"):
        add_noise(x0, noise, torch.tensor([1.0, 2.0]))
