"""Noise schedules: pure float64 beta curves and the `NoiseSchedule` module that holds them as buffers.

Forward process (DDPM, Ho et al. 2020):  x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε,   ᾱ_t = ∏_{s≤t} (1 − β_s),
with t ∈ {0, …, T−1} (0-indexed like diffusers). SNR(t) = ᾱ_t / (1 − ᾱ_t).

The beta functions are pure and return float64 so that cumulative products stay exact; `NoiseSchedule`
stores float32 buffers (moved by `.to()` / DDP, unlike diffusers' plain tensors) and keeps a float64 CPU copy
of ᾱ for samplers, which only need scalar coefficients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusion_lab.errors import ConfigError
from diffusion_lab.utils.checks import is_int

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# Buffers that earlier versions also saved (β, α, ᾱ_{t−1} and the DDPM posterior terms) though nothing
# read them; checkpoints from then still hold them, so loading drops them (NoiseSchedule._load_from_state_dict).
RETIRED_BUFFERS = (
    "betas", "alphas", "alphas_cumprod_prev", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip

# ---------------------------------------------------------------------------------------------------------
# Beta curves (pure, float64, shape (T,))
# ---------------------------------------------------------------------------------------------------------


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM linear betas. The endpoints are scaled by 1000/T (improved-DDPM's `get_named_beta_schedule`)
    so that any T gives roughly the same ᾱ curve; T=1000 equals diffusers' "linear"."""
    scale = 1000.0 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent-diffusion / Stable Diffusion schedule: linear in √β, i.e. β_t = (lerp(√β₀, √β₁))²."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ᾱ(τ) = cos²((τ + s)/(1 + s) · π/2),
    β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), max_beta).

    Equals diffusers' "squaredcos_cap_v2". The cap stops β reaching 1 at the end, where ᾱ(1) = 0.
    """
    tau = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def sigmoid_betas(
    T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> torch.Tensor:
    """Sigmoid schedule (Chen 2023, "On the importance of noise scheduling"; lucidrains' version).

    ᾱ(τ) ∝ (σ(end/τ_) − σ((τ(end − start) + start)/τ_)) / (σ(end/τ_) − σ(start/τ_)), normalised so ᾱ(0) = 1;
    β_t = clip(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0, max_beta). Larger `tau` makes the curve closer to linear-in-τ.
    """
    t = torch.linspace(0, 1, T + 1, dtype=torch.float64)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alpha_bar = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale √ᾱ so that √ᾱ_{T−1} = 0 and √ᾱ_0 is unchanged.

    √ᾱ' = (√ᾱ − √ᾱ_T) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_T); the last β becomes exactly 1 (ᾱ_T = 0: pure noise, SNR 0).
    """
    betas = betas.to(torch.float64)
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


BETA_SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}

# ---------------------------------------------------------------------------------------------------------
# Conversions between prediction types, in terms of α = √ᾱ and σ = √(1 − ᾱ) (floats or broadcastable
# tensors). Taking σ directly, not 1 − ᾱ, avoids cancellation near t = 0 where ᾱ ≈ 1.
# ---------------------------------------------------------------------------------------------------------


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        options = ", ".join(PREDICTION_TYPES)
        raise ConfigError(f"Unknown prediction_type {prediction_type!r}; options: {options}")


def split_prediction(model_output, x_t, alpha, sigma, prediction_type: str):
    """(x̂₀, ε̂) from a model output, with x_t = α x₀ + σ ε:

    epsilon: x̂₀ = (x_t − σ ε̂)/α      (undefined where α = 0: ε alone cannot locate x₀ in pure noise)
    sample:  ε̂ = (x_t − α x̂₀)/σ
    v:       x̂₀ = α x_t − σ v,  ε̂ = σ x_t + α v      (v = α ε − σ x₀, Salimans & Ho 2022; α² + σ² = 1)
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (x_t - alpha * model_output) / sigma
    return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output


def join_prediction(x0, eps, alpha, sigma, prediction_type: str):
    """The model output (regression target) of `prediction_type` for x₀ and ε: ε, x₀ or v = α ε − σ x₀."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return alpha * eps - sigma * x0


# ---------------------------------------------------------------------------------------------------------
# NoiseSchedule
# ---------------------------------------------------------------------------------------------------------


