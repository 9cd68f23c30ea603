"""The sampling loop: a sampler's steps from pure noise, with classifier-free guidance.

Guidance is applied to the raw model output before the sampler sees it, so every sampler and every
prediction type is guided the same way; a guidance interval limits it to a band of noise levels.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from diffusion_lab.condition import Condition
from diffusion_lab.diffusion.samplers import Sampler


def noise_level(alpha_cumprod: float) -> float:
    """EDM's σ = √((1 − ᾱ)/ᾱ), the noise level of x_t/√ᾱ (inf at ᾱ = 0): schedule-independent, so a
    guidance interval given in σ means the same thing under every noise schedule."""
    return math.inf if alpha_cumprod <= 0 else math.sqrt((1 - alpha_cumprod) / alpha_cumprod)


@torch.no_grad()
def sample(
    model,
    sampler: Sampler,
    shape,
    condition: Condition | None = None,
    null_condition: Condition | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    device="cpu",
    return_intermediates: bool = False,
    progress: bool = False,
):
    """Run `sampler` from x_T ~ N(0, I) of `shape`, calling `model(x, t_batch, condition) -> output`.

    Classifier-free guidance at scale s (see `guided_model`); without `null_condition` no guidance is
    possible, so s must then be 1 unless `condition` is None. `guidance_interval` = (σ_lo, σ_hi) guides
    only the steps with σ_lo < σ_t ≤ σ_hi (Kynkäänniemi et al. 2024: guidance at high noise costs
    diversity, at low noise it does little); the other steps use s = 1, one pass on the conditional
    batch. None guides every step.

    Returns the samples, or (samples, {"x_t": inputs of each step, "x0": x̂₀ of each step}) on CPU.
    """
    if null_condition is None and condition is not None and guidance_scale != 1.0:
        raise ValueError("guidance_scale != 1 needs a null_condition for the unconditional pass")
    x = torch.randn(tuple(shape), generator=generator).to(device)
    predict = guided_model(model, condition, null_condition, guidance_scale, batch=x.shape[0])
    sampler.reset()
    intermediates = {"x_t": [], "x0": []}
    timesteps = sampler.timesteps.tolist()
    for t in tqdm(timesteps, desc="sampling") if progress else timesteps:
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        guide = _in_interval(noise_level(sampler.alphas_cumprod[t]), guidance_interval)
        step = sampler.step(predict(x, t_batch, guide), t, x, generator=generator)
        if return_intermediates:
            intermediates["x_t"].append(x.cpu())
            intermediates["x0"].append(step.pred_x0.cpu())
        x = step.prev_sample
    return (x, intermediates) if return_intermediates else x


def guided_model(
    model, condition: Condition | None, null_condition: Condition | None, scale: float, batch: int
):
    """`predict(x, t_batch, guide)`: the model's output, guided at scale s where `guide` is true.

    Classifier-free guidance (diffusers/DiT convention): out = u + s·(c − u) on the raw model output, which
    is linear in x̂₀ and ε̂ for every prediction type. s = 1 is the conditional model alone (null pass
    skipped), s = 0 the unconditional one (conditional pass skipped); otherwise both passes run as ONE
    forward on the doubled batch. A `null_condition` of batch 1 is repeated to the batch size.
    Without a condition or a null condition every step is the plain `model(x, t_batch, condition)`.
    """
    if condition is None or null_condition is None or scale == 1.0:
        return lambda x, t_batch, guide: model(x, t_batch, condition)
    if null_condition.batch_size == 1 and batch > 1:
        null_condition = null_condition.repeat_interleave(batch)
    if scale == 0.0:
        return lambda x, t_batch, guide: model(x, t_batch, null_condition if guide else condition)
    both = Condition.cat([condition, null_condition])  # built once, reused at every step

    def predict(x: torch.Tensor, t_batch: torch.Tensor, guide: bool) -> torch.Tensor:
        if not guide:
            return model(x, t_batch, condition)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), both).chunk(2)
        return uncond + scale * (cond - uncond)

    return predict


def _in_interval(sigma: float, interval: tuple[float, float] | None) -> bool:
    return interval is None or interval[0] < sigma <= interval[1]
