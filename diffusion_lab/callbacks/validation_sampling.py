"""When a validation callback samples: the one guard `SampleGrid` and `GenerativeMetrics` share."""

from __future__ import annotations


def sampling_due(trainer, batch_idx: int, every_n_epochs: int) -> bool:
    """True at the first batch of every `every_n_epochs`-th validation epoch (epochs counted from 1), so a
    callback samples once per due epoch, inside it (where the EMA weights are swapped in), and never during
    Lightning's sanity check, which runs before any training."""
    return (
        batch_idx == 0 and not trainer.sanity_checking and (trainer.current_epoch + 1) % every_n_epochs == 0
    )
