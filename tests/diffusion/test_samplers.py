"""Samplers: timesteps and single steps against diffusers (reference only), known answers on Gaussian data."""

import copy
import math

import diffusers  # a [dev] dependency: the reference implementation, tests only
import pytest
import torch

from diffusion_lab.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab.diffusion.schedules import NoiseSchedule
from tests.diffusion.gaussian import DIM, MU, SIGMA, GaussianModel, N, assert_gaussian, gen

PTYPES = ["epsilon", "sample", "v_prediction"]


# --------------------------------------------------------------------------------------------------------
# Timesteps
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_spacing_matches_diffusers(spacing):
    sampler = DDIMSampler(NoiseSchedule(), spacing=spacing)
    for n in [1, 3, 7, 48, 50, 61, 333, 1000]:
        sampler.set_timesteps(n)
        for ref in (
            diffusers.DDIMScheduler(timestep_spacing=spacing),
            diffusers.DDPMScheduler(timestep_spacing=spacing),
        ):
            ref.set_timesteps(n)
            # [:n]: diffusers' trailing sometimes appends a spurious −1 (n = 61); ours always has n steps
            assert sampler.timesteps.tolist() == ref.timesteps.tolist()[:n], (spacing, n)
    for n in range(1, 1001):  # n distinct, descending, in range
        sampler.set_timesteps(n)
        ts = sampler.timesteps.tolist()
        assert len(ts) == n and ts == sorted(set(ts), reverse=True) and 0 <= ts[-1] and ts[0] <= 999
        assert sampler.timesteps.dtype == torch.long


def test_bad_arguments():
    s = NoiseSchedule(num_timesteps=100)
    with pytest.raises(ValueError, match="trailing"):
        DDIMSampler(s, num_steps=10, spacing="karras")
    with pytest.raises(ValueError):
        DDIMSampler(s, num_steps=101)
    with pytest.raises(ValueError, match="posterior"):
        DDPMSampler(s, variance="learned")
    with pytest.raises(ValueError, match="v_prediction"):
        DDIMSampler(s, prediction_type="score")
    assert DDPMSampler(s).num_steps == 100  # DDPM defaults to every training step
    with pytest.warns(UserWarning, match="v_prediction"):  # ε-prediction can't start from ᾱ = 0
        DDIMSampler(NoiseSchedule(num_timesteps=100, zero_terminal_snr=True), spacing="trailing")


# --------------------------------------------------------------------------------------------------------
# One step against diffusers
# --------------------------------------------------------------------------------------------------------


def reference_in_float64(ref, ours):
    """A copy of a diffusers scheduler running on our float64 ᾱ, to compare the algorithm at ~1e-12
    without diffusers' float32 rounding."""
    f64 = copy.deepcopy(ref)
    f64.alphas_cumprod = torch.tensor(ours.alphas_cumprod, dtype=torch.float64)
    f64.alphas = f64.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), f64.alphas_cumprod[:-1]])
    f64.betas = 1 - f64.alphas
    f64.one = torch.tensor(1.0, dtype=torch.float64)
    f64.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return f64


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", PTYPES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(eta, prediction_type, clip):
    ours = DDIMSampler(NoiseSchedule("linear"), prediction_type, num_steps=10, clip_sample=clip, eta=eta)
    ref = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=clip, set_alpha_to_one=True)
    ref.set_timesteps(10)
    f64 = reference_in_float64(ref, ours)
    g = gen(3)
    for t in ours.timesteps.tolist():  # includes the last step onto ᾱ = 1
        x, out, z = (torch.randn(4, 3, 5, 5, generator=g) * 1.5 for _ in range(3))
        mine = ours.step(out, t, x, noise=z)
        theirs = ref.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z)
        torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(mine.pred_x0, theirs.pred_original_sample, atol=2e-5, rtol=1e-5)
        x, out, z = x.double(), out.double(), z.double()
        mine = ours.step(out, t, x, noise=z)
        theirs = f64.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z)
        torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, atol=1e-12, rtol=1e-12)
        if clip:
            assert mine.pred_x0.abs().max() <= 1


