"""MNIST / Fashion-MNIST as in-memory uint8 tensors, normalised on the fly.

Decoding 60k PIL images per epoch dominates a small diffusion run on CPU, so each split is read once
with torchvision into a single uint8 tensor and batches are sliced from it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


class DataFolderError(FileNotFoundError):
    """The data folder does not hold the dataset and downloading is off."""


def load_split(root: str | Path, train: bool, dataset: str = "mnist", download: bool = False):
    """Read one official split as `(images uint8 (N, 1, 28, 28), labels long (N,))`."""
    import torchvision

    if dataset not in DATASETS:
        raise ValueError(f"data.dataset={dataset!r} is not known; expected one of {sorted(DATASETS)}")
    cls = getattr(torchvision.datasets, DATASETS[dataset])
    root = Path(root).expanduser()
    try:
        ds = cls(root=str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:  # not found, or the download failed (no network)
        raw = root / DATASETS[dataset] / "raw"
        why = f"downloading it failed ({err})" if download else "downloading is off"
        raise DataFolderError(
            f"{DATASETS[dataset]} was not found in {raw} (paths.data_dir={str(root)!r}) and {why}. "
            f"Fix it by either pointing DLAB_DATA_DIR (or paths.data_dir=...) at a folder that holds "
            f"{DATASETS[dataset]}/raw/*-ubyte, or turning downloading on with data.download=true "
            "on a machine with internet access."
        ) from err
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


class TensorImageDataset(Dataset):
    """uint8 images held in memory; items are dicts `{"image": [-1, 1] float, "label": long}`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index].float().div(127.5).sub(1.0), "label": self.labels[index]}

    def __getitems__(self, indices):
        # Batched fetch: one tensor gather instead of B python-level item calls.
        return self[torch.as_tensor(indices)]


def _identity_collate(batch):
    return batch


class MNISTDataModule(L.LightningDataModule):
    """Train/val from the official train split (seeded split), test from the official test split."""

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "mnist",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        split_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        if self.hparams.download:  # once per node, before setup on every rank
            load_split(self.hparams.data_dir, True, self.hparams.dataset, download=True)
            load_split(self.hparams.data_dir, False, self.hparams.dataset, download=True)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_set is None:
            images, labels = load_split(hp.data_dir, True, hp.dataset)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(hp.split_seed))
            val_idx, train_idx = order[: hp.val_size], order[hp.val_size :]
            self.train_set = TensorImageDataset(images[train_idx], labels[train_idx])
            self.val_set = TensorImageDataset(images[val_idx], labels[val_idx])
        if stage in (None, "test") and self.test_set is None:
            self.test_set = TensorImageDataset(*load_split(hp.data_dir, False, hp.dataset))

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if self.hparams.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.hparams.batch_size} is the global batch and must divide evenly "
                f"over {world} processes; pick a multiple of {world}."
            )
        # A DistributedSampler even on one process: its shuffle is seeded by (seed, epoch), so a
        # resumed run sees exactly the order an uninterrupted one would (Lightning calls set_epoch).
        sampler = DistributedSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            shuffle=shuffle,
            seed=self.hparams.split_seed,
            drop_last=shuffle,
        )
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size // world,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=_identity_collate,
            drop_last=shuffle,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
