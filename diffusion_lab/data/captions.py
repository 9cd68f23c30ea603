"""Captioned images for text conditioning: batches `{"image": (B, C, H, W) in [-1, 1], "caption": [str]}`.

`data=captions data.root=...` reads one of two formats (`data.format`, default `auto`):
- imagefolder (Hugging Face's convention): a folder with `metadata.jsonl` or `metadata.csv` whose
  `file_name` column names each image relative to that folder and whose caption column
  (`data.caption_column`) holds a string, or in jsonl a list of strings: a random one per training
  draw (torch's RNG, so seeded runs repeat), the first for validation.
- webdataset: tar shards as img2dataset writes them (jpg/png/webp + txt); see webdataset_shards.py.
`auto` picks imagefolder for a metadata file or a folder that holds one, or whose `train/` does (then
`val/` or `validation/` beside it is the default val_root: dlab-make-captions' layout); webdataset
for a brace pattern, a .tar path or a folder of .tar files; any other file is a DataError. Images
are converted to PIL `L`/`RGB` (data.channels), resized on the shorter side and centre-cropped to
data.image_size. Metadata is read as UTF-8, a leading byte-order mark (spreadsheet CSV) dropped.

Validation is data.val_root when set; otherwise a seeded holdout of data.val_size rows (imagefolder)
or the first shard (webdataset).

Bad samples (data.on_bad_sample): `raise` stops with a DataError naming the file (and metadata line);
`skip` leaves the sample out, logs a summary per pass and writes `<run folder>/bad_samples.txt`.
Metadata rows (missing file, missing/empty caption or one that is not text, unparsable line) are
checked eagerly at setup, so both policies act before training. Image bytes are checked when decoded: at setup when the folder is
held in memory (data.in_memory; `auto` below 100k images and 1 GiB), else lazily in the loader, where
`skip` replaces a bad image with the next good index. A caption column that no row has is a
ConfigError at setup under both policies.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data.mnist import (
    RestoresTrainPosition,
    ResumableDataLoader,
    ResumableSampler,
    _identity_collate,
    ranks,
)
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.utils.images import to_model_range

log = logging.getLogger("diffusion_lab")
METADATA = ("metadata.jsonl", "metadata.csv")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what tarfile (so webdataset) reads as a shard
IN_MEMORY_MAX = (100_000, 2**30)  # data.in_memory=auto: at most this many images and decoded bytes
JSON_TYPES = {int: "a number", float: "a number", bool: "true/false", dict: "an object"}
SKIP_HINT = "Fix or remove it, or set data.on_bad_sample=skip to leave bad samples out."


# --- samples ------------------------------------------------------------------------------------


class BadSample(Exception):
    """One sample that cannot be used; the message says why (it follows the sample's name)."""


def load_image(src, size: int, mode: str) -> torch.Tensor:
    """A path or file object → uint8 (C, size, size): shorter side resized, centre-cropped."""
    try:
        with Image.open(src) as img:
            img = ImageOps.fit(img.convert(mode), (size, size), Image.Resampling.BICUBIC)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSample(f"is not a readable image ({type(err).__name__}: {err})") from None
    return torch.from_numpy(np.array(img)).view(size, size, -1).permute(2, 0, 1)


def caption_list(value) -> list[str]:
    """A caption cell as a non-empty list of non-empty strings."""
    items = value if isinstance(value, list) else [value]
    not_text = next((c for c in items if c is not None and not isinstance(c, str)), None)
    if not_text is not None:
        kind = "a list" if isinstance(not_text, list) else JSON_TYPES.get(type(not_text), "not a string")
        raise BadSample(
            f"has a caption that is not text ({json.dumps(not_text)} is {kind}): a caption is a string in "
            "quotes, or a list of them"
        )
    if not items or not all(isinstance(c, str) and c.strip() for c in items):
        raise BadSample(f"has an empty or missing caption ({json.dumps(value)})")
    return [c.strip() for c in items]


def collate(items: list[dict]) -> dict:
    """Items `{"image": uint8 (C, H, W), "caption": str}` → a batch; skipped samples ride in `_bad`."""
    batch = {"image": to_model_range(torch.stack([i["image"] for i in items])), "caption": []}
    for item in items:
        batch["caption"].append(item["caption"])
        batch.setdefault("_bad", []).extend(item.get("_bad", ()))
    return batch


class BadSamples:
    """The bad samples met so far (name → reason), shared by a DataModule's datasets.

    Workers find bad images in their own processes, so they send them along with the batch and the
    loader adds them here, in the main process. Rank 0 writes `bad_samples.txt`; another rank writes
    `bad_samples.rank<r>.txt` only for the lazily found ones that may differ between ranks.
    """

    def __init__(self, policy: str):
        self.policy, self.entries, self.root, self.rank = policy, {}, None, 0
        self.eager = self.reported = 0  # how many were found at setup, and at the last report

    def fail(self, name: str, err: BadSample) -> None:
        if self.policy == "raise":
            raise DataError(f"{name} {err}. {SKIP_HINT}")
        self.entries.setdefault(name, str(err))

    def report(self, when: str, again: bool = True) -> None:
        """Log a summary and rewrite the list: on rank 0 (others: only lazily found ones), and unless
        `again`, only when something new was found since the last report."""
        if not self.entries or (self.rank and len(self.entries) == self.eager):
            return
        if not again and len(self.entries) == self.reported:
            return
        self.reported = len(self.entries)
        names = ", ".join(itertools.islice(self.entries, 5)) + (", ..." if len(self.entries) > 5 else "")
        path = None
        if self.root is not None:
            path = Path(self.root) / (
                "bad_samples.txt" if not self.rank else f"bad_samples.rank{self.rank}.txt"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{k}: {v}\n" for k, v in self.entries.items()))
        log.warning(
            "data.on_bad_sample=skip: %d bad sample(s) left out (%s): %s%s",
            len(self.entries), when, names, f"; all listed in {path}" if path else "",
        )  # fmt: skip


# --- imagefolder --------------------------------------------------------------------------------


def read_metadata(meta: Path) -> tuple[list[str], list[tuple[int, dict | BadSample]]]:
    """(columns, [(line number, row or the reason it cannot be read)]) of a metadata.jsonl/.csv."""
    try:
        if meta.suffix == ".csv":
            # utf-8-sig: spreadsheet programs start their CSV with a byte-order mark, which is no column name.
            with meta.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows = [(reader.line_num, row) for row in reader]  # line_num: the row's (last) line
            return list(reader.fieldnames or []), rows
        columns, rows = {}, []
        for n, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    row = BadSample(f"is not valid JSON ({err.msg})")
                if not isinstance(row, dict | BadSample):
                    row = BadSample("is not a JSON object")
                columns.update(dict.fromkeys(row if isinstance(row, dict) else ()))
                rows.append((n, row))
        return list(columns), rows
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{meta} cannot be parsed ({err}); write it as UTF-8 JSON lines or CSV.") from None


class Row(NamedTuple):
    path: Path
    captions: list[str]
    name: str  # how messages and bad_samples.txt name it: "<image path> (metadata.jsonl:<line>)"


def read_rows(meta: Path, caption_column: str, bad: BadSamples) -> list[Row]:
    """The usable rows of a metadata file; bad ones fail or are left out here, at setup."""
    columns, lines = read_metadata(meta)
    for column in ("file_name", caption_column):
        if column not in columns:
            fix = "Set data.caption_column to the one that holds the captions."
            if column == "file_name":
                fix = "The imagefolder convention names each image, relative to this folder, in file_name."
            raise ConfigError(f"{meta} has no {column!r} column; its columns are {columns}. {fix}")
    rows = []
    for line, row in lines:
        name = f"{meta}:{line}"
        try:
            if isinstance(row, BadSample):
                raise row
            if not isinstance(row.get("file_name"), str) or not row["file_name"].strip():
                raise BadSample("has no file_name")
            path = meta.parent / row["file_name"]
            name = f"{path} ({meta.name}:{line})"
            if not path.is_file():
                raise BadSample("is missing: the metadata names it but there is no such file")
            if caption_column not in row:
                raise BadSample(f"has no {caption_column!r} caption")
            rows.append(Row(path, caption_list(row[caption_column]), name))
        except BadSample as err:
            bad.fail(name, err)
    return rows


class CaptionedImages(Dataset):
    """Rows of an imagefolder; images decoded per access, or once into `images` (uint8) by `load_all`."""

    def __init__(self, rows: list[Row], size: int, channels: int, bad: BadSamples, train: bool):
        self.rows, self.size, self.bad, self.train = rows, size, bad, train
        self.mode = "L" if channels == 1 else "RGB"
        self.images: torch.Tensor | None = None  # (N, C, size, size) once loaded
        self._known_bad: set[int] = set()  # per process: indices not worth decoding again

    def subset(self, index, train: bool) -> CaptionedImages:
        index = torch.as_tensor(index, dtype=torch.long)
        part = CaptionedImages([self.rows[i] for i in index], self.size, len(self.mode), self.bad, train)
        part.images = None if self.images is None else self.images[index]
        return part

    def load_all(self) -> CaptionedImages:
        """Decode every image now (a bad one fails or is left out here) into one uint8 tensor."""
        images, good = torch.empty(len(self), len(self.mode), self.size, self.size, dtype=torch.uint8), []
        for i, row in enumerate(self.rows):
            try:
                images[len(good)] = load_image(row.path, self.size, self.mode)
                good.append(i)
            except BadSample as err:
                self.bad.fail(row.name, err)
        part = self.subset(good, self.train)
        part.images = images[: len(good)]
        return part

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, index: int) -> dict:
        """Image and caption of `index`, or under skip of the next good index (the bad ones in `_bad`)."""
        skipped = []
        for i in itertools.chain(range(index, len(self)), range(index)):
            if i in self._known_bad:
                continue
            row = self.rows[i]
            try:
                image = (
                    self.images[i] if self.images is not None else load_image(row.path, self.size, self.mode)
                )
            except BadSample as err:
                self.bad.fail(row.name, err)  # raises under data.on_bad_sample=raise
                self._known_bad.add(i)
                skipped.append((row.name, str(err)))
                continue
            # A random caption per training draw, from torch's RNG (seeded runs, and per loader worker).
            pick = int(torch.randint(len(row.captions), ())) if self.train else 0
            return {"image": image, "caption": row.captions[pick], "_bad": skipped}
        raise DataError(f"none of the {len(self)} images from {self.rows[0].name} on is readable.")

    def __getitem__(self, index: int) -> dict:
        item = collate([self._item(index)])
        return {"image": item["image"][0], "caption": item["caption"][0]}

    def __getitems__(self, indices) -> dict:  # the DataLoader's batched fetch
        return collate([self._item(i) for i in indices])


# --- loaders ------------------------------------------------------------------------------------


class _Reporting:
    """Loader mixin: take the skipped samples out of each batch into the main process's `BadSamples`,
    summarise them after each pass, and turn a worker's wrapped DataError back into its one line."""

    def __iter__(self):
        bad = self.dataset.bad
        try:
            for batch in super().__iter__():
                for name, reason in batch.pop("_bad"):
                    bad.entries.setdefault(name, reason)
                yield batch
        except DataError as err:
            raise DataError(str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        finally:  # also when Lightning stops early (limit_train_batches) and drops the iterator
            train = getattr(self.dataset, "train", False)
            bad.report("after a train pass" if train else "after a val pass", again=train)


class TrainLoader(_Reporting, ResumableDataLoader):
    """The imagefolder train loader: resumable mid-epoch (see mnist.py)."""


class EvalLoader(_Reporting, DataLoader):
    """Validation loaders, and the webdataset train loader (a stream: nothing to resume)."""


# --- DataModule ---------------------------------------------------------------------------------


def shard_pattern(key: str) -> str:
    """A shard pattern as typed in a shell: Hydra's override parser reads braces itself, so the value
    needs quotes that reach it, inside quotes for the shell."""
    return f""""{key}='<dir>/{{00000..00009}}.tar'" (both quotes)"""


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


def find_metadata(folder: str | Path, key: str) -> Path:
    path = Path(folder).expanduser()
    found = [path] if path.is_file() else [path / m for m in METADATA if (path / m).is_file()]
    if len(found) != 1:
        problem = "holds both metadata.jsonl and metadata.csv (keep one)" if found else "has no metadata file"
        problem = problem if path.exists() else "does not exist"
        raise DataError(f"{key}={str(folder)!r} {problem}: an imagefolder needs exactly one of {METADATA}.")
    return found[0]


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
    ):
        super().__init__()
        self.save_hyperparameters()
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
            from diffusion_lab.data import webdataset_shards  # imports webdataset only when used

            self.train_set, self.val_set = webdataset_shards.setup(hp, self.bad)
        else:
            self._setup_imagefolder()
        self.bad.eager = len(self.bad.entries)
        self.bad.report("at setup")

    def _read(self, folder, key: str, train: bool) -> CaptionedImages:
        hp = self.hparams
        rows = read_rows(find_metadata(folder, key), hp.caption_column, self.bad)
        data = CaptionedImages(rows, hp.image_size, hp.channels, self.bad, train)
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
        if self.format == "webdataset":
            from diffusion_lab.data import webdataset_shards

            return webdataset_shards.loader(dataset, train, world, rank, self.hparams)
        # Images held in memory are sliced in the main process: workers would only add pickling.
        workers = 0 if dataset.images is not None else self.hparams.num_workers
        # As in MNISTDataModule: seeded by (seed, epoch) even on one process, so a resume repeats the order.
        sampler = ResumableSampler(
            dataset, world, rank, shuffle=train, seed=self.hparams.split_seed, drop_last=train
        )
        return (TrainLoader if train else EvalLoader)(
            dataset,
            batch_size=self.hparams.batch_size // world,
            sampler=sampler,
            num_workers=workers,
            collate_fn=_identity_collate,
            drop_last=train,
            persistent_workers=workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()  # captioned folders have no official test split
