"""Samplers: DDPM, DDIM and DPM-Solver++(2M) steps (the loop that runs them is `sampling.sample`).

A sampler is separate from the training schedule (diffusers' `set_timesteps` / `step` protocol): it reads
the schedule's float64 ᾱ once and runs on any subset of the T training timesteps. Every batch element shares
the same t while sampling, so all coefficients are Python floats: no device or dtype bookkeeping.

Notation for one step from timestep t to the next (earlier) timestep s: a_t = ᾱ_t, a_s = ᾱ_s, with a_s = 1
after the last timestep (diffusers' `set_alpha_to_one=True`), so the final step returns the clean x̂₀.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from diffusion_lab.diffusion.schedules import NoiseSchedule, check_prediction_type, split_prediction
from diffusion_lab.errors import ConfigError

SPACINGS = ("leading", "trailing", "linspace")


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_s
    pred_x0: torch.Tensor  # x̂₀ used for the step (clipped when clip_sample)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device (CPU by default) then moved: same seed, same noise on any device.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def noise_level(alpha_cumprod: float) -> float:
    """EDM's σ = √((1 − ᾱ)/ᾱ), the noise level of x_t/√ᾱ (inf at ᾱ = 0): schedule-independent, so a
    guidance interval given in σ means the same thing under every noise schedule."""
    return math.inf if alpha_cumprod <= 0 else math.sqrt((1 - alpha_cumprod) / alpha_cumprod)


class Sampler:
    """Base class: timestep selection, x̂₀/ε̂ from the model output, optional clipping of x̂₀ to [-1, 1].

    What `sampling.sample` asks of every sampler (edm_samplers.py answers in σ): the model is given the
    integer timestep (`time_dtype`), x_T ~ N(0, I) (`init_noise_sigma`), and the guidance interval reads
    `noise_level(t)`."""

    time_dtype = torch.long
    init_noise_sigma = 1.0

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        num_steps: int | None = 50,
        spacing: str = "leading",
        clip_sample: bool = True,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise ConfigError(
                f"{type(self).__name__} steps through a discrete schedule's timesteps, but the schedule is "
                f"{type(schedule).__name__}: an EDM model samples with sampler=heun or sampler=dpmpp"
            )
        check_prediction_type(prediction_type)
        num_steps = schedule.num_timesteps if num_steps is None else num_steps
        self.prediction_type, self.clip_sample = prediction_type, clip_sample
        self.num_train_timesteps = schedule.num_timesteps
        self.alphas_cumprod = schedule.alphas_cumprod_f64.tolist()  # Python floats (float64)
        self.spacing = spacing
        self.set_timesteps(num_steps, spacing)

    def set_timesteps(self, num_steps: int, spacing: str | None = None) -> None:
        """Choose `num_steps` of the T training timesteps, descending, exactly as diffusers' DDIM/DDPM
        schedulers do with steps_offset=0 (Lin et al. 2023, Table 2):
          leading:  (0, r, 2r, …)·reversed with r = T // n       (never reaches T−1)
          trailing: round(T, T − r, …, r) − 1 with r = T / n     (starts at T−1, needed for zero-terminal SNR)
          linspace: round(linspace(0, T−1, n)), reversed
        Also resets any multistep state."""
        spacing = spacing or self.spacing
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ConfigError(
                f"steps={num_steps}: the training schedule has {T} timesteps, so use 1 to {T} sampling steps "
                "(steps= of dlab-sample, dlab-eval and dlab-viz; sampler.num_steps in training)"
            )
        if spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1]
        elif spacing == "trailing":
            # [:n]: arange's float step sometimes yields an n+1-th value (−1 after the shift; a diffusers bug)
            ts = np.round(np.arange(T, 0, -T / num_steps))[:num_steps] - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        else:
            raise ConfigError(f"Unknown spacing {spacing!r}; options: {', '.join(SPACINGS)}")
        self.num_steps, self.spacing = num_steps, spacing
        self.timesteps = torch.from_numpy(ts.astype(np.int64).copy())
        steps = self.timesteps.tolist()
        # t → the next (earlier) timestep; −1 stands for the clean data (ᾱ = 1)
        self._prev = dict(zip(steps, steps[1:] + [-1], strict=True))
        if self.prediction_type == "epsilon" and self.alphas_cumprod[steps[0]] == 0.0:
            warnings.warn(
                "ᾱ = 0 at the first timestep (zero terminal SNR): an epsilon prediction cannot recover x̂₀ "
                "there (division by √ᾱ = 0); use prediction_type='v_prediction'",
                stacklevel=2,
            )
        self.reset()

    def reset(self) -> None:
        """Clear state carried between steps (none for one-step samplers)."""

    def model_input(self, x: torch.Tensor, t: int, generator=None) -> tuple[torch.Tensor, int]:
        """(x, timestep) to call the model with at timestep t: unchanged."""
        return x, t

    def noise_level(self, t: int) -> float:
        return noise_level(self.alphas_cumprod[t])

    def _alphas(self, t: int) -> tuple[float, float, int]:
        """(ᾱ_t, ᾱ_s, s) for the current timestep t and the next one s (ᾱ_s = 1 after the last step)."""
        t = int(t)
        s = self._prev[t]
        return self.alphas_cumprod[t], (self.alphas_cumprod[s] if s >= 0 else 1.0), s

    def _x0_eps(self, model_output, x, a_t):
        x0, eps = split_prediction(model_output, x, a_t**0.5, (1 - a_t) ** 0.5, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
            # Keep ε̂ consistent with the clipped x̂₀ so x_t still lies on the (x̂₀, ε̂) line (improved-DDPM;
            # diffusers' `use_clipped_model_output=True`). 1 − ᾱ_t ≥ β_0 > 0, so the division is safe.
            eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        return x0, eps

    def step(self, model_output, t: int, x, generator=None, noise=None) -> StepOutput:  # pragma: no cover
        """One step from timestep t (an element of `self.timesteps`) to the next one.

        model_output: the network's output (of `prediction_type`) at (x, t); x: the current sample x_t.
        generator / noise: source of the variance noise for stochastic samplers (explicit `noise` wins).
        """
        raise NotImplementedError


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020), generalised to skipped steps through ᾱ alone:

    α = a_t/a_s, β = 1 − α,  mean = (√a_s β/(1 − a_t)) x̂₀ + (√α (1 − a_s)/(1 − a_t)) x_t,
    variance σ² = β ("beta", the DDPM lesson's choice; diffusers' fixed_large) or
    β̃ = β (1 − a_s)/(1 − a_t) ("posterior", fixed_small). No noise on the final step.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        num_steps: int | None = None,
        spacing: str = "leading",
        clip_sample: bool = True,
        variance: str = "beta",
    ):
        if variance not in ("beta", "posterior"):
            raise ConfigError(f"Unknown variance {variance!r}; options: beta, posterior")
        self.variance = variance  # num_steps None: every training timestep (Sampler.__init__)
        super().__init__(schedule, prediction_type, num_steps, spacing, clip_sample)

    def step(self, model_output, t, x, generator=None, noise=None) -> StepOutput:
        a_t, a_s, s = self._alphas(t)
        x0, _ = self._x0_eps(model_output, x, a_t)
        alpha = a_t / a_s
        beta = 1 - alpha
        mean = (a_s**0.5 * beta / (1 - a_t)) * x0 + (alpha**0.5 * (1 - a_s) / (1 - a_t)) * x
        if s < 0:  # last step: return the mean (= x̂₀, since a_s = 1)
            return StepOutput(mean, x0)
        var = beta if self.variance == "beta" else beta * (1 - a_s) / (1 - a_t)
        noise = _randn_like(x, generator) if noise is None else noise
        return StepOutput(mean + var**0.5 * noise, x0)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021), eq. 12:

    x_s = √a_s x̂₀ + √(1 − a_s − σ²) ε̂ + σ z,   σ = η √((1 − a_s)/(1 − a_t)) √(1 − a_t/a_s).
    η = 0 is the deterministic probability-flow sampler; η = 1 has DDPM's posterior variance.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        num_steps: int = 50,
        spacing: str = "leading",
        clip_sample: bool = True,
        eta: float = 0.0,
    ):
        self.eta = eta
        super().__init__(schedule, prediction_type, num_steps, spacing, clip_sample)

    def step(self, model_output, t, x, generator=None, noise=None) -> StepOutput:
        a_t, a_s, _ = self._alphas(t)
        x0, eps = self._x0_eps(model_output, x, a_t)
        std = self.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
        prev = a_s**0.5 * x0 + max(1 - a_s - std**2, 0.0) ** 0.5 * eps
        if std > 0:
            prev = prev + std * (_randn_like(x, generator) if noise is None else noise)
        return StepOutput(prev, x0)


def _log_snr_half(a: float) -> float:
    """λ = log(α/σ) = ½ log(ᾱ/(1 − ᾱ)), with ±inf at ᾱ ∈ {1, 0}."""
    if a <= 0:
        return -math.inf
    if a >= 1:
        return math.inf
    return 0.5 * (math.log(a) - math.log1p(-a))


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep in data prediction, midpoint variant (as diffusers).

    With α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ), h = λ_s − λ_t, and D = x̂₀ at the current step:
      1st order (first and last step):  x_s = (σ_s/σ_t) x_t + α_s (1 − e^{−h}) D₀
      2nd order: the same with D = D₀ + (D₀ − D₋₁)/(2 r),  r = (λ_t − λ_prev)/h,
    where D₋₁ is the previous step's x̂₀ (kept as state, cleared by `set_timesteps`/`reset`).
    α_s(1 − e^{−h}) = α_s − σ_s α_t/σ_t is written without λ, so ᾱ_s = 1 (last step) and ᾱ_t = 0 (zero
    terminal SNR) stay finite; a previous step at λ = −inf falls back to first order.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        num_steps: int = 20,
        spacing: str = "trailing",
        clip_sample: bool = True,
    ):
        # Trailing by default: "leading"/"linspace" end with a step onto t = 0 (λ jumps by ~2 there with the
        # linear schedule) that the 2nd-order extrapolation overshoots (x₀ std +20% on Gaussian data, also in
        # diffusers with the same timesteps). diffusers' DPM "leading" differs from DDIM's for that reason.
        super().__init__(schedule, prediction_type, num_steps, spacing, clip_sample)

    def reset(self) -> None:
        self._prev_x0: torch.Tensor | None = None
        self._prev_lambda = 0.0

    def step(self, model_output, t, x, generator=None, noise=None) -> StepOutput:
        a_t, a_s, s = self._alphas(t)
        x0, _ = self._x0_eps(model_output, x, a_t)
        lam_t, lam_s = _log_snr_half(a_t), _log_snr_half(a_s)
        alpha_s, sigma_s, sigma_t = a_s**0.5, (1 - a_s) ** 0.5, (1 - a_t) ** 0.5
        # α_s(1 − e^{−h}) with e^{−h} = (σ_s α_t)/(α_s σ_t): finite for a_s = 1 (σ_s = 0) and a_t = 0.
        data_coef = alpha_s - sigma_s * a_t**0.5 / sigma_t
        d = x0
        # Second order needs a previous x̂₀ at finite λ; last step stays first order (lower_order_final).
        if self._prev_x0 is not None and s >= 0 and math.isfinite(self._prev_lambda):
            r = (lam_t - self._prev_lambda) / (lam_s - lam_t)
            d = x0 + (x0 - self._prev_x0) / (2 * r)
        prev = (sigma_s / sigma_t) * x + data_coef * d
        self._prev_x0, self._prev_lambda = x0, lam_t
        return StepOutput(prev, x0)
