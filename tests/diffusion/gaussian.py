"""Data ~ N(μ, σ²I) and its exact denoiser: samplers and the sampling loop have known answers on it."""

import math

import torch

from diffusion_lab.condition import Condition

MU, SIGMA = 0.3, 0.5
N, DIM = 2000, 2


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


def assert_gaussian(x, mu=MU, sigma=SIGMA, tol=0.02):
    assert torch.isfinite(x).all()
    # standard errors with 4000 values: mean 0.008, std 0.006; deterministic samplers lose ≤ 3% of σ here
    assert abs(x.mean().item() - mu) < tol, x.mean().item()
    assert abs(x.std().item() - sigma) < tol, x.std().item()
