"""Samplers in σ space for EDM models (schedule=edm, prediction=edm), on Karras's σ grid (EDM eq. 5, from
the schedule's σ_min, σ_max and ρ): Heun (EDM Algorithms 1 and 2) and DPM-Solver++(2M).

They keep the protocol of `samplers.py` that `sampling.sample` drives, one model call per entry of
`timesteps` then `step`, with three questions the loop asks every sampler: `init_noise_sigma` (x_T ~
N(0, σ_max² I)), `model_input` (the x and the time the model is given: here σ as a float, after Heun's
churn) and `noise_level` (the σ the guidance interval reads). The model output is the denoised D(x; σ).
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.diffusion.edm import EDMSchedule, karras_sigmas
from diffusion_lab.diffusion.samplers import DPMSolverPP2MSampler, StepOutput, _randn_like
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.errors import ConfigError
from diffusion_lab.utils.checks import is_int


class SigmaSampler:
    """Base: the Karras σ grid (descending, then 0), σ as the timesteps, and x̂₀ = D, clipped to [-1, 1]
    when `clip_sample` (the ODE steps along x − D, so a clipped D keeps every step consistent)."""

    time_dtype = torch.float32  # the model is given σ

    def __init__(
        self,
        schedule: EDMSchedule,
        prediction_type: str = "edm",
        num_steps: int = 18,
        clip_sample: bool = True,
    ):
        if not isinstance(schedule, EDMSchedule):
            raise ConfigError(
                f"{type(self).__name__} steps through EDM's σ, but the schedule is {type(schedule).__name__}: "
                "sampler=heun needs schedule=edm prediction=edm (on a discrete schedule use ddpm, ddim or dpmpp)"
            )
        if prediction_type != "edm":
            raise ConfigError(
                f"{type(self).__name__} needs the denoised image D (prediction=edm), not {prediction_type!r}"
            )
        self.grid = (schedule.sigma_min, schedule.sigma_max, schedule.rho)
        self.prediction_type, self.clip_sample = prediction_type, clip_sample
        self.set_timesteps(num_steps)

    def set_timesteps(self, num_steps: int) -> None:
        """num_steps σ of the Karras grid (the model's calls: `_timesteps`); also resets any state."""
        if not is_int(num_steps) or num_steps < 1:
            raise ConfigError(
                f"steps={num_steps!r}: a whole number of sampling steps >= 1 (steps= of dlab-sample, dlab-eval "
                "and dlab-viz; sampler.num_steps in training)"
            )
        self.num_steps = int(num_steps)
        self.sigmas = karras_sigmas(self.num_steps, *self.grid).tolist()  # Python floats, ends with 0
        self._next = dict(zip(self.sigmas[:-1], self.sigmas[1:], strict=True))  # σ_i → σ_{i+1}
        self.timesteps = torch.tensor(self._timesteps(), dtype=torch.float64)
        self.init_noise_sigma = self.sigmas[0]
        self.reset()

    def _timesteps(self) -> list[float]:
        return self.sigmas[:-1]

    def reset(self) -> None:
        """Clear state carried between steps."""

    def model_input(self, x: torch.Tensor, t: float, generator=None) -> tuple[torch.Tensor, float]:
        """(x, σ) to call the model with at timestep entry t."""
        return x, t

    def noise_level(self, t: float) -> float:
        return float(t)

    def _denoised(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output.clamp(-1, 1) if self.clip_sample else model_output


class HeunSampler(SigmaSampler):
    """EDM Algorithm 2 (Algorithm 1 when s_churn = 0): from σ_i, churn to σ̂ = σ_i(1 + γ_i),
    γ_i = min(s_churn/N, √2 − 1) for σ_i in [s_tmin, s_tmax] (else 0), with x̂ = x + √(σ̂² − σ_i²) s_noise n;
    then an Euler step  d = (x̂ − D(x̂; σ̂))/σ̂,  x_{i+1} = x̂ + (σ_{i+1} − σ̂) d,  corrected (σ_{i+1} > 0) by
    d′ = (x_{i+1} − D(x_{i+1}; σ_{i+1}))/σ_{i+1},  x_{i+1} = x̂ + (σ_{i+1} − σ̂)(d + d′)/2.

    One model call per `step`, as diffusers' HeunDiscreteScheduler: the timesteps are σ_0 then every interior
    σ twice (2N − 1 calls), and `step` alternates the Euler and the correction stage. The churn happens in
    `model_input`, since the model must see x̂ at σ̂.
    """

    def __init__(
        self,
        schedule: EDMSchedule,
        prediction_type: str = "edm",
        num_steps: int = 18,
        clip_sample: bool = True,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
    ):
        if s_churn < 0 or s_noise <= 0:
            raise ValueError(
                f"s_churn must be >= 0 and s_noise > 0, not s_churn={s_churn}, s_noise={s_noise}"
            )
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise
        super().__init__(schedule, prediction_type, num_steps, clip_sample)

    def _timesteps(self) -> list[float]:
        return self.sigmas[:1] + [s for s in self.sigmas[1:-1] for _ in range(2)]

    def reset(self) -> None:
        self._euler: tuple | None = None  # (x̂, d, σ̂, σ_{i+1}) of an Euler stage awaiting its correction

    def _sigma_hat(self, sigma: float) -> float:
        gamma = min(self.s_churn / self.num_steps, 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
        return sigma * (1 + gamma)

    def model_input(self, x, t, generator=None):
        if self._euler is not None:  # the correction: the model at (x_{i+1}, σ_{i+1})
            return x, t
        sigma_hat = self._sigma_hat(t)
        if sigma_hat > t:
            x = x + (sigma_hat**2 - t**2) ** 0.5 * self.s_noise * _randn_like(x, generator)
        return x, sigma_hat

    def step(self, model_output, t, x, generator=None, noise=None) -> StepOutput:
        """x: what `model_input` returned (x̂ in the Euler stage); model_output: D at that x."""
        denoised = self._denoised(model_output)
        if self._euler is None:
            sigma_hat, sigma_next = self._sigma_hat(t), self._next[t]
            d = (x - denoised) / sigma_hat
            if sigma_next > 0:
                self._euler = (x, d, sigma_hat, sigma_next)
            return StepOutput(x + (sigma_next - sigma_hat) * d, denoised)
        x_hat, d, sigma_hat, sigma_next = self._euler
        self._euler = None
        d_prime = (x - denoised) / sigma_next
        return StepOutput(x_hat + (sigma_next - sigma_hat) * (d + d_prime) / 2, denoised)


class KarrasDPMSolverPP2MSampler(SigmaSampler):
    """DPM-Solver++(2M) on Karras σ (k-diffusion's sample_dpmpp_2m; diffusers' EDMDPMSolverMultistepScheduler
    with solver_order=2, midpoint, final σ 0). With h = ln(σ_i/σ_{i+1}) and r = ln(σ_{i−1}/σ_i)/h:
      x_{i+1} = (σ_{i+1}/σ_i) x_i + (1 − σ_{i+1}/σ_i) D̃,  D̃ = D_i + (D_i − D_{i−1})/(2r)  (D̃ = D_i first),
    and the last step (σ_{i+1} = 0) is first order: x = D_i.
    """

    def reset(self) -> None:
        self._prev: tuple[torch.Tensor, float] | None = None  # (D, σ) of the previous step

    def step(self, model_output, t, x, generator=None, noise=None) -> StepOutput:
        denoised = self._denoised(model_output)
        sigma_next = self._next[t]
        extrapolated = denoised
        if self._prev is not None and sigma_next > 0:
            prev_denoised, prev_sigma = self._prev
            r = math.log(prev_sigma / t) / math.log(t / sigma_next)
            extrapolated = denoised + (denoised - prev_denoised) / (2 * r)
        self._prev = (denoised, t)
        ratio = sigma_next / t
        return StepOutput(ratio * x + (1 - ratio) * extrapolated, denoised)


def dpmpp_2m(
    schedule: NoiseSchedule | EDMSchedule,
    prediction_type: str = "epsilon",
    num_steps: int = 20,
    spacing: str = "trailing",
    clip_sample: bool = True,
):
    """sampler=dpmpp on any schedule: DPM-Solver++(2M) on the discrete timesteps of a `NoiseSchedule`
    (`spacing` picks them), or on Karras σ for an EDM model (the grid is the schedule's; `spacing` is unused)."""
    if isinstance(schedule, EDMSchedule):
        return KarrasDPMSolverPP2MSampler(schedule, prediction_type, num_steps, clip_sample)
    return DPMSolverPP2MSampler(schedule, prediction_type, num_steps, spacing, clip_sample)
