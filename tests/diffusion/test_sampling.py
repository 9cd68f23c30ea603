"""The sampling loop: classifier-free guidance (skipped passes, one doubled batch, the guidance interval),
known answers under guidance, seeds and intermediates."""

import math

import pytest
import torch

from diffusion_lab.condition import Condition
from diffusion_lab.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler, noise_level
from diffusion_lab.diffusion.sampling import _in_interval, sample
from diffusion_lab.diffusion.schedules import NoiseSchedule
from tests.diffusion.gaussian import DIM, GaussianModel, N, assert_gaussian, gen, make_condition

# --------------------------------------------------------------------------------------------------------
# Classifier-free guidance and the loop
# --------------------------------------------------------------------------------------------------------

MU_C, MU_NULL = 0.6, -0.2


def test_cfg_scale_one_is_conditional_and_skips_null_pass():
    schedule = NoiseSchedule("cosine")
    sampler = DDIMSampler(schedule, num_steps=20, clip_sample=False)
    cond, null = make_condition(MU_C, 16), make_condition(MU_NULL, 1)
    plain = sample(GaussianModel(schedule), sampler, (16, DIM), condition=cond, generator=gen())
    model = GaussianModel(schedule)
    guided = sample(model, sampler, (16, DIM), cond, null, guidance_scale=1.0, generator=gen())
    assert torch.equal(guided, plain)
    assert model.batches == [16] * 20


def test_cfg_scale_zero_is_unconditional_and_skips_cond_pass():
    schedule = NoiseSchedule("cosine")
    sampler = DDIMSampler(schedule, num_steps=20, clip_sample=False)
    null = make_condition(MU_NULL, 16)
    plain = sample(GaussianModel(schedule), sampler, (16, DIM), condition=null, generator=gen())
    model = GaussianModel(schedule)
    guided = sample(
        model, sampler, (16, DIM), make_condition(MU_C, 16), null, guidance_scale=0.0, generator=gen()
    )
    assert torch.equal(guided, plain)
    assert model.batches == [16] * 20


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_cfg_batches_both_passes_and_extrapolates(prediction_type):
    """E[ε|x_t] is affine in μ, so u + s(c − u) is the exact predictor of N(μ₀ + s(μ_c − μ₀), σ²)."""
    schedule = NoiseSchedule("cosine")
    sampler = DPMSolverPP2MSampler(schedule, prediction_type, num_steps=20, clip_sample=False)
    model = GaussianModel(schedule, prediction_type)
    s = 2.5
    x = sample(
        model, sampler, (N, DIM), make_condition(MU_C, N), make_condition(MU_NULL, 1), s, generator=gen()
    )
    assert model.batches == [2 * N] * 20  # one forward per step on the doubled batch
    assert_gaussian(x, mu=MU_NULL + s * (MU_C - MU_NULL))


def test_noise_level_is_edm_sigma():
    assert noise_level(0.5) == 1.0 and noise_level(0.2) == pytest.approx(2.0) and noise_level(1.0) == 0.0
    assert noise_level(0.0) == math.inf  # zero terminal SNR


def test_guidance_interval_guides_only_the_steps_inside_it():
    """Inside (σ_lo, σ_hi] the step gets u + s(c − u) from one doubled-batch pass; outside, c alone."""
    schedule = NoiseSchedule("cosine")
    sampler = DPMSolverPP2MSampler(schedule, "v_prediction", num_steps=20, clip_sample=False)
    cond_c, null_c, s, interval = make_condition(MU_C, 8), make_condition(MU_NULL, 8), 2.5, (0.5, 5.0)
    model = GaussianModel(schedule, "v_prediction")
    out = sample(model, sampler, (8, DIM), cond_c, null_c, s, guidance_interval=interval, generator=gen())

    ac = schedule.alphas_cumprod_f64
    inside = [0.5 < math.sqrt((1 - ac[t]) / ac[t]) <= 5.0 for t in sampler.timesteps.tolist()]
    assert 0 < sum(inside) < len(inside)  # the test needs both kinds of step
    assert model.batches == [16 if guided else 8 for guided in inside]

    x, reference = torch.randn(8, DIM, generator=gen()), GaussianModel(schedule, "v_prediction")
    sampler.reset()
    for t, guided in zip(sampler.timesteps.tolist(), inside, strict=True):
        tb = torch.full((8,), t)
        c, u = reference(x, tb, cond_c), reference(x, tb, null_c)
        x = sampler.step(u + s * (c - u) if guided else c, t, x).prev_sample
    torch.testing.assert_close(out, x)


def test_guidance_interval_over_every_sigma_is_plain_guidance():
    schedule = NoiseSchedule("cosine")
    sampler = DDIMSampler(schedule, num_steps=10, clip_sample=False)
    args = (
        GaussianModel(schedule),
        sampler,
        (8, DIM),
        make_condition(MU_C, 8),
        make_condition(MU_NULL, 1),
        2.0,
    )
    everywhere = sample(*args, guidance_interval=(0.0, math.inf), generator=gen())
    assert torch.equal(everywhere, sample(*args, generator=gen()))


