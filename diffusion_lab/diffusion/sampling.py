"""The sampling loop: a sampler's steps from pure noise, with classifier-free guidance.

Guidance is applied to the raw model output before the sampler sees it, so every sampler and every
prediction type is guided the same way; a guidance interval limits it to a band of noise levels.
The loop asks the sampler what differs between the discrete samplers and EDM's σ-space ones: the initial
noise scale, the x and time the model is given (a timestep, or σ after Heun's churn), and the σ of a step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from tqdm.auto import tqdm

from diffusion_lab.condition import Condition, Conditions
from diffusion_lab.diffusion.edm_samplers import SigmaSampler
from diffusion_lab.diffusion.guidance import guided_model
from diffusion_lab.diffusion.samplers import Sampler


@torch.no_grad()
def sample(
    model,
    sampler: Sampler | SigmaSampler,
    shape,
    condition: Condition | Conditions | None = None,
    null_condition: Condition | Conditions | None = None,
    guidance_scale: float | Mapping[str, float] = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    device="cpu",
    return_intermediates: bool = False,
    progress: bool = False,
    guidance_form: str = "nested",
    weak_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
):
    """Run `sampler` from x_T ~ N(0, σ_T² I) of `shape` (σ_T = 1 for a discrete schedule, σ_max for EDM),
    calling `model(x, t_batch, condition) -> output` (t_batch: the timestep, or σ for EDM).

    Classifier-free guidance at scale s, or one scale per named condition in `guidance_form` (see
    diffusion/guidance.py); without `null_condition` no guidance is
    possible, so s must then be 1 unless `condition` is None. `guidance_interval` = (σ_lo, σ_hi) guides
    only the steps with σ_lo < σ_t ≤ σ_hi (Kynkäänniemi et al. 2024: guidance at high noise costs
    diversity, at low noise it does little); the other steps use s = 1, one pass on the conditional
    batch. None guides every step.

    `weak_model(x, t_batch)`: guide by autoguidance against this weaker model instead of the null condition
    (guidance.autoguided_model). `on_step(i, x̂₀)` is called after step i with that step's x̂₀ (a live
    preview); an exception it raises stops the sampling there.

    Returns the samples, or (samples, {"x_t": inputs of each step, "x0": x̂₀ of each step}) on CPU.
    """
    unguidable = null_condition is None and weak_model is None
    if unguidable and condition is not None and guidance_scale not in (1, 1.0):
        raise ValueError("guidance_scale != 1 needs a null_condition for the unconditional pass")
    x = sampler.init_noise_sigma * torch.randn(tuple(shape), generator=generator).to(device)
    predict = guided_model(
        model, condition, null_condition, guidance_scale, x.shape[0], guidance_form, weak_model
    )
    sampler.reset()
    intermediates = {"x_t": [], "x0": []}
    timesteps = sampler.timesteps.tolist()
    for i, t in enumerate(tqdm(timesteps, desc="sampling") if progress else timesteps):
        x, model_t = sampler.model_input(x, t, generator)  # Heun's churn: x̂ at σ̂; else (x, t)
        t_batch = torch.full((x.shape[0],), model_t, dtype=sampler.time_dtype, device=device)
        guide = _in_interval(sampler.noise_level(model_t), guidance_interval)
        step = sampler.step(predict(x, t_batch, guide), t, x, generator=generator)
        if return_intermediates:
            intermediates["x_t"].append(x.cpu())
            intermediates["x0"].append(step.pred_x0.cpu())
        if on_step is not None:
            on_step(i, step.pred_x0)
        x = step.prev_sample
    return (x, intermediates) if return_intermediates else x


def _in_interval(sigma: float, interval: tuple[float, float] | None) -> bool:
    return interval is None or interval[0] < sigma <= interval[1]
