"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion
models", Sec. 3 and App. C): the maths, and reading the snapshots a run saved.

A power-function EMA of exponent γ averages the weights θ_τ of steps τ ≤ t with the profile
p(τ) = (γ+1) τ^γ / t^(γ+1): its length grows with training, and its width relative to t is
σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))), the same at every t. Training keeps two such averages and saves
them every few steps; any other (t_r, σ_rel) is then the linear combination of the saved averages whose
combined profile is closest to the target's in L2 (a least-squares problem on closed-form inner products
of the profiles).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from diffusion_lab.errors import CheckpointError, ConfigError

# σ_rel of γ = 0, the uniform average of every step so far: the longest profile that weights later steps
# at least as much as earlier ones (EDM2's reconstruct_phema.py accepts 0 < σ_rel < 0.289 too).
SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)
SNAPSHOT_FORMAT = "diffusion_lab post-hoc EMA snapshot"
SNAPSHOT_GLOB = "step_*.pt"


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the power-function profile of exponent γ (EDM2 eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The γ > 0 with that σ_rel: eq. 3 squared and cleared of fractions is the cubic
    γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, whose largest real root it is."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(
            f"sigma_rel={sigma_rel}: post-hoc EMA reaches 0 < sigma_rel < {SIGMA_REL_MAX:.4f} (the upper end "
            "is the plain average of all steps). Pick lengths in that range, e.g. sigma_rel=[0.05,0.1,0.15]."
        )
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def ema_beta(step: int, gamma: float) -> float:
    """The decay of the update avg ← β avg + (1 − β) θ_t at step t = 1, 2, ... that keeps a power-function
    EMA: β_t = (1 − 1/t)^(γ+1). After it, θ_i carries the weight (i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """∫ p_a p_b dτ of two power-function profiles (broadcast over arrays): with p_a = 0 after t_a,
    (γa+1)(γb+1) / (γa+γb+1) · (min t / max t)^(γ of the longer) / max t."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    longer_gamma = np.where(t_a <= t_b, gamma_b, gamma_a)
    ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    scale = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return scale * ratio**longer_gamma / np.maximum(t_a, t_b)


def solve_coefficients(steps, gammas, target_step: float, target_gamma: float) -> np.ndarray:
    """Weights x of the saved averages (steps[k], gammas[k]) whose combined profile Σ x_k p_k is the L2
    closest to the target's: the normal equations G x = b with G_kl = <p_k, p_l>, b_k = <p_k, p_target>.
    The weights are rescaled to sum to 1 (as EDM2 does), so a constant weight is reproduced exactly."""
    steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
    gram = profile_inner(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = profile_inner(steps, gammas, target_step, target_gamma)
    x = np.linalg.lstsq(gram, target, rcond=None)[0]  # lstsq: two profiles saved at one step are collinear
    return x / x.sum()


def load_snapshots(folder: str | Path) -> list[dict]:
    """The snapshots `callbacks.post_hoc_ema.PostHocEMA` saved in `folder`, oldest first (tensors
    memory-mapped, so reading them all costs little). A file that does not read is a CheckpointError
    naming it."""
    snapshots = []
    for path in sorted(Path(folder).glob(SNAPSHOT_GLOB)):
        try:
            snapshot = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            snapshot = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        if snapshot.get("format") != SNAPSHOT_FORMAT:
            raise CheckpointError(
                f"{path} is not a readable post-hoc EMA snapshot ({snapshot.get('error', 'another format')}): "
                "it may be truncated (a run killed while saving). Delete it; reconstruction uses the others."
            )
        snapshots.append(snapshot | {"path": str(path)})
    return sorted(snapshots, key=lambda s: s["step"])


def reconstruct(
    snapshots: list[dict], sigma_rel: float, step: int | None = None
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """(the float32 weights of the power-function EMA of `sigma_rel` at `step`, the coefficients (one row per
    snapshot used, one column per profile in it)). `step` (default: the newest) must be a snapshot's step:
    the weights after the last snapshot are in none of them. Snapshots after `step` are not used."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    saved = sorted({s["step"] for s in snapshots})
    step = saved[-1] if step is None and saved else step
    if step not in saved:
        raise ConfigError(
            f"post-hoc EMA at step {step}: the run saved snapshots at steps {saved}; pick one of those "
            "(the weights after a snapshot are in none of them)."
        )
    used = [s for s in snapshots if 0 < s["step"] <= step]
    steps = [s["step"] for s in used for _ in s["gammas"]]
    coefficients = solve_coefficients(steps, [g for s in used for g in s["gammas"]], step, gamma)
    combined: dict[str, torch.Tensor] = {}
    weights = iter(coefficients.tolist())
    for snapshot in used:
        for average in snapshot["averages"]:
            x = next(weights)
            for name, value in average.items():  # summed in float64: fp16 storage is the only rounding
                combined[name] = combined.get(name, 0) + x * value.to(torch.float64)
    rows = coefficients.reshape(len(used), -1)
    return {name: value.to(torch.float32) for name, value in combined.items()}, rows
