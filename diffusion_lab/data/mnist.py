"""MNIST / Fashion-MNIST as in-memory uint8 tensors, normalised on the fly.

Decoding 60k PIL images per epoch dominates a small diffusion run on CPU, so each split is read once
with torchvision into a single uint8 tensor and batches are sliced from it. The train loader is
resumable: a checkpoint saved mid-epoch records how many batches were handed out, and the resumed
run continues with the next batch of the same epoch order.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from diffusion_lab.errors import ConfigError, DataError
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
    import torchvision

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
    """uint8 images held in memory; items are dicts `{"image": [-1, 1] float, "label": long}`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": to_model_range(self.images[index]), "label": self.labels[index]}

    def __getitems__(self, indices):
        # Batched fetch: one tensor gather instead of B python-level item calls.
        return self[torch.as_tensor(indices)]


def _identity_collate(batch):
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


class MNISTDataModule(RestoresTrainPosition, L.LightningDataModule):
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
        world, rank = ranks(self)
        # A DistributedSampler even on one process: its shuffle is seeded by (seed, epoch), so a
        # resumed run sees exactly the order an uninterrupted one would (Lightning calls set_epoch).
        sampler = ResumableSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            shuffle=shuffle,
            seed=self.hparams.split_seed,
            drop_last=shuffle,
        )
        # Only the train loader needs to resume mid-epoch; val/test always run whole.
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.hparams.batch_size // world,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=_identity_collate,
            drop_last=shuffle,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
