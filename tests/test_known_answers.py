"""Known-answer tests: each checks a value derived by hand (closed form), not a second run of the code.

1. EMA warm-up: the average moves towards the current weights by 1 − d_n, d_n = min(decay, (1+n)/(10+n)).
2. DiffusionModule.diffusion_loss of a net that outputs 0: the configured prediction type's weighted target energy.
3. DiffusionModule.generate on an exact Gaussian denoiser: CFG at scale w gives mean μ_null + w (μ_c − μ_null).
4. MNISTEvaluator: the FID floor is the FID of held-out real images; uniform noise scores far above it.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from diffusion_lab.callbacks.ema import WarmupEMA
from diffusion_lab.data.mnist import load_split
from diffusion_lab.diffusion.samplers import DDIMSampler
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.metrics.classifier import load_classifier
from diffusion_lab.metrics.fid import MNISTEvaluator
from diffusion_lab.module import DiffusionModule
from diffusion_lab.nets.encoders import ClassEncoder

GAMMA = 5.0


def make_module(net, schedule, prediction_type="epsilon", loss_weighting="uniform", sampler=None):
    return DiffusionModule(
        net=net,
        schedule=schedule,
        encoder=ClassEncoder(num_classes=10, dim=4, drop_prob=0.0),
        sampler=sampler or partial(DDIMSampler, num_steps=5),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        prediction_type=prediction_type,
        loss_weighting=loss_weighting,
        min_snr_gamma=GAMMA,
    )


# ------------------------------------------------------------------------------------------------- 1. EMA


def test_ema_warmup_moves_towards_current_by_one_minus_decay():
    """From averaged = 0 towards current = 1: one update with n gives 1 − d_n, and updates n = 1..k give
    1 − ∏ d_n (since 1 − a_n = d_n (1 − a_{n−1})). decay = 0.7 is reached at n = 20, so k = 30 covers both
    the warm-up (1+n)/(10+n) and the cap."""
    decay = 0.7
    avg_fn = WarmupEMA._warmup_avg_fn(decay)
    d = [min(decay, (1 + n) / (10 + n)) for n in range(101)]
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for n in (0, 1, 5, 20, 50, 100):  # d_0 = 0.1: the first update takes 90% of the current weights
        assert avg_fn(zeros, ones, torch.tensor(n)).tolist() == pytest.approx([1 - d[n]] * 3, abs=1e-12)

    averaged = zeros
    for n in range(1, 31):
        averaged = avg_fn(averaged, ones, torch.tensor(n))
    assert averaged.tolist() == pytest.approx([1 - math.prod(d[1:31])] * 3, abs=1e-12)


# ------------------------------------------------------------------------------------------------- 2. loss


class ZeroNet(nn.Module):
    in_channels, image_size = 1, 8

    def forward(self, x_t, t, condition):
        return torch.zeros_like(x_t)


def min_snr_weight(snr, prediction_type):
    """Hang et al. 2023: an x₀-loss weighted min(SNR, γ), expressed on each prediction type's target."""
    clipped = snr.clamp(max=GAMMA)
    return {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[prediction_type]


@pytest.mark.parametrize("weighting", ["min_snr", "uniform"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_of_a_zero_net_is_the_weighted_target_energy(prediction_type, weighting):
    """A net that outputs 0 has loss mean_b w(t_b) · mean(target_b²), with t then ε replayed from the same
    generator (diffusion_loss's draw order), ᾱ in float64, target ε / x₀ / v = √ᾱ ε − √(1−ᾱ) x₀, and w the
    configured prediction type's min-SNR weight (1 for uniform)."""
    torch.manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    batch = {"image": x0, "label": torch.randint(0, 10, (16,))}
    schedule = NoiseSchedule("linear", 1000)
    module = make_module(ZeroNet(), schedule, prediction_type, weighting)
    for seed in (0, 1, 2):
        loss = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(seed)).item()

        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (16,), generator=g)
        eps = torch.randn(x0.shape, generator=g).double()
        ab = schedule.alphas_cumprod_f64[t].view(-1, 1, 1, 1)
        target = {
            "epsilon": eps,
            "sample": x0.double(),
            "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0,
        }
        energy = target[prediction_type].pow(2).mean(dim=(1, 2, 3))
        snr = (ab / (1 - ab)).flatten()
        weight = min_snr_weight(snr, prediction_type) if weighting == "min_snr" else torch.ones_like(snr)
        want = (weight * energy).mean().item()
        assert loss == pytest.approx(want, rel=1e-4)
        if weighting == "min_snr" and prediction_type != "epsilon":  # ε's weights would be clearly off
            assert (min_snr_weight(snr, "epsilon") * energy).mean().item() != pytest.approx(want, rel=0.01)


# ------------------------------------------------------------------------------------------------- 3. CFG

MU = torch.tensor([0.1, -0.1, 0.2, 0.3, -0.3, 0.25, -0.25, -0.2, 0.15, -0.15])  # μ_c; μ_null = 0
S = 0.5


class GaussianDenoiser(nn.Module):
    """Exact ε-prediction for data x₀ ~ N(μ, S²) per pixel, μ = condition.pooled[:, 0]. With a = ᾱ_t:
    E[x₀|x_t] = μ + √a S² (x_t − √a μ)/(a S² + 1 − a),  ε̂ = (x_t − √a E[x₀|x_t])/√(1 − a)."""

    in_channels, image_size = 1, 8

    def __init__(self, schedule):
        super().__init__()
        self.alphas_cumprod = schedule.alphas_cumprod_f64

    def forward(self, x_t, t, condition):
        a = self.alphas_cumprod[t].to(x_t).view(-1, 1, 1, 1)
        mu = condition.pooled[:, 0].view(-1, 1, 1, 1)
        x0 = mu + a.sqrt() * S**2 * (x_t - a.sqrt() * mu) / (a * S**2 + 1 - a)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def test_generate_guides_towards_the_requested_label():
    """ε̂ is affine in μ with coefficients shared by all labels, so CFG at scale w is exactly the denoiser of
    mean m = μ_null + w (μ_c − μ_null) = w μ_c, same S. Deterministic DDIM (eta 0, no clipping) on it is an
    affine map: with y_t = x_t − √a_t m, each step t → s gives y_s = c_t y_t,
    c_t = √a_s k_t + √(1−a_s)(1 − √a_t k_t)/√(1−a_t),  k_t = √a_t S²/(a_t S² + 1 − a_t)  (a = ᾱ, a_s = 1 last),
    so from x_T ~ N(0, 1) the samples have std C = ∏ c_t (≈ S) and mean m (1 − C √a_T).
    512 × 64 iid pixels per label: Monte-Carlo error of the mean ≈ S/√32768 ≈ 0.003, of the std ≈ 0.002."""
    schedule = NoiseSchedule("linear", 1000)
    sampler = partial(DDIMSampler, num_steps=50, eta=0.0, clip_sample=False)
    module = make_module(GaussianDenoiser(schedule), schedule, sampler=sampler)
    with torch.no_grad():
        module.encoder.embedding.weight.zero_()
        module.encoder.embedding.weight[:10, 0] = MU  # row 10, the null token, keeps μ_null = 0

    ac, steps = schedule.alphas_cumprod_f64.tolist(), module.sampler.timesteps.tolist()
    std = 1.0
    for t, s in zip(steps, steps[1:] + [None], strict=True):
        a_t, a_s = ac[t], (1.0 if s is None else ac[s])
        k = a_t**0.5 * S**2 / (a_t * S**2 + 1 - a_t)
        std *= a_s**0.5 * k + (1 - a_s) ** 0.5 * (1 - a_t**0.5 * k) / (1 - a_t) ** 0.5
    assert abs(std - S) < 0.05  # 50 steps are close to the exact ODE, which gives S

    labels = torch.tensor([3] * 512 + [7] * 512)
    for w in (1.0, 3.0):
        x = module.generate(labels, guidance_scale=w, generator=torch.Generator().manual_seed(0))
        for c in (3, 7):
            pixels, mean = x[labels == c], w * MU[c].item() * (1 - std * ac[steps[0]] ** 0.5)
            assert pixels.mean().item() == pytest.approx(mean, abs=0.012), (w, c)
            assert pixels.std().item() == pytest.approx(std, abs=0.008), (w, c)


# ------------------------------------------------------------------------------------------------- 4. FID


def test_fid_floor_is_the_fid_of_the_held_out_real_images(cache_dir, data_dir):
    """With 500 held-out train digits as the evaluator's holdout, fid_real_floor(500) is by definition their
    FID against the reference (the test split), so evaluating exactly those images must give fid = floor; a
    finite sample of real digits sits clearly above 0. Uniform noise, evaluated first, must not move it."""
    train_images, train_labels = load_split(data_dir, train=True)
    test_images, test_labels = load_split(data_dir, train=False)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))[:500]
    held_out, held_out_labels = train_images[pick], train_labels[pick]
    evaluator = MNISTEvaluator(
        load_classifier(cache_dir), test_images, test_labels, holdout_images=held_out, kid_subsets=10
    )
    noise = torch.randint(
        0, 256, (500, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    fake = evaluator.evaluate(noise, held_out_labels)
    real = evaluator.evaluate(held_out, held_out_labels)
    assert real["fid_real_floor_n"] == 500 and real["fid_real_floor"] > 1.0
    assert real["fid"] == pytest.approx(real["fid_real_floor"], rel=1e-3)
    assert fake["fid_real_floor"] == real["fid_real_floor"]
    assert real["accuracy"] > 0.97


def test_noise_scores_far_above_the_floor(cache_dir, data_dir):
    """The shipped evaluator (test split reference, train-split holdout): real train digits score near the
    floor (draws of 500 spread by about ±50%) with accuracy > 0.97; uniform noise scores > 100× the floor with
    chance accuracy (≈ 0.1); the floor is the same for both and clearly above 0."""
    evaluator = MNISTEvaluator.from_cache(cache_dir, data_dir, kid_subsets=10)
    train_images, train_labels = load_split(data_dir, train=True)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(2))[:500]
    noise = torch.randint(
        0, 256, (500, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    fake = evaluator.evaluate(noise, train_labels[pick])
    real = evaluator.evaluate(train_images[pick], train_labels[pick])
    floor = real["fid_real_floor"]
    assert floor > 1.0 and fake["fid_real_floor"] == floor
    assert 0.4 * floor < real["fid"] < 2.5 * floor and real["accuracy"] > 0.97
    assert fake["fid"] > 100 * floor and fake["accuracy"] < 0.3
