"""An image folder of captioned images (Hugging Face's imagefolder convention) as a Dataset.

A folder holds `metadata.jsonl` or `metadata.csv`, read as UTF-8 with a leading byte-order mark
(spreadsheet CSV) dropped. Its `file_name` column names each image relative to that folder; the
caption column holds a string, or in jsonl a list of strings: a random one per training draw (torch's
RNG, so seeded runs repeat), the first for validation. Metadata rows are checked when read; image
bytes when decoded, at once by `load_all` or lazily per item.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from diffusion_lab.data.bad_samples import BadSample, BadSamples
from diffusion_lab.data.decode import caption_list, collate, load_image
from diffusion_lab.errors import ConfigError, DataError

METADATA = ("metadata.jsonl", "metadata.csv")


def find_metadata(folder: str | Path, key: str) -> Path:
    """The metadata file of the imagefolder `folder` (or `folder` itself when it is one); `key` is the
    setting that named it, for the error."""
    path = Path(folder).expanduser()
    found = [path] if path.is_file() else [path / m for m in METADATA if (path / m).is_file()]
    if len(found) != 1:
        problem = "holds both metadata.jsonl and metadata.csv (keep one)" if found else "has no metadata file"
        problem = problem if path.exists() else "does not exist"
        raise DataError(f"{key}={str(folder)!r} {problem}: an imagefolder needs exactly one of {METADATA}.")
    return found[0]


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
    """Rows of an imagefolder; images decoded per access, or once into `images` (uint8) by `load_all`.
    `conditions` (data.conditions) add spatial maps seeded by (condition_seed, row index): decode.collate."""

    def __init__(
        self,
        rows: list[Row],
        size: int,
        channels: int,
        bad: BadSamples,
        train: bool,
        conditions: Mapping | None = None,
        condition_seed: int = 0,
    ):
        self.rows, self.size, self.bad, self.train = rows, size, bad, train
        self.conditions, self.condition_seed = conditions, condition_seed
        self.mode = "L" if channels == 1 else "RGB"
        self.images: torch.Tensor | None = None  # (N, C, size, size) once loaded
        self._known_bad: set[int] = set()  # per process: indices not worth decoding again

    def subset(self, index, train: bool) -> CaptionedImages:
        index = torch.as_tensor(index, dtype=torch.long)
        rows = [self.rows[i] for i in index]
        part = CaptionedImages(
            rows, self.size, len(self.mode), self.bad, train, self.conditions, self.condition_seed
        )
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
            return {"image": image, "caption": row.captions[pick], "_id": i, "_bad": skipped}
        raise DataError(f"none of the {len(self)} images from {self.rows[0].name} on is readable.")

    def __getitem__(self, index: int) -> dict:
        batch = collate([self._item(index)], self.conditions, self.condition_seed)
        return {key: value[0] for key, value in batch.items() if key != "_bad"}

    def __getitems__(self, indices) -> dict:  # the DataLoader's batched fetch
        return collate([self._item(i) for i in indices], self.conditions, self.condition_seed)
