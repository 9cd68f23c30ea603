"""Autoguidance (`weak_model=`) on Gaussian toys whose guided probability-flow ODE has a closed-form end.

With exact denoisers D₁ of N(μ₁, s₁²) and D₀ of N(μ₀, s₀²), the guided denoiser D₀ + w(D₁ − D₀) has the
score w∇log p₁ + (1 − w)∇log p₀, affine in x, so the ODE dy/dσ = σ·y·a(σ) (y = x − centre, VE form) is
solved in closed form:
- equal variances s²: the guided score is exactly that of N(μ_w, s²), μ_w = μ₀ + w(μ₁ − μ₀), so from
  x_T ~ N(0, 1) (VP) the samples are N(μ_w(1 − r), (r/√ᾱ_T)²), r = s/√(s² + σ_T²);
- equal means 0: a(σ) = w/(s₁² + σ²) + (1 − w)/(s₀² + σ²), so the std ends at
  (1/√ᾱ_T)·(s₁²/(s₁² + σ_T²))^{w/2}·(s₀²/(s₀² + σ_T²))^{(1−w)/2}.
σ_T = √((1 − ᾱ_T)/ᾱ_T) at the first sampling step. DDIM with many steps integrates that ODE.
"""

import math

import pytest
import torch

from diffusion_lab.diffusion.guidance import autoguided_model
from diffusion_lab.diffusion.samplers import DDIMSampler
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.errors import ConfigError
from tests.diffusion.gaussian import GaussianModel, gen

SCHEDULE = NoiseSchedule("linear", 1000)
STEPS = 250


def draw(strong: GaussianModel, weak: GaussianModel, scale: float, n: int = 20000) -> torch.Tensor:
    sampler = DDIMSampler(SCHEDULE, "sample", STEPS, spacing="trailing", clip_sample=False)
    a_T = float(SCHEDULE.alphas_cumprod_f64[sampler.timesteps[0]])
    x = sample(
        strong, sampler, (n, 1), condition=None, guidance_scale=scale, generator=gen(1),
        weak_model=lambda x, t: weak(x, t, None),
    )  # fmt: skip
    return x, a_T


@pytest.mark.parametrize("w", [1.0, 2.0, 3.0])
def test_equal_variances_sample_the_gaussian_whose_mean_is_pushed_away_from_the_weak_one(w):
    s, mu1, mu0 = 0.5, 0.3, -0.2
    x, a_T = draw(GaussianModel(SCHEDULE, "sample", mu1, s), GaussianModel(SCHEDULE, "sample", mu0, s), w)
    r = s / math.sqrt(s**2 + (1 - a_T) / a_T)
    mu_w = mu0 + w * (mu1 - mu0)
    assert x.mean().item() == pytest.approx(mu_w * (1 - r), abs=0.01)
    assert x.std().item() == pytest.approx(r / math.sqrt(a_T), rel=0.02)


@pytest.mark.parametrize("w", [1.0, 1.5, 2.5])
def test_a_wider_weak_model_narrows_the_samples_as_the_closed_form_says(w):
    s1, s0 = 0.5, 0.8
    x, a_T = draw(GaussianModel(SCHEDULE, "sample", 0.0, s1), GaussianModel(SCHEDULE, "sample", 0.0, s0), w)
    var_T = (1 - a_T) / a_T
    std = (s1**2 / (s1**2 + var_T)) ** (w / 2) * (s0**2 / (s0**2 + var_T)) ** ((1 - w) / 2) / math.sqrt(a_T)
    assert x.std().item() == pytest.approx(std, rel=0.02)


def test_the_guided_output_is_the_weak_one_plus_s_times_the_difference_outside_the_interval_the_model():
    strong = lambda x, t, c: x + 1.0  # noqa: E731
    weak = lambda x, t: 3 * x  # noqa: E731
    predict = autoguided_model(strong, None, weak, 2.5)
    x, t = torch.tensor([[2.0]]), torch.tensor([5])
    assert predict(x, t, True).item() == 6.0 + 2.5 * (3.0 - 6.0)
    assert predict(x, t, False).item() == 3.0  # unguided steps: the model alone
    assert autoguided_model(strong, None, weak, 1.0)(x, t, True).item() == 3.0


def test_autoguidance_takes_one_scale_not_one_per_condition():
    with pytest.raises(ConfigError, match="one scale"):
        autoguided_model(lambda *a: a[0], None, lambda x, t: x, {"sketch": 2.0})
