"""The resumable loaders (loaders.py) through MNISTDataModule on the real files: the epoch-seeded
order, mid-epoch resume by the loader alone and through a Trainer, and the global batch split over ranks."""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lab.data.loaders import ResumableDataLoader, ranks
from diffusion_lab.data.mnist import MNISTDataModule
from diffusion_lab.errors import ConfigError


def test_shuffle_is_seeded_by_epoch(data_dir):
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=16, val_size=100)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def first_labels(epoch):
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))["label"]

    assert torch.equal(first_labels(3), first_labels(3))  # what a resumed run relies on
    assert not torch.equal(first_labels(3), first_labels(4))


# --- mid-epoch resume -------------------------------------------------------------------------


def small_train_loader(data_dir) -> ResumableDataLoader:
    """160 train images in batches of 16: 10 batches an epoch."""
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=16, val_size=60_000 - 160)
    dm.setup("fit")
    return dm.train_dataloader()


def take(loader, epoch, n=None):
    """(labels, images) of the first n batches (all if None) of `epoch`, in Lightning's call order."""
    it = iter(loader)  # Lightning calls iter() first, then set_epoch, then next()
    loader.sampler.set_epoch(epoch)
    batches = list(itertools.islice(it, n))
    return torch.cat([b["label"] for b in batches]), torch.cat([b["image"] for b in batches])


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_resumed_loader_continues_with_the_next_batch(data_dir):
    full = small_train_loader(data_dir)
    assert isinstance(full, ResumableDataLoader) and len(full) == 10
    epoch1, epoch2 = take(full, 1), take(full, 2)

    interrupted = small_train_loader(data_dir)
    take(interrupted, 1, n=3)
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 3}

    resumed = small_train_loader(data_dir)
    resumed.load_state_dict(state)
    rest = take(resumed, 1)
    assert same(rest, (epoch1[0][48:], epoch1[1][48:]))  # the 7 batches not yet trained, in order
    assert len(resumed) == 10  # Lightning's batch index continues at 3, so len stays the epoch's
    assert resumed.state_dict() == {"epoch": 1, "batches": 10}
    assert same(take(resumed, 2), epoch2)  # the skip applies once


def test_a_state_from_another_epoch_skips_nothing(data_dir):
    full = small_train_loader(data_dir)
    epoch2 = take(full, 2)
    stale = small_train_loader(data_dir)
    stale.load_state_dict({"epoch": 1, "batches": 3})
    assert same(take(stale, 2), epoch2)
    assert same(take(small_train_loader(data_dir), 2), epoch2)  # a fresh loader: same order


class _Recorder(L.LightningModule):
    """Records the labels of every trained batch; the loss only has to be differentiable."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["label"].clone())
        return self.layer(batch["image"].mean((1, 2, 3))[:, None]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(data_dir, tmp_path, ckpt_path=None, callbacks=(), **kwargs):
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        **kwargs,
    )
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=16, val_size=60_000 - 160)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def test_trainer_resumes_mid_epoch_on_the_next_batch(data_dir, tmp_path):
    uninterrupted = _fit(data_dir, tmp_path / "a", max_steps=16)
    # A checkpoint after step 13 = epoch 1, batch 3 of 10, saved in on_train_batch_end.
    every_13 = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=13, save_top_k=-1)
    _fit(data_dir, tmp_path / "b", callbacks=[every_13], max_steps=13)
    (ckpt,) = os.listdir(tmp_path / "ckpt")
    resumed = _fit(data_dir, tmp_path / "c", ckpt_path=tmp_path / "ckpt" / ckpt, max_steps=16)
    assert len(resumed) == 3 and same(resumed, uninterrupted[13:])


def test_trainer_can_rebuild_the_train_loader_for_overfit_batches(data_dir, tmp_path):
    # overfit_batches makes Lightning re-instantiate the loader with a SequentialSampler.
    seen = _fit(data_dir, tmp_path, overfit_batches=2, max_epochs=2, num_sanity_val_steps=0)
    assert len(seen) == 4 and same(seen[:2], seen[2:])


# --- ranks -----------------------------------------------------------------------------------------


def test_the_global_batch_must_split_evenly_over_the_ranks():
    def datamodule(batch_size, trainer):
        return SimpleNamespace(trainer=trainer, hparams=SimpleNamespace(batch_size=batch_size))

    assert ranks(datamodule(8, None)) == (1, 0)  # no trainer: one process
    assert ranks(datamodule(9, SimpleNamespace(world_size=3, global_rank=2))) == (3, 2)
    with pytest.raises(ConfigError) as err:
        ranks(datamodule(8, SimpleNamespace(world_size=3, global_rank=0)))
    assert str(err.value) == (
        "data.batch_size=8 is the global batch and must divide evenly over 3 processes; pick a multiple of 3."
    )
