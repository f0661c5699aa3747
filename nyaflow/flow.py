"""Flow-matching math: the one place that fixes nyaflow's time convention. No I/O, torch only.

Convention (SD3 / ComfyUI / diffusers FlowMatchEulerDiscreteScheduler; the released model expects it):
- sigma in [0, 1] is the noise level: sigma = 0 is data, sigma = 1 is pure Gaussian noise.
- x_sigma = (1 - sigma) * x0 + sigma * eps, with x0 = VAE latent * scaling_factor and eps ~ N(0, I).
- The network is conditioned on timestep = 1000 * sigma (float, not rounded).
- The network predicts the velocity v = eps - x0 = d x_sigma / d sigma; the loss is unweighted MSE in fp32.
- Training sigma = sigmoid(n), n ~ N(mean, std) (logit-normal), then optionally shifted with
  sigma' = s * sigma / (1 + (s - 1) * sigma).
- Sampling integrates d x / d sigma = v from sigma = 1 down to 0 with Euler steps
  x <- x + (sigma_next - sigma) * v, and classifier-free guidance v = v_uncond + w * (v_cond - v_uncond).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution/time shift: s * sigma / (1 + (s - 1) * sigma); shift = 1 is the identity."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    n: int, mean: float, std: float, shift: float, generator: torch.Generator, device=None
) -> torch.Tensor:
    """Draw `n` training noise levels: logit-normal(mean, std), then shifted. Returns fp32 [n]."""
    normal = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float32)
    sigma = torch.sigmoid(mean + std * normal)
    return shift_sigma(sigma, shift).to(device)


def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def noisy_latents(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * eps (sigma broadcast per batch element)."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target v = eps - x0."""
    return eps - x0


def timesteps(sigma: torch.Tensor) -> torch.Tensor:
    """The network's time input: 1000 * sigma, a float."""
    return sigma * NUM_TRAIN_TIMESTEPS


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Unweighted mean squared error between predicted and target velocity, computed in fp32."""
    return torch.mean((v_pred.float() - velocity_target(x0.float(), eps.float())) ** 2)


def inference_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The sampling grid of diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps).

    `steps` values evenly spaced from 1 down to shift(1/1000) (the scheduler's smallest training sigma),
    shifted, then a final 0: `steps + 1` decreasing values. (diffusers shifts the low end twice; we follow
    it so that our sampler reproduces the exported pipeline's images.)
    """
    low = shift_sigma(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), shift)
    sigmas = shift_sigma(torch.linspace(1.0, low.item(), steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_sample(velocity: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dsigma = velocity(x, sigma) from sigmas[0] (noise) to sigmas[-1] (data).

    `velocity(x, sigma)` gets sigma as a 0-d tensor and returns v with x's shape (guidance applied inside).
    """
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = x + (sigma_next - sigma).to(x.dtype) * velocity(x, sigma)
    return x


def guided(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on velocities: v_uncond + scale * (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)
