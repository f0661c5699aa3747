"""The flow-matching convention (DESIGN.md §2), pinned by hand computations and an analytic check."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from nyaflow import flow


def test_path_endpoints_and_target():
    x0, eps = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    assert torch.equal(flow.noisy_latents(x0, eps, torch.tensor([0.0, 0.0])), x0)  # sigma 0 is data
    assert torch.equal(flow.noisy_latents(x0, eps, torch.tensor([1.0, 1.0])), eps)  # sigma 1 is noise
    assert torch.allclose(flow.noisy_latents(x0, eps, torch.tensor([0.25, 0.25])), torch.full((2, 3), 1.25))
    assert torch.equal(flow.velocity_target(x0, eps), torch.full((2, 3), -3.0))
    assert torch.equal(flow.timesteps(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, 500.0, 1000.0]))


def test_loss_is_unweighted_fp32_mse_against_eps_minus_x0():
    x0 = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    eps = torch.tensor([[0.5, -1.0]], dtype=torch.bfloat16)
    v = torch.tensor([[0.0, 0.0]], dtype=torch.bfloat16)
    # target = eps - x0 = (-0.5, -3); mse = (0.25 + 9) / 2
    loss = flow.flow_loss(v, x0, eps)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(4.625)


def test_logit_normal_sigma_moments_and_shift():
    g = torch.Generator().manual_seed(0)
    sigma = flow.sample_sigmas(200_000, mean=0.3, std=0.8, shift=1.0, generator=g)
    logit = torch.log(sigma / (1 - sigma))
    assert logit.mean().item() == pytest.approx(0.3, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    assert sigma.min() > 0 and sigma.max() < 1
    # shift s maps sigma to s*sigma / (1 + (s-1)*sigma): 0.5 -> 0.75 for s = 3, identity for s = 1
    assert flow.shift_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    g = torch.Generator().manual_seed(0)
    shifted = flow.sample_sigmas(200_000, 0.3, 0.8, 3.0, g)
    assert torch.allclose(shifted, flow.shift_sigma(sigma, 3.0))


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (20, 3.0), (28, 1.0)])
def test_inference_grid_matches_diffusers_scheduler(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    assert torch.allclose(flow.inference_sigmas(steps, shift), scheduler.sigmas.float(), atol=1e-6)
    assert torch.allclose(
        flow.timesteps(flow.inference_sigmas(steps, shift)[:-1]), scheduler.timesteps, atol=1e-3
    )


def test_euler_step_matches_diffusers_scheduler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = flow.inference_sigmas(10, 3.0)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ours = flow.euler_sample(lambda x_, s: v, x, sigmas[:2])
    theirs = scheduler.step(v, scheduler.timesteps[0], x).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sampler_with_exact_velocity_reproduces_gaussian_data():
    """For x0 ~ N(m, s^2) the exact velocity E[eps - x0 | x_sigma] is known in closed form; integrating it
    from sigma = 1 (noise) to 0 must give back the data distribution. A reversed time direction or a wrong
    sign of v fails this."""
    m, s = 2.0, 0.5

    def exact_velocity(x, sigma):
        a, b = 1 - sigma, sigma
        var = a * a * s * s + b * b
        resid = x - a * m
        e_x0 = m + a * s * s / var * resid
        e_eps = b / var * resid
        return e_eps - e_x0

    noise = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = flow.euler_sample(exact_velocity, noise, flow.inference_sigmas(200, 1.0).double())
    assert x.mean().item() == pytest.approx(m, abs=0.01)
    assert x.std().item() == pytest.approx(s, abs=0.01)


def test_guidance_formula():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert flow.guided(u, c, 1.0).item() == 3.0
    assert flow.guided(u, c, 0.0).item() == 1.0
    assert flow.guided(u, c, 2.5).item() == pytest.approx(6.0)
    assert not math.isnan(flow.guided(u, c, 7.0).item())
