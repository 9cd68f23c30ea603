"""Captioned images for text conditioning: batches `{"image": (B, C, H, W) in [-1, 1], "caption": [str]}`.

`data=captions data.root=...` reads one of two formats (`data.format`, default `auto`):
- imagefolder (Hugging Face's convention): a folder with `metadata.jsonl` or `metadata.csv` whose
  `file_name` column names each image relative to that folder and whose caption column
  (`data.caption_column`) holds a string, or in jsonl a list of strings: a random one per training
  draw (torch's RNG, so seeded runs repeat), the first for validation; see image_folder.py.
- webdataset: tar shards as img2dataset writes them (jpg/png/webp + txt); see webdataset_shards.py.
`auto` picks imagefolder for a metadata file or a folder that holds one, or whose `train/` does (then
`val/` or `validation/` beside it is the default val_root: dlab-make-captions' layout); webdataset
for a brace pattern, a .tar path or a folder of .tar files; any other file is a DataError. Images
are converted to PIL `L`/`RGB` (data.channels), resized on the shorter side and centre-cropped to
data.image_size. Metadata is read as UTF-8, a leading byte-order mark (spreadsheet CSV) dropped.

`data.conditions` adds spatial condition maps to each batch as it is collated (decode.collate, data/
spatial.py), seeded by data.condition_seed and each image's index (imagefolder) or key (webdataset).

Validation is data.val_root when set; otherwise a seeded holdout of data.val_size rows (imagefolder)
or the first shard (webdataset).

Bad samples (data.on_bad_sample, bad_samples.py): `raise` stops with a DataError naming the file (and
metadata line); `skip` leaves the sample out, logs a summary per pass and writes
`<run folder>/bad_samples.txt`. Metadata rows (missing file, missing/empty caption or one that is not
text, unparsable line) are checked eagerly at setup, so both policies act before training. Image bytes
are checked when decoded: at setup when the folder is held in memory (data.in_memory; `auto` below 100k
images and 1 GiB), else lazily in the loader, where `skip` replaces a bad image with the next good
index. A caption column that no row has is a ConfigError at setup under both policies.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from diffusion_lab.data import spatial, webdataset_shards
from diffusion_lab.data.bad_samples import BadSamples, EvalLoader, TrainLoader
from diffusion_lab.data.image_folder import METADATA, CaptionedImages, find_metadata, read_rows
from diffusion_lab.data.loaders import RestoresTrainPosition, ranks, sampled_loader
from diffusion_lab.data.webdataset_shards import shard_pattern
from diffusion_lab.errors import ConfigError, DataError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what tarfile (so webdataset) reads as a shard
IN_MEMORY_MAX = (100_000, 2**30)  # data.in_memory=auto: at most this many images and decoded bytes


def detect_format(root: str) -> str:
    """`imagefolder` or `webdataset` from what data.root points at (see the module docstring)."""
    path = Path(root).expanduser()
    if path.is_file():
        if path.name in METADATA:
            return "imagefolder"
        if path.name.endswith(SHARD_SUFFIXES):
            return "webdataset"
        raise DataError(
            f"data.root={root!r} is a file but neither {' nor '.join(METADATA)} nor a .tar shard. Point "
            "data.root at a folder (an imagefolder with a metadata file, or .tar shards), at its metadata "
            f"file, or at shards: {shard_pattern('data.root')}."
        )
    if path.is_dir():
        if any((path / m).is_file() or (path / "train" / m).is_file() for m in METADATA):
            return "imagefolder"
        if any(path.glob("*.tar")):
            return "webdataset"
        raise DataError(
            f"data.root={root!r} holds neither {' nor '.join(METADATA)} (an imagefolder) nor .tar shards "
            f"(a webdataset). Point data.root at such a folder, or at shards: {shard_pattern('data.root')}."
        )
    if "{" in root or root.endswith(".tar") or "://" in root or root.startswith("pipe:"):
        return "webdataset"
    raise DataError(
        f"data.root={root!r} does not exist. Point data.root at an imagefolder or a .tar shard pattern."
    )


class CaptionedImageDataModule(RestoresTrainPosition, L.LightningDataModule):
    """Captioned images from an imagefolder or webdataset shards; the keys are explained in
    conf/data/captions.yaml. `bad_samples` lists what data.on_bad_sample=skip left out."""

    def __init__(
        self,
        root: str | None = None,
        val_root: str | None = None,
        format: str = "auto",
        caption_column: str = "text",
        image_size: int = 28,
        channels: int = 1,
        batch_size: int = 128,
        val_size: int = 1000,
        num_workers: int = 2,
        split_seed: int = 0,
        on_bad_sample: str = "raise",
        in_memory: bool | str = "auto",
        num_samples: int | None = None,
        shuffle_buffer: int = 1000,
        conditions: Mapping | None = None,
        condition_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.conditions = spatial.check(conditions)  # a bad source or option fails here, not in a batch
        expected = {
            "root": (bool(root), "an imagefolder or shards: data.root=<dir> (dlab-make-captions writes one)"),
            "format": (format in ("auto", "imagefolder", "webdataset"), "auto, imagefolder or webdataset"),
            "channels": (channels in (1, 3), "1 (grey, PIL 'L') or 3 (PIL 'RGB')"),
            "image_size": (image_size > 0, "a side length in pixels"),
            "batch_size": (batch_size > 0, "a positive global batch size"),
            "val_size": (val_size >= 0, "a number of rows to hold out (0: no validation)"),
            "on_bad_sample": (on_bad_sample in ("raise", "skip"), "raise or skip"),
            "in_memory": (in_memory in ("auto", True, False), "auto, true or false"),
        }
        for key, (ok, what) in expected.items():
            if not ok:
                raise ConfigError(f"data.{key}={self.hparams[key]!r} cannot work: expected {what}.")
        self.bad = BadSamples(on_bad_sample)
        self.format = self.train_set = self.val_set = None

    @property
    def bad_samples(self) -> list[str]:
        return [f"{name}: {reason}" for name, reason in self.bad.entries.items()]

    def setup(self, stage: str | None = None) -> None:
        if self.format is not None:  # fit, then test: read once
            return
        hp = self.hparams
        if self.trainer is not None:
            self.bad.root, self.bad.rank = self.trainer.default_root_dir, self.trainer.global_rank
        self.format = detect_format(str(hp.root)) if hp.format == "auto" else hp.format
        if self.format == "webdataset":
            self.train_set, self.val_set = webdataset_shards.setup(hp, self.bad)
        else:
            self._setup_imagefolder()
        self.bad.eager = len(self.bad.entries)
        self.bad.report("at setup")

    def _read(self, folder, key: str, train: bool) -> CaptionedImages:
        hp = self.hparams
        rows = read_rows(find_metadata(folder, key), hp.caption_column, self.bad)
        data = CaptionedImages(
            rows, hp.image_size, hp.channels, self.bad, train, self.conditions, hp.condition_seed
        )
        n, size = len(rows), len(rows) * hp.channels * hp.image_size**2  # images, decoded bytes
        small = n <= IN_MEMORY_MAX[0] and size <= IN_MEMORY_MAX[1]
        return data.load_all() if hp.in_memory is True or (hp.in_memory == "auto" and small) else data

    def _setup_imagefolder(self) -> None:
        hp = self.hparams
        root, val_root = Path(hp.root).expanduser(), hp.val_root
        if root.is_dir() and not any((root / m).is_file() for m in METADATA):  # <out>/{train,val}/
            splits = [root / v for v in ("val", "validation") if (root / v).is_dir()]
            root, val_root = root / "train", val_root or (splits[0] if splits else None)
        data = self._read(root, "data.root", train=True)
        if val_root is not None:
            self.train_set, self.val_set = data, self._read(val_root, "data.val_root", train=False)
        elif hp.val_size > 0:
            if hp.val_size >= len(data):
                raise ConfigError(
                    f"data.val_size={hp.val_size} leaves nothing to train on: {root} has {len(data)} usable "
                    "images. Lower data.val_size or set data.val_root."
                )
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(hp.split_seed))
            self.train_set = data.subset(order[hp.val_size :], train=True)
            self.val_set = data.subset(order[: hp.val_size], train=False)
        else:
            self.train_set = data

    def _loader(self, dataset, train: bool) -> DataLoader:
        world, rank = ranks(self)
        hp = self.hparams
        if self.format == "webdataset":
            return webdataset_shards.loader(dataset, train, world, rank, hp)
        # Images held in memory are sliced in the main process: workers would only add pickling.
        workers = 0 if dataset.images is not None else hp.num_workers
        return sampled_loader(
            TrainLoader if train else EvalLoader,
            dataset,
            train,
            world,
            rank,
            batch_size=hp.batch_size,
            seed=hp.split_seed,
            workers=workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()  # captioned folders have no official test split
