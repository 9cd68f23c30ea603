"""EDM's σ-space samplers: each step against diffusers (HeunDiscreteScheduler, EDMEulerScheduler with churn,
EDMDPMSolverMultistepScheduler) on the same Karras σ, and the exact ODE map / target distribution of a
Gaussian toy; the sampling loop's σ (model time, initial noise, churned σ̂, guidance interval)."""

import math

import diffusers  # a [dev] dependency: the reference implementation, tests only
import pytest
import torch

from diffusion_lab.diffusion.edm import EDMSchedule, karras_sigmas
from diffusion_lab.diffusion.edm_samplers import HeunSampler, KarrasDPMSolverPP2MSampler, dpmpp_2m
from diffusion_lab.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.errors import ConfigError
from tests.diffusion.gaussian import MU, SIGMA, assert_gaussian, gen, make_condition

SCHEDULE = EDMSchedule()


class GaussianDenoiser:
    """The exact D(x; σ) = E[x₀ | x] of x₀ ~ N(μ, s²) per dimension, x = x₀ + σ n: (s² x + σ² μ)/(s² + σ²),
    with μ from `condition.pooled` when given. Records the σ it is called at (one per call)."""

    def __init__(self, mu=MU, s=SIGMA):
        self.mu, self.s, self.sigmas, self.batches = mu, s, [], []

    def __call__(self, x, sigma, condition=None):
        assert sigma.dtype == torch.float32 and sigma.shape == (x.shape[0],) and (sigma == sigma[0]).all()
        self.sigmas.append(sigma[0].item())
        self.batches.append(x.shape[0])
        mu = self.mu if condition is None else condition.pooled
        s2, v = self.s**2, sigma[:, None].double() ** 2
        return ((s2 * x + v * mu) / (s2 + v)).to(x.dtype)


def exact_map(x_T, mu=MU, s=SIGMA, sigma_max=SCHEDULE.sigma_max):
    """The probability-flow ODE of the Gaussian toy, solved: x(σ) − μ ∝ √(s² + σ²), so x₀ is affine in x_T."""
    return mu + (x_T - mu) * s / math.sqrt(s**2 + sigma_max**2)


def nonlinear(x, sigma: float):
    """A σ-dependent, nonlinear denoiser: the second-order terms matter on it."""
    return torch.tanh(x) / (1 + sigma) + 0.1 * x * sigma / (1 + sigma)


# --------------------------------------------------------------------------------------------------------
# The σ grid and the protocol
# --------------------------------------------------------------------------------------------------------


def test_heun_calls_the_model_at_sigma_0_then_every_interior_sigma_twice():
    sampler = HeunSampler(SCHEDULE, num_steps=4)
    s = karras_sigmas(4, 0.002, 80.0, 7.0).tolist()
    assert sampler.timesteps.tolist() == [s[0], s[1], s[1], s[2], s[2], s[3], s[3]]  # 2N − 1 calls
    assert KarrasDPMSolverPP2MSampler(SCHEDULE, num_steps=4).timesteps.tolist() == s[:4]
    assert sampler.init_noise_sigma == 80.0 and sampler.time_dtype == torch.float32


def test_the_wrong_schedule_or_prediction_names_the_samplers_that_fit():
    with pytest.raises(ConfigError, match="sampler=heun needs schedule=edm"):
        HeunSampler(NoiseSchedule(num_timesteps=10))
    for discrete in (DDIMSampler, DDPMSampler, DPMSolverPP2MSampler):
        with pytest.raises(ConfigError, match="sampler=heun or sampler=dpmpp"):
            discrete(SCHEDULE, "edm")
    with pytest.raises(ConfigError, match="prediction=edm"):
        HeunSampler(SCHEDULE, "v_prediction")
    with pytest.raises(ConfigError, match="steps=0"):
        HeunSampler(SCHEDULE, num_steps=0)
    assert type(dpmpp_2m(SCHEDULE, "edm")) is KarrasDPMSolverPP2MSampler
    assert type(dpmpp_2m(NoiseSchedule(num_timesteps=10), "v_prediction", 5)) is DPMSolverPP2MSampler


