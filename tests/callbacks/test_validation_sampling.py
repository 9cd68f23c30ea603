"""When the validation callbacks (sample grid, validation FID) sample."""

from __future__ import annotations

from types import SimpleNamespace

from diffusion_lab.callbacks.validation_sampling import sampling_due


def due_epochs(every_n_epochs: int, batch_idx: int = 0, sanity_checking: bool = False) -> list[int]:
    return [
        epoch
        for epoch in range(6)
        if sampling_due(
            SimpleNamespace(sanity_checking=sanity_checking, current_epoch=epoch), batch_idx, every_n_epochs
        )
    ]


def test_every_epoch_samples_at_its_first_batch_only():
    assert due_epochs(1) == [0, 1, 2, 3, 4, 5]
    assert due_epochs(1, batch_idx=1) == []


def test_every_third_epoch_counts_epochs_from_one():
    assert due_epochs(3) == [2, 5]  # the 3rd and 6th validation epochs


def test_the_sanity_check_never_samples():
    assert due_epochs(1, sanity_checking=True) == []
