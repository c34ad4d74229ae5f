"""Flow-matching Euler sampling as the reference MultiTalk pipeline does it (wan/multitalk.py).

Timesteps live on the training scale [0, num_train_timesteps]; the model predicts the velocity noise - x0, and
the sample at time t is (1 - t/N) x0 + t/N noise. The arithmetic follows the reference operation by operation in
float32, so a run with the same model inputs reproduces its latents.
"""

from __future__ import annotations

import numpy as np
import torch


def shifted_timesteps(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The `steps + 1` float32 timesteps from N down to 0, each shifted: t' = s t / (1 + (s - 1) t) on t / N."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    # The reference builds linspace(N, 1, steps) in numpy float32, appends 0 and shifts every entry (the shift
    # keeps 0 at 0), each as a float32 tensor.
    timesteps = np.append(np.linspace(num_train_timesteps, 1, steps, dtype=np.float32), np.float32(0.0))
    t = torch.from_numpy(timesteps) / num_train_timesteps
    return shift * t / (1 + (shift - 1) * t) * num_train_timesteps


def euler_step(
    latent: torch.Tensor,
    velocity: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """One Euler step of the flow ODE from t to t_next: latent - velocity * (t - t_next) / N."""
    dt = _scalar_timestep(t, latent.device) - _scalar_timestep(t_next, latent.device)
    dt = dt / num_train_timesteps
    # The reference negates the prediction and adds it: the same value as subtracting.
    return latent + (-velocity) * dt


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """The flow-matching sample at time t, (1 - t/N) x0 + t/N noise (the re-noising of motion-frame latents)."""
    t = _scalar_timestep(t, x0.device) / num_train_timesteps
    return (1 - t) * x0 + t * noise


def _scalar_timestep(t: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A float32 0-d tensor: one timestep for the whole latent, as in the reference loop."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.numel() != 1:
        raise ValueError(f"expected one timestep, got shape {tuple(t.shape)}")
    return t.reshape(())


__all__ = ["add_noise", "euler_step", "shifted_timesteps"]