def test_guidance_without_null_condition_is_an_error():
    schedule = NoiseSchedule(num_timesteps=10)
    with pytest.raises(ValueError, match="null_condition"):
        sample(
            GaussianModel(schedule),
            DDIMSampler(schedule, num_steps=5),
            (2, 2),
            make_condition(0.0, 2),
            None,
            2.0,
        )


@pytest.mark.parametrize("factory", [DDPMSampler, DDIMSampler])
def test_seed_reproducibility(factory):
    schedule = NoiseSchedule("linear", num_timesteps=100)
    kw = {"eta": 1.0} if factory is DDIMSampler else {}
    sampler = factory(schedule, num_steps=20, **kw)
    model = GaussianModel(schedule)
    a, b, c = (sample(model, sampler, (8, 2), generator=gen(seed)) for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # noise is drawn on CPU from the generator, so it does not depend on the global RNG either
    torch.manual_seed(123)
    assert torch.equal(sample(model, sampler, (8, 2), generator=gen(0)), a)


def test_intermediates_and_progress():
    schedule = NoiseSchedule("linear", num_timesteps=100)
    sampler = DDPMSampler(schedule, num_steps=10, clip_sample=True)
    x, inter = sample(
        GaussianModel(schedule), sampler, (4, 2), generator=gen(), return_intermediates=True, progress=True
    )
    assert len(inter["x_t"]) == len(inter["x0"]) == 10
    assert torch.equal(inter["x_t"][0], torch.randn(4, 2, generator=gen()))  # starts from the seeded noise
    assert torch.equal(inter["x0"][-1], x)  # last step lands on x̂₀ (ᾱ_prev = 1, no noise)
    assert all(t.device.type == "cpu" for t in inter["x_t"] + inter["x0"])
    assert max(t.abs().max() for t in inter["x0"]) <= 1  # clip_sample


def test_guided_ddim_is_the_exact_linear_map_towards_the_guided_mean():
    """ε̂ is affine in μ with coefficients shared by every μ, so CFG at scale w with μ_null = 0 is exactly
    the denoiser of mean m = w μ_c (same σ). Deterministic DDIM on it maps y = x − √ᾱ m linearly: a step
    t → s multiplies y by c_t = √a_s k_t + √(1−a_s)(1 − √a_t k_t)/√(1−a_t), k_t = √a_t σ²/(a_t σ² + 1 − a_t)
    (a = ᾱ, a_s = 1 after the last step), so x₀ = m + C (x_T − √a_T m) with C = ∏ c_t, every sample."""
    schedule, sigma = NoiseSchedule("linear", 1000), 0.5
    sampler = DDIMSampler(schedule, num_steps=50, clip_sample=False)
    ac, steps = schedule.alphas_cumprod_f64.tolist(), sampler.timesteps.tolist()
    gain = 1.0
    for t, s in zip(steps, [*steps[1:], None], strict=True):
        a_t, a_s = ac[t], (1.0 if s is None else ac[s])
        k = a_t**0.5 * sigma**2 / (a_t * sigma**2 + 1 - a_t)
        gain *= a_s**0.5 * k + (1 - a_s) ** 0.5 * (1 - a_t**0.5 * k) / (1 - a_t) ** 0.5
    assert abs(gain - sigma) < 0.05  # 50 steps are close to the exact ODE, which gives σ

    mu_c = torch.tensor([0.1, -0.3, 0.25, 0.15]).repeat_interleave(4)[:, None]  # (16, 1): 4 conditions
    cond = Condition(tokens=torch.zeros(16, 1, 1), mask=torch.ones(16, 1, dtype=torch.bool), pooled=mu_c)
    x_T = torch.randn(16, 64, generator=gen())
    for w in (1.0, 3.0):  # the conditional pass alone, and both passes
        model = GaussianModel(schedule, sigma=sigma)
        x = sample(model, sampler, (16, 64), cond, make_condition(0.0, 1), w, generator=gen())
        m = w * mu_c
        torch.testing.assert_close(x, m + gain * (x_T - ac[steps[0]] ** 0.5 * m), atol=1e-5, rtol=1e-5)


def test_guidance_interval_is_open_below_and_closed_above():
    """(σ_lo, σ_hi]: a step exactly at σ_hi is guided, one exactly at σ_lo is not, and σ = inf (a zero
    terminal SNR's first step) is guided by an interval open to infinity."""
    assert _in_interval(5.0, (0.5, 5.0)) and not _in_interval(0.5, (0.5, 5.0))
    assert _in_interval(math.inf, (0.5, math.inf)) and not _in_interval(math.inf, (0.5, 5.0))
    assert _in_interval(0.0, None)
