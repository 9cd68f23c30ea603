"""MNISTDataModule on the real files: batch contract, seeded split, epoch-seeded order, bad folders."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.data.mnist import DataFolderError, MNISTDataModule, load_split


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


def test_missing_folder_names_the_path_and_both_fixes(tmp_path):
    missing = tmp_path / "no_mnist_here"
    with pytest.raises(DataFolderError) as err:
        MNISTDataModule(data_dir=str(missing), download=False).setup("fit")
    message = str(err.value)
    assert str(missing / "MNIST" / "raw") in message
    assert "DLAB_DATA_DIR" in message and "data.download=true" in message


def test_unknown_dataset_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match="data.dataset='cifar'.*fashion_mnist"):
        load_split(data_dir, train=True, dataset="cifar")