@pytest.mark.parametrize("num_steps", [1000, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_step_matches_diffusers(variance, prediction_type, num_steps):
    schedule = NoiseSchedule("cosine")
    ours = DDPMSampler(schedule, prediction_type, num_steps=num_steps, variance=variance, clip_sample=True)
    ref = diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        variance_type={"beta": "fixed_large", "posterior": "fixed_small"}[variance],
        clip_sample=True,
    )
    ref.set_timesteps(num_steps)
    f64 = reference_in_float64(ref, ours)
    g = gen(4)
    ts = ours.timesteps.tolist()
    for t in [ts[0], ts[1], ts[len(ts) // 2], ts[-2], ts[-1]]:
        x, out = torch.randn(4, 1, 6, 6, generator=g), torch.randn(4, 1, 6, 6, generator=g)
        # same seed → same variance noise in both (both draw randn on CPU)
        mine = ours.step(out, t, x, generator=gen(t))
        theirs = ref.step(out, t, x, generator=gen(t))
        # diffusers' float32 1 − ᾱ cancels near t = 0 (relative error ~1e-3 in β/(1 − ᾱ) at t = 1)
        torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, atol=1e-3 if t < 5 else 3e-5, rtol=0)
        torch.testing.assert_close(mine.pred_x0, theirs.pred_original_sample, atol=3e-5, rtol=1e-5)
        x, out = x.double(), out.double()
        mine = ours.step(out, t, x, generator=gen(t))
        theirs = f64.step(out, t, x, generator=gen(t))
        torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, atol=1e-12, rtol=1e-12)
        # the mean alone (noise = 0) is the posterior mean; it differs from the sample except at the last step
        mean = ours.step(out, t, x, noise=torch.zeros_like(x)).prev_sample
        assert torch.equal(mean, mine.prev_sample) == (t == ts[-1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 `copy=` warning inside diffusers
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_matches_diffusers(prediction_type, spacing):
    schedule = NoiseSchedule("linear")
    ours = DPMSolverPP2MSampler(schedule, prediction_type, num_steps=12, spacing=spacing, clip_sample=False)
    ref = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, prediction_type=prediction_type
    )
    # diffusers' own DPM spacings differ from its DDIM ones; give it our timesteps (final σ = 0 = ᾱ of 1)
    ref.set_timesteps(timesteps=ours.timesteps.tolist())

    def model(x, t):  # nonlinear and t-dependent, so the 2nd-order correction matters
        return torch.tanh(x) * (1 + t / 1000) + 0.1 * x

    x = torch.randn(3, 2, 4, 4, generator=gen(5))
    y = x.clone()
    for t in ours.timesteps.tolist():
        x = ours.step(model(x, t), t, x).prev_sample
        y = ref.step(model(y, t), t, y).prev_sample
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    # the 2nd-order steps matter: a first-order (DDIM) run ends elsewhere
    ddim = DDIMSampler(schedule, prediction_type, num_steps=12, spacing=spacing, clip_sample=False)
    z = torch.randn(3, 2, 4, 4, generator=gen(5))
    for t in ddim.timesteps.tolist():
        z = ddim.step(model(z, t), t, z).prev_sample
    assert (z - y).abs().max() > 1e-2


def test_dpm_solver_state_is_reset():
    schedule = NoiseSchedule("linear")
    sampler = DPMSolverPP2MSampler(schedule, num_steps=10, clip_sample=False)
    model = GaussianModel(schedule)
    first = sample(model, sampler, (8, 2), generator=gen())
    second = sample(model, sampler, (8, 2), generator=gen())  # stale x̂₀ from run 1 would change this
    assert torch.equal(first, second)


# --------------------------------------------------------------------------------------------------------
# Known answers: data ~ N(μ, σ²I) with the exact denoiser
# --------------------------------------------------------------------------------------------------------

KNOWN = {
    "ddpm_beta": lambda s, p: DDPMSampler(s, p, clip_sample=False, variance="beta"),
    "ddpm_posterior": lambda s, p: DDPMSampler(s, p, clip_sample=False, variance="posterior"),
    "ddim50": lambda s, p: DDIMSampler(s, p, num_steps=50, clip_sample=False),
    "dpm20": lambda s, p: DPMSolverPP2MSampler(s, p, num_steps=20, clip_sample=False),
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_answer(name):
    schedule = NoiseSchedule("linear" if name.startswith("ddpm") else "cosine")
    sampler = KNOWN[name](schedule, "epsilon")
    x = sample(GaussianModel(schedule), sampler, (N, DIM), generator=gen())
    assert x.shape == (N, DIM)
    assert_gaussian(x)


@pytest.mark.parametrize("name", ["ddim50", "dpm20"])
@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_other_prediction_types_give_the_same_samples(name, prediction_type):
    schedule = NoiseSchedule("cosine")
    ref = sample(GaussianModel(schedule), KNOWN[name](schedule, "epsilon"), (N, DIM), generator=gen())
    x = sample(
        GaussianModel(schedule, prediction_type),
        KNOWN[name](schedule, prediction_type),
        (N, DIM),
        generator=gen(),
    )
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)
    assert_gaussian(x)


def test_ddim_is_the_exact_linear_map_on_gaussian_data():
    """Deterministic DDIM with the exact denoiser maps y = x − √ᾱ μ linearly: one step multiplies it by
    (√(a_s a_t) σ² + √((1−a_s)(1−a_t)))/(a_t σ² + 1 − a_t). Checks every sample, no statistics."""
    schedule = NoiseSchedule("linear")
    sampler = DDIMSampler(schedule, num_steps=25, clip_sample=False)
    x = sample(GaussianModel(schedule), sampler, (64, 3), generator=gen(7))
    a = [float(schedule.alphas_cumprod_f64[t]) for t in sampler.timesteps.tolist()] + [1.0]
    gain = math.prod(
        (math.sqrt(s * t) * SIGMA**2 + math.sqrt((1 - s) * (1 - t))) / (t * SIGMA**2 + 1 - t)
        for t, s in zip(a[:-1], a[1:], strict=True)
    )
    x_T = torch.randn(64, 3, generator=gen(7))
    torch.testing.assert_close(x, MU + gain * (x_T - math.sqrt(a[0]) * MU), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", [DDIMSampler, DPMSolverPP2MSampler, DDPMSampler])
def test_zero_terminal_snr_with_v_prediction(factory):
    schedule = NoiseSchedule("cosine", zero_terminal_snr=True)
    sampler = factory(schedule, "v_prediction", num_steps=100, spacing="trailing", clip_sample=False)
    assert sampler.timesteps[0] == 999 and schedule.alphas_cumprod_f64[999] == 0  # starts from pure noise
    x = sample(GaussianModel(schedule, "v_prediction"), sampler, (N, DIM), generator=gen())
    assert_gaussian(x)