# --------------------------------------------------------------------------------------------------------
# Each step against diffusers
# --------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 `copy=` warning inside diffusers
def test_heun_equals_diffusers_heun_step_by_step():
    """HeunDiscreteScheduler on our Karras σ (interior σ repeated as it does), fed D as a `sample` output."""
    n = 6
    ours = HeunSampler(SCHEDULE, num_steps=n, clip_sample=False)
    ref = diffusers.HeunDiscreteScheduler(prediction_type="sample")
    ref.set_timesteps(n)
    s = karras_sigmas(n, 0.002, 80.0, 7.0)
    ref.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
    ref.set_begin_index(0)
    x = 80.0 * torch.randn(2, 3, 4, 4, generator=gen(1), dtype=torch.float64)
    for t in ours.timesteps.tolist():
        x_in, sigma = ours.model_input(x, t)
        assert sigma == t and x_in is x  # no churn: the model sees (x, σ) itself
        mine = ours.step(nonlinear(x, sigma), t, x)
        theirs = ref.step(nonlinear(x, sigma), ref.timesteps[0], x)
        torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, rtol=1e-12, atol=1e-12)
        x = mine.prev_sample
    assert not ours._euler and torch.isfinite(x).all()


def test_heun_churn_is_edm_eulers_churned_step_with_the_same_noise():
    """Algorithm 2's Euler stage: σ̂ = σ(1 + γ), x̂ = x + √(σ̂² − σ²) s_noise n, then Euler from σ̂ with D at
    (x̂, σ̂): EDMEulerScheduler's step given that D and a generator in the same state."""
    n, churn = 5, dict(s_churn=3.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    ours = HeunSampler(SCHEDULE, num_steps=n, clip_sample=False, **churn)
    x = 80.0 * torch.randn(2, 1, 4, 4, generator=gen(2))
    stages = 0
    for i, t in enumerate(ours.timesteps.tolist()):
        euler = ours._euler is None
        x_hat, sigma = ours.model_input(x, t, generator=gen(10 + i))
        out = nonlinear(x_hat, sigma)
        step = ours.step(out, t, x_hat)
        if euler:
            k = ours.sigmas.index(t)
            ref = diffusers.EDMEulerScheduler()
            ref.set_timesteps(n)
            ref.sigmas = torch.tensor(ours.sigmas, dtype=torch.float32)
            ref.set_begin_index(k)
            theirs = ref.step(
                out, ref.timesteps[k], x, generator=gen(10 + i), pred_original_sample=out, **churn
            )
            torch.testing.assert_close(step.prev_sample, theirs.prev_sample, rtol=1e-5, atol=1e-5)
            expected_hat = t * (1 + min(3.0 / n, 2**0.5 - 1)) if 0.05 <= t <= 50 else t
            assert sigma == pytest.approx(expected_hat, rel=1e-12)
            stages += sigma > t
        x = step.prev_sample
    assert 0 < stages < n  # some steps churned (σ in [s_tmin, s_tmax]), not all


@pytest.mark.filterwarnings("ignore::UserWarning")  # diffusers asks for scale_model_input first
def test_dpmpp_equals_diffusers_edm_dpm_solver_step_by_step():
    """EDMDPMSolverMultistepScheduler (2M, midpoint, final σ 0) given the raw output F that makes its D ours."""
    n = 8
    ours = KarrasDPMSolverPP2MSampler(SCHEDULE, num_steps=n, clip_sample=False)
    ref = diffusers.EDMDPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++")
    ref.set_timesteps(n)
    ref.sigmas = torch.tensor(ours.sigmas, dtype=torch.float64)
    ref.set_begin_index(0)
    x = 80.0 * torch.randn(2, 3, 4, 4, generator=gen(3), dtype=torch.float64)
    for i, t in enumerate(ours.timesteps.tolist()):
        d = nonlinear(x, t)
        c_skip, c_out, _, _ = SCHEDULE.preconditioning(torch.tensor(t, dtype=torch.float64))
        mine = ours.step(d, t, x)
        theirs = ref.step((d - c_skip * x) / c_out, ref.timesteps[i], x)
        torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, rtol=1e-9, atol=1e-9)
        x = mine.prev_sample
    first_order = x.clone()  # the 2nd-order terms matter: DDIM-like first-order steps end elsewhere
    x = 80.0 * torch.randn(2, 3, 4, 4, generator=gen(3), dtype=torch.float64)
    for t, t_next in zip(ours.sigmas[:-1], ours.sigmas[1:], strict=True):
        x = (t_next / t) * x + (1 - t_next / t) * nonlinear(x, t)
    assert (x - first_order).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------------
