"""NoiseSchedule and beta curves against diffusers (reference only) and closed forms."""

import math

import diffusers  # a [dev] dependency: the reference implementation, tests only
import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.schedules import (
    BETA_SCHEDULES,
    RETIRED_BUFFERS,
    NoiseSchedule,
    linear_betas,
    rescale_zero_terminal_snr,
    sigmoid_betas,
    split_prediction,
)

DIFFUSERS_KINDS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("kind", list(DIFFUSERS_KINDS))
def test_alphas_cumprod_match_diffusers(kind):
    ours = NoiseSchedule(kind, num_timesteps=1000)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **DIFFUSERS_KINDS[kind])
    torch.testing.assert_close(ours.alphas_cumprod_f64, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)
    assert ours.alphas_cumprod_f64.dtype == torch.float64


def test_beta_functions_are_float64_of_length_T():
    for name, fn in BETA_SCHEDULES.items():
        betas = fn(37)
        assert betas.dtype == torch.float64 and betas.shape == (37,), name
        assert (betas > 0).all() and (betas < 1).all(), name


def test_linear_betas_scale_with_T():
    # improved-DDPM: endpoints scaled by 1000/T, so T=250 has betas 4x larger.
    torch.testing.assert_close(linear_betas(250), torch.linspace(4e-4, 0.08, 250, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "cosine", "scaled_linear"])
def test_zero_terminal_snr_matches_diffusers(kind):
    ours = NoiseSchedule(kind, zero_terminal_snr=True)
    assert ours.alphas_cumprod_f64[-1].item() == 0.0 and ours.alphas_cumprod[-1].item() == 0.0
    assert ours.snr[-1].item() == 0.0 and ours.log_snr[-1].item() == -math.inf
    # √ᾱ_0 is kept.
    torch.testing.assert_close(ours.alphas_cumprod_f64[0], NoiseSchedule(kind).alphas_cumprod_f64[0])
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as ref_rescale

    betas = BETA_SCHEDULES[kind](1000)
    torch.testing.assert_close(
        rescale_zero_terminal_snr(betas), ref_rescale(betas.clone()), atol=1e-12, rtol=0
    )
    ref = diffusers.DDPMScheduler(rescale_betas_zero_snr=True, **DIFFUSERS_KINDS[kind])
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)
    # No NaN anywhere (log_snr is −inf at T by design; everything else finite).
    for name, buf in ours.named_buffers():
        assert not torch.isnan(buf).any(), name
        if name != "log_snr":
            assert torch.isfinite(buf).all(), name


