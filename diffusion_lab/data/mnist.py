"""MNIST / Fashion-MNIST as in-memory uint8 tensors, normalised on the fly.

Decoding 60k PIL images per epoch dominates a small diffusion run on CPU, so each split is read once
with torchvision into a single uint8 tensor and batches are sliced from it. The train loader is
resumable mid-epoch (loaders.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data import spatial
from diffusion_lab.data.loaders import (
    RestoresTrainPosition,
    ResumableDataLoader,
    ranks,
    sampled_loader,
)
from diffusion_lab.errors import DataError
from diffusion_lab.utils.images import to_model_range

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
FIX = (
    "Fix it by deleting the file and running with data.download=true on a machine with internet access, "
    "or by pointing DLAB_DATA_DIR (or paths.data_dir=...) at a folder with a good copy."
)


def check_idx_file(path: Path) -> None:
    """Raise DataError unless `path` is a whole IDX file: its size must match its header.

    torchvision only reports a truncated download as a reshape error, which reads like a missing
    dataset. The header is 2 zero bytes, dtype 0x08 (uint8), ndim, then ndim big-endian uint32 dims.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        dims = f.read(4 * magic[3]) if len(magic) == 4 else b""
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or len(dims) < 4 * magic[3]:
        problem = f"does not start with a uint8 IDX header (magic {magic.hex() or 'empty'}, {size} bytes)"
    else:
        shape = [int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4)]
        expected = 4 + len(dims) + math.prod(shape)
        if size == expected:
            return
        problem = f"has {size} bytes but its header (shape {shape}) needs {expected}"
    raise DataError(f"{path} {problem}: it is truncated or corrupt. {FIX}")


def load_split(root: str | Path, train: bool, dataset: str = "mnist", download: bool = False):
    """Read one official split as `(images uint8 (N, 1, 28, 28), labels long (N,))`."""
    if dataset not in DATASETS:
        raise ValueError(f"data.dataset={dataset!r} is not known; expected one of {sorted(DATASETS)}")
    cls = getattr(torchvision.datasets, DATASETS[dataset])
    root = Path(root).expanduser()
    raw = root / DATASETS[dataset] / "raw"
    for kind in ("images-idx3", "labels-idx1"):  # missing files are torchvision's (or download's) job
        path = raw / f"{'train' if train else 't10k'}-{kind}-ubyte"
        if path.is_file():
            check_idx_file(path)
    try:
        ds = cls(root=str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:  # not found, or the download failed (no network)
        why = f"downloading it failed ({err})" if download else "downloading is off"
        raise DataError(
            f"{DATASETS[dataset]} was not found in {raw} (paths.data_dir={str(root)!r}) and {why}. "
            f"Fix it by either pointing DLAB_DATA_DIR (or paths.data_dir=...) at a folder that holds "
            f"{DATASETS[dataset]}/raw/*-ubyte, or turning downloading on with data.download=true "
            "on a machine with internet access."
        ) from err
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


class TensorImageDataset(Dataset):
    """uint8 images held in memory; items are dicts `{"image": [-1, 1] float, "label": long}`, plus
    each spatial condition's map under its source's name when `conditions` (spatial.derive) are set,
    seeded by `sample_seeds(condition_seed, index)`, so an index gets the same map in any batch."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        conditions: Mapping | None = None,
        condition_seed: int = 0,
    ):
        self.images, self.labels = images, labels
        self.conditions, self.condition_seed = spatial.check(conditions), condition_seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices):
        # Batched fetch: one tensor gather (and one batched transform) instead of B item calls.
        indices = torch.as_tensor(indices)
        batch = {"image": to_model_range(self.images[indices]), "label": self.labels[indices]}
        if self.conditions:
            seeds = spatial.sample_seeds(self.condition_seed, indices)
            batch |= spatial.derive(batch["image"], self.conditions, seeds)
        return batch


class MNISTDataModule(RestoresTrainPosition, L.LightningDataModule):
    """Train/val from the official train split (seeded split), test from the official test split.
    `conditions` (source → options) adds spatial condition maps to every batch (data/spatial.py)."""

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "mnist",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        split_seed: int = 0,
        conditions: Mapping | None = None,
        condition_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.conditions = spatial.check(conditions)  # a bad source or option fails here, not in a batch
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        if self.hparams.download:  # once per node, before setup on every rank
            load_split(self.hparams.data_dir, True, self.hparams.dataset, download=True)
            load_split(self.hparams.data_dir, False, self.hparams.dataset, download=True)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        spatial_maps = {"conditions": self.conditions, "condition_seed": hp.condition_seed}
        if self.train_set is None:
            images, labels = load_split(hp.data_dir, True, hp.dataset)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(hp.split_seed))
            val_idx, train_idx = order[: hp.val_size], order[hp.val_size :]
            self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], **spatial_maps)
            self.val_set = TensorImageDataset(images[val_idx], labels[val_idx], **spatial_maps)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = TensorImageDataset(*load_split(hp.data_dir, False, hp.dataset), **spatial_maps)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        world, rank = ranks(self)
        hp = self.hparams
        # Only the train loader needs to resume mid-epoch; val/test always run whole.
        return sampled_loader(
            ResumableDataLoader if shuffle else DataLoader,
            dataset,
            shuffle,
            world,
            rank,
            batch_size=hp.batch_size,
            seed=hp.split_seed,
            workers=hp.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
