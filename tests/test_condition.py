"""`cycle`: labels and prompts stretched to a sample count."""

from __future__ import annotations

import torch

from diffusion_lab.condition import cycle


def test_labels_cycle_to_n_and_stay_a_tensor():
    assert torch.equal(cycle(torch.tensor([3, 7, 1]), 7), torch.tensor([3, 7, 1, 3, 7, 1, 3]))
    assert torch.equal(cycle(torch.tensor([3, 7, 1]), 2), torch.tensor([3, 7]))  # fewer: the first n


def test_prompts_cycle_to_n_and_stay_a_list():
    assert cycle(("a", "b"), 5) == ["a", "b", "a", "b", "a"]
    assert cycle(["a", "b"], 2) == ["a", "b"]