def test_sigmoid_closed_form():
    T, start, end, tau = 200, -3.0, 3.0, 0.7

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def f(u):  # ᾱ(u) before normalisation
        return (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))

    alpha_bar = [f((t + 1) / T) / f(0) for t in range(T)]
    ours = NoiseSchedule("sigmoid", num_timesteps=T, start=start, end=end, tau=tau).alphas_cumprod_f64
    # the last β is clipped at 0.999 (ᾱ(1) = 0), so compare ᾱ before the final step
    torch.testing.assert_close(
        ours[:-1], torch.tensor(alpha_bar[:-1], dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert sigmoid_betas(T, start, end, tau)[-1].item() == pytest.approx(0.999)


def test_unknown_kind_names_options():
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule("quadratic")


BUFFERS = ["alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "snr", "log_snr"]


def test_buffers_move_and_are_saved():
    s = NoiseSchedule("cosine", num_timesteps=100)
    state = s.state_dict()
    assert sorted(state) == sorted(BUFFERS)  # "alphas_cumprod_f64" and the retired buffers are not saved
    for n in BUFFERS:
        assert getattr(s, n).dtype == torch.float32 and getattr(s, n).shape == (100,)
    s.to(torch.float64)
    for n in BUFFERS:
        assert getattr(s, n).dtype == torch.float64
    assert s.num_timesteps == 100


def test_an_old_state_dict_with_the_retired_buffers_loads():
    """Checkpoints saved before the buffers were retired hold them too, under the module's prefix."""
    old, new = NoiseSchedule("linear", num_timesteps=50), NoiseSchedule("linear", num_timesteps=50)
    state = {f"schedule.{k}": v for k, v in old.state_dict().items()}
    state |= {f"schedule.{name}": torch.rand(50) for name in RETIRED_BUFFERS}
    state["schedule.snr"] = torch.full((50,), 7.0)  # shows that the kept buffers are read
    nn.ModuleDict({"schedule": new}).load_state_dict(state)  # strict: no unexpected keys
    assert torch.equal(new.snr, torch.full((50,), 7.0)) and not any(hasattr(new, n) for n in RETIRED_BUFFERS)
    with pytest.raises(RuntimeError, match="Unexpected key.*schedule.posterior_betas"):
        nn.ModuleDict({"schedule": new}).load_state_dict(
            {**state, "schedule.posterior_betas": torch.ones(50)}
        )


def test_snr_closed_form():
    s = NoiseSchedule("linear", num_timesteps=50)
    ac = torch.cumprod(1 - torch.linspace(20 * 1e-4, 20 * 0.02, 50, dtype=torch.float64), 0)  # 1000/T = 20
    t = 17
    assert s.snr[t].item() == pytest.approx((ac[t] / (1 - ac[t])).item(), rel=1e-5)
    assert s.log_snr[t].item() == pytest.approx(math.log(ac[t] / (1 - ac[t])), rel=1e-5)


def test_add_noise_closed_form():
    s = NoiseSchedule("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    ac = s.alphas_cumprod_f64
    expected = torch.stack(
        [ac[i].sqrt() * x0[k] + (1 - ac[i]).sqrt() * eps[k] for k, i in enumerate(t.tolist())]
    )
    torch.testing.assert_close(s.add_noise(x0, eps, t), expected.float(), atol=1e-6, rtol=0)
    # diffusers takes √(1 − ᾱ) of float32 ᾱ, which loses ~1e-6 near t = 0
    ref = diffusers.DDPMScheduler().add_noise(x0, eps, t)
    torch.testing.assert_close(s.add_noise(x0, eps, t), ref, atol=1e-5, rtol=0)


def split(s, model_output, x_t, t, prediction_type):
    """(x̂₀, ε̂) from a model output, with the α = √ᾱ_t and σ = √(1 − ᾱ_t) that `add_noise` used."""
    alpha, sigma = (
        buf[t].to(x_t).view(-1, *[1] * (x_t.ndim - 1))
        for buf in (s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod)
    )
    return split_prediction(model_output, x_t, alpha, sigma, prediction_type)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_round_trips(prediction_type, zero_snr):
    s = NoiseSchedule("cosine", zero_terminal_snr=zero_snr).to(torch.float64)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 2, 3, 3, generator=g).double(), torch.randn(6, 2, 3, 3, generator=g).double()
    t = torch.tensor([0, 1, 250, 500, 900, 998])
    x_t = s.add_noise(x0, eps, t)
    out = s.target(prediction_type, x0, eps, t)
    x0_hat, eps_hat = split(s, out, x_t, t, prediction_type)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)
    # through every other parameterisation and back. ε → x₀ divides by √ᾱ and x₀ → ε by √(1 − ᾱ), which
    # amplify the float32 rounding of the buffers (α² + σ² ≠ 1 exactly), so only the middle timesteps here
    mid = slice(2, -1)
    for other in ["epsilon", "sample", "v_prediction"]:
        back = split(s, s.target(other, x0_hat, eps_hat, t), x_t, t, other)
        torch.testing.assert_close(back[0][mid], x0[mid], atol=1e-5, rtol=0)
        torch.testing.assert_close(back[1][mid], eps[mid], atol=1e-5, rtol=0)
    # v by its definition √ᾱ ε − √(1−ᾱ) x₀
    ac = s.alphas_cumprod_f64[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(s.target("v_prediction", x0, eps, t), ac.sqrt() * eps - (1 - ac).sqrt() * x0)


def test_v_prediction_recovers_x0_at_zero_terminal_snr():
    s = NoiseSchedule("linear", zero_terminal_snr=True)
    x0, eps, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([999, 999])
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, eps)  # pure noise
    x0_hat, eps_hat = split(s, s.target("v_prediction", x0, eps, t), x_t, t, "v_prediction")
    torch.testing.assert_close(x0_hat, x0)


def test_target_rejects_unknown_type():
    s = NoiseSchedule(num_timesteps=10)
    x, t = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="v_prediction"):
        s.target("score", x, x, t)
    with pytest.raises(ValueError, match="min_snr"):
        s.loss_weight(t, kind="p2")


def test_min_snr_weights():
    s = NoiseSchedule("linear")
    t = torch.tensor([0, 100, 300, 999])
    snr = (s.alphas_cumprod_f64 / (1 - s.alphas_cumprod_f64))[t]
    gamma = 5.0
    assert snr[0] > gamma > snr[-1]  # both sides of the clip are exercised
    expected = {
        "epsilon": torch.minimum(snr, torch.full_like(snr, gamma)) / snr,
        "sample": torch.minimum(snr, torch.full_like(snr, gamma)),
        "v_prediction": torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1),
    }
    for ptype, exp in expected.items():
        w = s.loss_weight(t, "min_snr", ptype, gamma)
        assert w.shape == (4,)
        torch.testing.assert_close(w.double(), exp, rtol=1e-5, atol=0)
        assert torch.equal(s.loss_weight(t, "uniform", ptype), torch.ones(4))
    # hand values at t=0: SNR = (1 − 1e-4)/1e-4 = 9999
    assert s.loss_weight(t[:1], "min_snr", "epsilon").item() == pytest.approx(5 / 9999, rel=1e-5)
    assert s.loss_weight(t[:1], "min_snr", "v_prediction").item() == pytest.approx(5 / 10000, rel=1e-5)
    # Min-SNR makes every loss the same x₀-loss: w_ε·SNR = w_x0 = w_v·(SNR+1)
    w_eps, w_x0 = s.loss_weight(t, "min_snr", "epsilon"), s.loss_weight(t, "min_snr", "sample")
    torch.testing.assert_close(w_eps.double() * snr, w_x0.double(), rtol=1e-5, atol=0)


def test_min_snr_zero_terminal_snr_is_finite():
    s = NoiseSchedule("linear", zero_terminal_snr=True)
    t = torch.tensor([998, 999])
    for ptype, at_zero in [("epsilon", 1.0), ("sample", 0.0), ("v_prediction", 0.0)]:
        w = s.loss_weight(t, "min_snr", ptype)
        assert torch.isfinite(w).all(), ptype
        assert w[-1].item() == at_zero, ptype