# Known answers on the Gaussian toy, through the sampling loop
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [HeunSampler, KarrasDPMSolverPP2MSampler])
def test_the_ode_samplers_converge_to_the_exact_map_at_second_order(factory):
    """Every sample against the solved ODE: the error falls about 16× per 4× steps (2nd order; Euler: 4×)."""
    exact = exact_map(80.0 * torch.randn(64, 4, generator=gen()).double())  # sample()'s x_T
    errors = []
    for n in (8, 32, 128):
        sampler = factory(SCHEDULE, num_steps=n, clip_sample=False)
        x = sample(GaussianDenoiser(), sampler, (64, 4), generator=gen())
        errors.append((x.double() - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors
    assert errors[1] / errors[2] > 10, errors


def test_heun_with_churn_reaches_the_target_distribution_as_steps_grow():
    """Algorithm 2 at EDM's ImageNet churn on the exact denoiser: N(μ, s²) in distribution (4,000 values) at
    64 steps, while 16 steps still inflate the spread; the model is called at σ̂_i, then at σ_{i+1}."""
    churn = dict(clip_sample=False, s_churn=40.0, s_tmin=0.05, s_tmax=50.0)
    few = sample(
        GaussianDenoiser(), HeunSampler(SCHEDULE, num_steps=16, **churn), (2000, 2), generator=gen(4)
    )
    assert few.std().item() > SIGMA + 0.03
    sampler, model = HeunSampler(SCHEDULE, num_steps=64, **churn), GaussianDenoiser()
    assert_gaussian(sample(model, sampler, (2000, 2), generator=gen(4)))
    churned = [sampler._sigma_hat(t) for t in sampler.sigmas[:-1]]
    assert model.sigmas[::2] == pytest.approx(churned, rel=1e-6)  # each Euler stage at σ̂_i
    assert model.sigmas[1::2] == pytest.approx(sampler.sigmas[1:-1], rel=1e-6)  # corrections at σ_{i+1}
    assert churned[0] == 80.0 and churned[10] > sampler.sigmas[10]  # no churn above s_tmax = 50


def test_the_loop_starts_at_sigma_max_and_guides_by_sigma():
    """x_T = σ_max n; the guidance interval (σ_lo, σ_hi] reads the σ the model is called at; CFG of exact
    Gaussian denoisers is the denoiser of the extrapolated mean."""
    sampler = HeunSampler(SCHEDULE, num_steps=32, clip_sample=False)
    model, interval = GaussianDenoiser(), (0.5, 5.0)
    cond, null = make_condition(0.6, 8), make_condition(-0.2, 1)
    _, inter = sample(
        model,
        sampler,
        (8, 2),
        cond,
        null,
        2.0,
        guidance_interval=interval,
        generator=gen(),
        return_intermediates=True,
    )
    assert torch.equal(inter["x_t"][0], 80.0 * torch.randn(8, 2, generator=gen()))
    inside = [0.5 < t <= 5.0 for t in sampler.timesteps.tolist()]
    assert 0 < sum(inside) < len(inside) and model.batches == [16 if g else 8 for g in inside]
    guided = sample(
        GaussianDenoiser(), sampler, (2000, 2), make_condition(0.6, 2000), null, 2.0, generator=gen()
    )
    assert_gaussian(guided, mu=-0.2 + 2.0 * (0.6 + 0.2))
