"""Post-hoc EMA maths against closed forms: EDM2's σ_rel ↔ γ pairs, the power-function update's exact
discrete weights, the profiles' inner products, and the reconstruction of a length that was not tracked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.utils.post_hoc_ema import (
    SIGMA_REL_MAX,
    SNAPSHOT_FORMAT,
    ema_beta,
    gamma_to_sigma_rel,
    load_snapshots,
    profile_inner,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
)

TRACKED = (0.05, 0.10)


def test_sigma_rel_and_gamma_match_edm2_and_round_trip():
    """EDM2 Sec. 3: σ_rel = 0.05 and 0.10 are γ = 16.97 and 6.94; γ = 0 (uniform average) is σ_rel = 1/√12."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(SIGMA_REL_MAX, abs=1e-15)
    for sigma_rel in (0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.3):
        with pytest.raises(ConfigError, match=f"sigma_rel={bad}.*0 < sigma_rel < 0.2887"):
            sigma_rel_to_gamma(bad)


def _ema_trajectory(theta: np.ndarray, gamma: float) -> np.ndarray:
    """The update avg ← β_t avg + (1 − β_t) θ_t for t = 1..T (θ[0] unused): the average after each step."""
    out, avg = np.zeros_like(theta), 0.0
    for t in range(1, len(theta)):
        beta = ema_beta(t, gamma)
        avg = beta * avg + (1 - beta) * theta[t]
        out[t] = avg
    return out


def test_power_update_gives_the_exact_discrete_weights_and_the_continuous_ramp():
    """On a ramp θ_i = a + b i: the update equals Σ_i (i^(γ+1) − (i−1)^(γ+1)) θ_i / t^(γ+1) (to float64
    rounding), and the continuous profile's a + b t (γ+1)/(γ+2) within b (the discrete profile's mean step is
    about half a step later than the continuous one's)."""
    a, b, T = 0.3, 0.01, 2300
    i = np.arange(T + 1, dtype=np.float64)
    theta = a + b * i
    for sigma_rel in (0.05, 0.1, 0.2):
        gamma = sigma_rel_to_gamma(sigma_rel)
        averages = _ema_trajectory(theta, gamma)
        for t in (1, 7, 500, T):
            k = i[1 : t + 1]
            exact = np.sum((k ** (gamma + 1) - (k - 1) ** (gamma + 1)) * theta[1 : t + 1]) / t ** (gamma + 1)
            assert averages[t] == pytest.approx(exact, rel=1e-12)
        continuous = a + b * T * (gamma + 1) / (gamma + 2)
        assert abs(averages[T] - continuous) < b
        assert averages[T] - continuous == pytest.approx(b / 2, rel=0.01)


def test_profile_inner_products_match_quadrature():
    """<p_a, p_b> = ∫ (γa+1) τ^γa / ta^(γa+1) · (γb+1) τ^γb / tb^(γb+1) dτ over [0, min(ta, tb)]."""
    tau = np.linspace(0, 7, 700_001)
    for t_a, g_a, t_b, g_b in [
        (3.0, 2.0, 7.0, 5.0),
        (7.0, 5.0, 3.0, 2.0),
        (4.0, 16.97, 4.0, 6.94),
        (2.0, 0.0, 5.0, 1.0),
    ]:
        p_a = np.where(tau <= t_a, (g_a + 1) * tau**g_a / t_a ** (g_a + 1), 0)
        p_b = np.where(tau <= t_b, (g_b + 1) * tau**g_b / t_b ** (g_b + 1), 0)
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(np.trapezoid(p_a * p_b, tau), rel=1e-4)
    assert profile_inner(5.0, 3.0, 5.0, 3.0) == pytest.approx(16 / 7 / 5)  # (γ+1)² / (2γ+1) / t


