"""MNISTDataModule on the real files: batch contract, seeded split, bad folders and corrupt files
(its epoch-seeded order and mid-epoch resume: test_loaders.py)."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from diffusion_lab.data import spatial
from diffusion_lab.data.mnist import MNISTDataModule, load_split
from diffusion_lab.errors import ConfigError, DataError

RAW = [f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


def test_batches_follow_the_contract(data_dir):
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=32, val_size=1000)
    dm.setup("fit")
    assert len(dm.train_set) == 59_000 and len(dm.val_set) == 1000
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].min() == -1
    assert batch["label"].dtype == torch.long and batch["label"].shape == (32,)
    assert batch.keys() == {"image", "label"}  # no data.conditions: no condition maps
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


def test_condition_maps_are_derived_per_batch_and_seeded_by_index(data_dir):
    conditions = {"sketch": {}, "inpaint": {"masks": ["box", "free_form"]}}
    dm = MNISTDataModule(
        data_dir=str(data_dir), batch_size=8, val_size=100, conditions=conditions, condition_seed=3
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    indices = torch.tensor(list(itertools.islice(iter(loader.sampler), 8)))  # the same epoch-0 order
    expected = spatial.derive(batch["image"], conditions, spatial.sample_seeds(3, indices))
    assert batch.keys() == {"image", "label", "sketch", "inpaint"}
    assert all(torch.equal(batch[name], expected[name]) for name in conditions)
    # An index has the same maps alone (__getitem__), in another batch, and at validation time.
    assert torch.equal(dm.train_set[int(indices[5])]["inpaint"], batch["inpaint"][5])
    assert torch.equal(dm.train_set.__getitems__([0, int(indices[5])])["inpaint"][1], batch["inpaint"][5])
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(
        val["inpaint"], spatial.inpaint(val["image"], spatial.sample_seeds(3, torch.arange(8)))
    )
    with pytest.raises(ConfigError, match=r"data\.conditions\.skecth: .*'sketch'"):
        MNISTDataModule(data_dir=str(data_dir), conditions={"skecth": {}})


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
