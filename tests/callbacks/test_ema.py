"""WarmupEMA's averaging against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.callbacks.ema import WarmupEMA


def test_ema_warmup_moves_towards_current_by_one_minus_decay():
    """From averaged = 0 towards current = 1: one update with n gives 1 − d_n, d_n = min(decay, (1+n)/(10+n)),
    and updates n = 1..k give 1 − ∏ d_n (since 1 − a_n = d_n (1 − a_{n−1})). decay = 0.7 is reached at
    n = 20, so k = 30 covers both the warm-up (1+n)/(10+n) and the cap."""
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
