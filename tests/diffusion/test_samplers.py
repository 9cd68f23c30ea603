"""Samplers: single steps against diffusers (reference only), known answers on Gaussian data, and CFG."""

import copy
import math

import diffusers  # a [dev] dependency: the reference implementation, tests only
import pytest
import torch

from diffusion_lab.condition import Condition
from diffusion_lab.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    noise_level,
    rescale_noise_cfg,
    sample,
)
from diffusion_lab.diffusion.schedules import NoiseSchedule

MU, SIGMA = 0.3, 0.5
N, DIM = 2000, 2
PTYPES = ["epsilon", "sample", "v_prediction"]


class GaussianModel:
    """Exact denoiser for data ~ N(μ, σ²I), μ per sample (and dim) from `condition.pooled` when given.

    With a = ᾱ_t and x_t = √a x₀ + √(1−a) ε:  v_t = aσ² + 1 − a,
    E[ε|x_t] = √(1−a)(x_t − √a μ)/v_t,  E[x₀|x_t] = μ + √a σ²(x_t − √a μ)/v_t,  v = √a ε − √(1−a) x₀.
    Written here independently of the package's conversions. Counts calls and batch sizes.
    """

    def __init__(self, schedule, prediction_type="epsilon", mu=MU, sigma=SIGMA):
        self.ac = schedule.alphas_cumprod_f64
        self.prediction_type, self.mu, self.sigma = prediction_type, mu, sigma
        self.batches = []

    def __call__(self, x, t, condition):
        assert t.dtype == torch.long and t.shape == (x.shape[0],) and (t == t[0]).all()
        self.batches.append(x.shape[0])
        a = float(self.ac[t[0]])
        mu = self.mu if condition is None else condition.pooled  # (B, 1) or (B, D)
        var = a * self.sigma**2 + 1 - a
        eps = math.sqrt(1 - a) * (x - math.sqrt(a) * mu) / var
        x0 = mu + math.sqrt(a) * self.sigma**2 * (x - math.sqrt(a) * mu) / var
        return {"epsilon": eps, "sample": x0, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0}[
            self.prediction_type
        ]


def make_condition(mu, batch):
    pooled = torch.as_tensor(mu, dtype=torch.float32).reshape(1, -1).expand(batch, -1)  # (B, 1) or (B, D)
    return Condition(
        tokens=torch.zeros(batch, 1, 1), mask=torch.ones(batch, 1, dtype=torch.bool), pooled=pooled.clone()
    )


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


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


def assert_gaussian(x, mu=MU, sigma=SIGMA, tol=0.02):
    assert torch.isfinite(x).all()
    # standard errors with 4000 values: mean 0.008, std 0.006; deterministic samplers lose ≤ 3% of σ here
    assert abs(x.mean().item() - mu) < tol, x.mean().item()
    assert abs(x.std().item() - sigma) < tol, x.std().item()


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


def test_guidance_rescale():
    g = gen(9)
    cond, guided = torch.randn(3, 2, 4, 4, generator=g), 3 * torch.randn(3, 2, 4, 4, generator=g)
    assert torch.equal(rescale_noise_cfg(guided, cond, 0.0), guided)
    full = rescale_noise_cfg(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_noise_cfg(guided, cond, 0.7), 0.7 * full + 0.3 * guided)

    # the loop applies it to the guided output: compare with a hand-written loop
    schedule = NoiseSchedule("cosine")
    sampler = DDIMSampler(schedule, num_steps=10, clip_sample=False)
    # per-dimension conditional means, so guidance changes the per-sample std that the rescale corrects
    model, cond_c = GaussianModel(schedule), make_condition(torch.linspace(-1, 1, 8), 4)
    null_c = make_condition([MU_NULL] * 8, 4)
    out = sample(model, sampler, (4, 8), cond_c, null_c, 3.0, guidance_rescale=0.7, generator=gen())
    x = torch.randn(4, 8, generator=gen())
    for t in sampler.timesteps.tolist():
        tb = torch.full((4,), t)
        c, u = model(x, tb, cond_c), model(x, tb, null_c)
        x = sampler.step(rescale_noise_cfg(u + 3.0 * (c - u), c, 0.7), t, x).prev_sample
    torch.testing.assert_close(out, x)
    plain = sample(model, sampler, (4, 8), cond_c, null_c, 3.0, generator=gen())
    assert not torch.allclose(out, plain)


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