def _snapshots(theta: np.ndarray, every: int, dtype=torch.float32) -> list[dict]:
    """What PostHocEMA saves for a one-weight 'model' θ_t: both tracked averages every `every` steps."""
    gammas = [sigma_rel_to_gamma(s) for s in TRACKED]
    tracks = [_ema_trajectory(theta, g) for g in gammas]
    T = len(theta) - 1
    return [
        {"format": SNAPSHOT_FORMAT, "step": t, "sigma_rels": list(TRACKED), "gammas": gammas,
         "averages": [{"w": torch.tensor([track[t]], dtype=dtype)} for track in tracks]}
        for t in range(every, T + 1, every)
    ]  # fmt: skip


@pytest.mark.parametrize("trajectory", ["ramp", "wave"])
def test_reconstruction_of_an_untracked_length_matches_the_direct_ema(trajectory):
    """15 snapshots of a 2250-step run (every 150): the rebuilt EMA of an untracked σ_rel matches the one
    computed directly within a fraction of the trajectory's range: 0.1% between 0.03 and 0.15 (around the
    tracked 0.05 and 0.10), 0.3% at 0.2 and 1.5% at 0.25, far longer than either tracked profile (measured:
    0.02%-0.06% inside, 0.19% at 0.2 and 1.1% at 0.25). A tracked length is its own snapshot."""
    T = 2250
    t = np.arange(T + 1, dtype=np.float64)
    theta = 0.3 + 0.01 * t if trajectory == "ramp" else np.sin(t / 300) + 0.001 * t
    snapshots = _snapshots(theta, 150)
    spread = theta.max() - theta.min()
    for sigma_rel, tolerance in {0.03: 1e-3, 0.075: 1e-3, 0.15: 1e-3, 0.2: 3e-3, 0.25: 1.5e-2}.items():
        direct = _ema_trajectory(theta, sigma_rel_to_gamma(sigma_rel))[T]
        weights, coefficients = reconstruct(snapshots, sigma_rel)
        assert weights["w"].dtype == torch.float32
        assert coefficients.shape == (15, 2)
        assert abs(weights["w"].item() - direct) < tolerance * spread, sigma_rel
    weights, coefficients = reconstruct(snapshots, 0.10)
    assert coefficients[-1].tolist() == pytest.approx([0, 1], abs=1e-9)
    assert weights["w"].item() == pytest.approx(snapshots[-1]["averages"][1]["w"].item(), abs=1e-6)
    # At an earlier snapshot, only the 5 snapshots up to it are used (measured: 0.19%).
    weights, coefficients = reconstruct(snapshots, 0.15, step=750)
    assert coefficients.shape == (5, 2)
    assert abs(weights["w"].item() - _ema_trajectory(theta, sigma_rel_to_gamma(0.15))[750]) < 3e-3 * spread


def test_coefficients_sum_to_one_and_weight_recent_snapshots_for_short_lengths():
    steps, gammas = [100, 100, 200, 200], [16.97, 6.94, 16.97, 6.94]
    x = solve_coefficients(steps, gammas, 200, sigma_rel_to_gamma(0.03))
    assert x.sum() == pytest.approx(1.0)
    assert abs(x[2:]).sum() > abs(x[:2]).sum()  # a short EMA lives in the last snapshot


def test_reconstruction_errors_name_the_step_and_the_file(tmp_path):
    snapshots = _snapshots(np.arange(301.0), 100)
    with pytest.raises(ConfigError, match=r"step 250: .*steps \[100, 200, 300\]"):
        reconstruct(snapshots, 0.1, step=250)
    torch.save(snapshots[0], tmp_path / "step_0000100.pt")
    (tmp_path / "step_0000200.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="step_0000200.pt is not a readable post-hoc EMA snapshot"):
        load_snapshots(tmp_path)
    (tmp_path / "step_0000200.pt").unlink()
    (loaded,) = load_snapshots(tmp_path)
    assert loaded["step"] == 100 and loaded["path"].endswith("step_0000100.pt")
    assert math.isclose(loaded["averages"][0]["w"].item(), snapshots[0]["averages"][0]["w"].item())