class NoiseSchedule(nn.Module):
    """β → ᾱ, √ᾱ, √(1 − ᾱ), SNR and log-SNR as buffers; `add_noise`, training targets and loss weights.

    With `zero_terminal_snr=True`, ᾱ_{T−1} = 0 exactly (SNR 0, log-SNR −inf). Pair it with v_prediction:
    an ε-predictor cannot recover x₀ at that step (x̂₀ divides by √ᾱ = 0).
    """

    prediction_types = PREDICTION_TYPES  # what it trains (diffusion/edm.py's EDMSchedule trains "edm")

    def __init__(
        self, kind: str = "linear", num_timesteps: int = 1000, zero_terminal_snr: bool = False, **beta_kwargs
    ):
        super().__init__()
        if kind not in BETA_SCHEDULES:
            raise ConfigError(f"Unknown schedule kind {kind!r}; options: {', '.join(BETA_SCHEDULES)}")
        if not is_int(num_timesteps) or num_timesteps < 2:
            # A ValueError, not a ConfigError: the key that set it differs by command (build() names it).
            # One noise level is no diffusion (and zero_terminal_snr would divide by √ᾱ_0 − √ᾱ_0 = 0).
            raise ValueError(
                f"num_timesteps is the number of training noise levels, a whole number >= 2, not {num_timesteps!r}"
            )
        self.kind, self.num_timesteps, self.zero_terminal_snr = kind, num_timesteps, zero_terminal_snr
        betas = BETA_SCHEDULES[kind](num_timesteps, **beta_kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)

        # Everything in float64 first; only the stored buffers are rounded to float32.
        ac = torch.cumprod(1 - betas, 0)
        # 1 − ᾱ_t ≥ β_0 > 0 for every t, so the division below is safe even when ᾱ_T = 0.
        one_minus_ac = 1 - ac

        #: float64 CPU copy of ᾱ for samplers (plain attribute: not moved by `.to()`, not in state_dict).
        self.alphas_cumprod_f64 = ac
        buffers = {
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": one_minus_ac.sqrt(),
            "snr": ac / one_minus_ac,
            "log_snr": torch.log(ac) - torch.log(one_minus_ac),  # −inf where ᾱ = 0
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in RETIRED_BUFFERS:  # an old checkpoint's extra buffers, not "unexpected keys"
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, T={self.num_timesteps}, zero_terminal_snr={self.zero_terminal_snr}"

    @staticmethod
    def _extract(buffer: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """buffer[t] reshaped to (B, 1, …, 1) on `like`'s device and dtype (works even if the schedule was
        left on another device than the batch)."""
        values = buffer[t.to(buffer.device).long()].to(device=like.device, dtype=like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_times(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps, uniform over the T levels: LongTensor (B,)."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x₀): √ᾱ_t x₀ + √(1 − ᾱ_t) ε, with t a LongTensor (B,)."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1 − ᾱ_t)), each (B, 1, …, 1)."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, like),
            self._extract(self.sqrt_one_minus_alphas_cumprod, t, like),
        )

    def target(
        self, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Regression target: ε, x₀, or v = √ᾱ ε − √(1 − ᾱ) x₀."""
        return join_prediction(x0, noise, *self._alpha_sigma(t, x0), prediction_type)

    def loss_weight(
        self, t: torch.Tensor, kind: str = "uniform", prediction_type: str = "epsilon", gamma: float = 5.0
    ) -> torch.Tensor:
        """(B,) weights multiplying a per-sample MSE on `prediction_type`'s target.

        min_snr (Hang et al. 2023) makes every prediction type equivalent to an x₀-loss weighted min(SNR, γ):
        since ‖ε̂ − ε‖² = SNR·‖x̂₀ − x₀‖² and ‖v̂ − v‖² = (SNR + 1)·‖x̂₀ − x₀‖²,
          epsilon: min(SNR, γ)/SNR = min(1, γ/SNR)   (→ 1 as SNR → 0; γ/0 = inf is clamped, no NaN)
          sample:  min(SNR, γ)
          v:       min(SNR, γ)/(SNR + 1)
        """
        check_prediction_type(prediction_type)
        snr = self.snr[t.to(self.snr.device).long()].to(t.device)
        if kind == "uniform":
            return torch.ones_like(snr)
        if kind != "min_snr":
            raise ConfigError(f"Unknown loss weight kind {kind!r}; options: uniform, min_snr")
        if prediction_type == "epsilon":
            return (gamma / snr).clamp(max=1.0)
        clipped = snr.clamp(max=gamma)
        return clipped if prediction_type == "sample" else clipped / (snr + 1)
