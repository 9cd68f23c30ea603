"""Loaders over map-style datasets that resume mid-epoch, shared by the DataModules.

The order comes from a DistributedSampler, also on one process: its shuffle is seeded by
(seed, epoch), so a resumed run sees exactly the order an uninterrupted one would (Lightning calls
set_epoch). The train loader counts the batches it hands out; a checkpoint saved mid-epoch records
that count, and the resumed run continues with the next batch of the same epoch order.
"""

from __future__ import annotations

import itertools

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from diffusion_lab.errors import ConfigError


def _identity_collate(batch):
    """The datasets' `__getitems__` returns a whole batch already: nothing is left to collate."""
    return batch


class ResumableSampler(DistributedSampler):
    """A DistributedSampler whose next pass starts at index `start` of this rank's list.

    `len` stays the full epoch so Lightning's batch index (which continues after a resume) and its
    `is_last_batch` bookkeeping still line up with the batches that are actually left.
    """

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


class ResumableDataLoader(DataLoader):
    """A train DataLoader that Lightning can checkpoint mid-epoch (the `_Stateful` protocol).

    Lightning stores `state_dict()` in every checkpoint and calls `load_state_dict()` on restore, but
    a plain loader would restart the epoch from its first batch while the batch index continues.
    Lightning does not prefetch sized loaders, so the count of batches handed out is exactly the
    count trained. No `__init__`: Lightning rebuilds loaders from DataLoader's own arguments (e.g.
    for `overfit_batches`), so the signature must stay DataLoader's.
    """

    _epoch: int | None = None  # the epoch of the pass in progress, None before the first
    _batches = 0  # batches handed out in that pass
    _resume: dict | None = None  # a loaded state, applied to the next pass of the same epoch

    def state_dict(self) -> dict:
        epoch = getattr(self.sampler, "epoch", 0) if self._epoch is None else self._epoch
        return {"epoch": epoch, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def __iter__(self):
        # A generator: this body runs at the first next(), after Lightning's set_epoch (it calls
        # iter() before that), so the epoch compared here is the one about to be trained.
        state, self._resume = self._resume, None
        self._epoch, skip = getattr(self.sampler, "epoch", 0), 0
        if isinstance(self.sampler, ResumableSampler):
            if state is not None and state["epoch"] == self._epoch:
                skip = state["batches"]
            # Skip in the sampler, so the images of the trained batches are never loaded.
            self.sampler.start = skip * self.batch_size
        self._batches = skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch


class RestoresTrainPosition:
    """A DataModule mixin that restores its train loader's mid-epoch position itself.

    Lightning hands the stored loader state only to a loader it builds after reading the checkpoint.
    A loader built earlier (Lightning builds one to compute `estimated_stepping_batches`, which the LR
    schedule of an epoch-based run asks for) never gets it, and the resumed epoch would start again at
    its first batch. The DataModule's own state is restored in every case.
    """

    _train_loader: DataLoader | None = None
    _train_position: dict | None = None

    def state_dict(self) -> dict:
        if not isinstance(self._train_loader, ResumableDataLoader):
            return {}  # e.g. webdataset shards: streamed, they restart the epoch
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._train_position = state.get("train_loader")
        self._restore_position()

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_set, True)
        self._restore_position()
        return self._train_loader

    def _restore_position(self) -> None:
        if isinstance(self._train_loader, ResumableDataLoader) and self._train_position:
            self._train_loader.load_state_dict(self._train_position)


def ranks(datamodule: L.LightningDataModule) -> tuple[int, int]:
    """(world size, rank) of the datamodule's trainer, checking that `data.batch_size`, the global batch,
    splits evenly over the processes (each gets batch_size / world)."""
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
    if datamodule.hparams.batch_size % world:
        raise ConfigError(
            f"data.batch_size={datamodule.hparams.batch_size} is the global batch and must divide evenly "
            f"over {world} processes; pick a multiple of {world}."
        )
    return world, rank


def sampled_loader(
    loader: type[DataLoader],
    dataset,
    train: bool,
    world: int,
    rank: int,
    *,
    batch_size: int,
    seed: int,
    workers: int,
) -> DataLoader:
    """This rank's loader of `dataset`, whose `__getitems__` returns a batch: shuffled by (seed, epoch)
    and cut to whole batches when `train`, in order and whole otherwise. `batch_size` is the global
    batch; `loader` is the class (only a train loader needs to resume mid-epoch)."""
    sampler = ResumableSampler(
        dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train
    )
    return loader(
        dataset,
        batch_size=batch_size // world,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_identity_collate,
        drop_last=train,
        persistent_workers=workers > 0,
    )
