"""A diffusers scheduler for the exported model that `StableDiffusionXLPipeline` can drive.

diffusers' FlowMatchEulerDiscreteScheduler implements nyaflow's convention (nyaflow.flow), but the SDXL
pipeline also reads `init_noise_sigma` and calls `scale_model_input`, which it lacks. This subclass adds
both with the values flow matching needs: the initial latent is unscaled N(0, I) noise, and the model input
is not rescaled.
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler


class FlowMatchEulerSDXLScheduler(FlowMatchEulerDiscreteScheduler):
    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep=None):
        return sample
