"""EDM (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models"): the σ
schedule, its preconditioning of any net, and its training loss weight.

Forward process (variance exploding):  x = x₀ + σ n,  n ~ N(0, I),  σ ∈ [σ_min, σ_max].
The denoiser is D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)) with F the raw net (Table 1):
  c_skip = σ_d²/(σ² + σ_d²),  c_out = σ σ_d/√(σ² + σ_d²),  c_in = 1/√(σ² + σ_d²),
so the net's input and its regression target (x₀ − c_skip x)/c_out both have unit variance at every σ.
Training draws ln σ ~ N(P_mean, P_std²) and weights ‖D − x₀‖² by λ(σ) = (σ² + σ_d²)/(σ σ_d)² = 1/c_out²,
which is a uniform loss on F's own target.

c_noise: EDM feeds ¼ ln σ to its nets, a range of 2.6 over [0.002, 80]. Our nets' sinusoidal embedding
(nets/layers.timestep_embedding) was designed for t in 0..999, where its fastest frequency turns once per
step, so c_noise = 1000 · ¼ ln σ = 250 ln σ: about 1,200 apart over the central 95% of the training σ
(ln σ in −1.2 ± 2.4), the spread of t it was built for.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion_lab.errors import ConfigError

C_NOISE_SCALE = 250.0  # c_noise = 250 ln σ = 1000 × EDM's ¼ ln σ (see the module docstring)
WEIGHTINGS = ("uniform", "min_snr")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM eq. 5, float64, descending, then a final 0 (n + 1 values):
    σ_i = (σ_max^{1/ρ} + i/(n − 1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < n (n = 1: σ_max alone)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …, 1) on `like`'s device and dtype, to scale a batch of images."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class EDMSchedule(nn.Module):
    """EDM's σ range, data scale and training σ distribution. It holds no tensors (the σ of a batch is
    drawn, not looked up), so a checkpoint stores nothing for it.

    The same methods as `NoiseSchedule` (sample_times, add_noise, target, loss_weight), with σ where that
    has the timestep t, so `DiffusionModule.diffusion_loss` is one function for both.
    """

    prediction_types = ("edm",)

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"sigma_min must be > 0 and below sigma_max, not {sigma_min!r} (sigma_max={sigma_max})"
            )
        for key, value in {"rho": rho, "sigma_data": sigma_data, "p_std": p_std}.items():
            if not value > 0:
                raise ValueError(f"{key} must be > 0, not {value!r}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)

    def extra_repr(self) -> str:
        return (
            f"sigma=[{self.sigma_min}, {self.sigma_max}], rho={self.rho}, sigma_data={self.sigma_data}, "
            f"ln sigma ~ N({self.p_mean}, {self.p_std}^2)"
        )

    # ------------------------------------------------------------------------------------------- training
    def sample_times(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training noise levels σ = exp(P_mean + P_std n), n ~ N(0, 1): float (B,)."""
        n = torch.randn(batch, device=device, generator=generator)
        return (self.p_mean + self.p_std * n).exp()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x = x₀ + σ n."""
        return x0 + _per_sample(sigma, x0) * noise

    def target(self, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
        """The preconditioned model's output D(x; σ) regresses x₀ itself."""
        self._check(prediction_type)
        return x0

    def loss_weight(
        self, sigma: torch.Tensor, kind: str = "uniform", prediction_type: str = "edm", gamma: float = 5.0
    ) -> torch.Tensor:
        """(B,) weights of ‖D − x₀‖².

        uniform: EDM's λ(σ) = (σ² + σ_d²)/(σ σ_d)² = 1/c_out², i.e. uniform on the net's own output F, as
          `uniform` is on every other prediction type's target (conf/prediction/edm.yaml picks it).
        min_snr: min(SNR, γ) with SNR = 1/σ² (x₀ at unit scale, as `NoiseSchedule.snr`), the x₀ weight that
          min_snr gives every other prediction type (Hang et al. 2023).
        """
        self._check(prediction_type)
        if kind == "uniform":
            return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        if kind != "min_snr":
            raise ConfigError(f"Unknown loss weight kind {kind!r}; options: {', '.join(WEIGHTINGS)}")
        return sigma.pow(-2).clamp(max=gamma)

    # ----------------------------------------------------------------------------------- preconditioning
    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) at σ (EDM Table 1; c_noise as in the module docstring), each like σ."""
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2).sqrt()
        return sd2 / norm**2, sigma * self.sigma_data / norm, 1 / norm, C_NOISE_SCALE * sigma.log()

    @staticmethod
    def _check(prediction_type: str) -> None:
        if prediction_type != "edm":
            raise ConfigError(
                f"schedule=edm needs prediction=edm (EDM's preconditioned denoiser), not {prediction_type!r}"
            )


class EDMPreconditioned(nn.Module):
    """The denoiser D(x; σ) = c_skip x + c_out net(c_in x, c_noise, condition) around any net called as
    net(x, t, condition); called as (x, σ (B,), condition), it returns D = x̂₀."""

    def __init__(self, net: nn.Module, schedule: EDMSchedule):
        super().__init__()
        self.net, self.schedule = net, schedule

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, condition=None) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = self.schedule.preconditioning(sigma.to(x.dtype))
        out = self.net(_per_sample(c_in, x) * x, c_noise, condition)
        return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * out
