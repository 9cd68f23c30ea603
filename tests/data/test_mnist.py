"""MNISTDataModule on the real files: batch contract, seeded split, epoch-seeded order, mid-epoch
resume, bad folders and corrupt files."""

from __future__ import annotations

import itertools
import os
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lab.data.mnist import MNISTDataModule, ResumableDataLoader, load_split
from diffusion_lab.errors import DataError

RAW = [f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


def test_batches_follow_the_contract(data_dir):
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=32, val_size=1000)
    dm.setup("fit")
    assert len(dm.train_set) == 59_000 and len(dm.val_set) == 1000
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].min() == -1
    assert batch["label"].dtype == torch.long and batch["label"].shape == (32,)
    # Normalised on the fly from the uint8 tensor: pixel 0 -> -1, 255 -> 1.
    images, labels = load_split(data_dir, train=True)
    assert images.dtype == torch.uint8 and images.shape == (60_000, 1, 28, 28)


def test_split_is_seeded_and_disjoint(data_dir):
    a = MNISTDataModule(data_dir=str(data_dir), val_size=500, split_seed=1)
    b = MNISTDataModule(data_dir=str(data_dir), val_size=500, split_seed=1)
    a.setup("fit")
    b.setup("fit")
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert torch.equal(a.val_set.labels, b.val_set.labels)


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


# --- bad folders and corrupt files ------------------------------------------------------------


@pytest.fixture
def raw_copy(tmp_path, data_dir):
    """A writable copy of the 4 raw MNIST files under tmp_path/MNIST/raw; returns that folder."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW:
        shutil.copyfile(data_dir / "MNIST" / "raw" / name, raw / name)  # copyfile: not read-only
    return raw


def test_a_good_copy_loads(raw_copy):
    images, labels = load_split(raw_copy.parents[1], train=True)
    assert images.shape == (60_000, 1, 28, 28) and labels.shape == (60_000,)


def test_truncated_file_names_the_file_sizes_and_fixes(raw_copy):
    path = raw_copy / "train-images-idx3-ubyte"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(DataError) as err:
        load_split(raw_copy.parents[1], train=True)
    message = str(err.value)
    assert str(path) in message and "truncated" in message
    assert "23520008 bytes" in message and "47040016" in message  # its size and the header's
    assert "data.download=true" in message and "DLAB_DATA_DIR" in message
    load_split(raw_copy.parents[1], train=False)  # the test split does not read that file


def test_bad_magic_is_a_data_error(raw_copy):
    path = raw_copy / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[2] = 0x0D  # a float32 IDX file, not MNIST's uint8
    path.write_bytes(data)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*truncated or corrupt"):
        load_split(raw_copy.parents[1], train=False)


def test_missing_folder_names_the_path_and_both_fixes(tmp_path):
    missing = tmp_path / "no_mnist_here"
    with pytest.raises(DataError) as err:
        MNISTDataModule(data_dir=str(missing), download=False).setup("fit")
    message = str(err.value)
    assert str(missing / "MNIST" / "raw") in message
    assert "DLAB_DATA_DIR" in message and "paths.data_dir" in message and "data.download=true" in message


def test_unknown_dataset_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match="data.dataset='cifar'.*fashion_mnist"):
        load_split(data_dir, train=True, dataset="cifar")
