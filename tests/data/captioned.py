"""Small captioned image folders and webdataset shards that the data tests build, and the
CaptionedImageDataModule calls they share."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import webdataset as wds
from PIL import Image

from diffusion_lab.data.captions import CaptionedImageDataModule

COLOUR = (200, 40, 40)  # the picture's centre; PIL "L" makes it round(0.299 R + 0.587 G + 0.114 B) = 88


def png(width=64, height=32) -> bytes:
    """A wide picture: black 8-pixel side bands and a black 2-pixel top band around COLOUR. A centre
    crop of the shorter-side resize keeps the top band and drops the side bands."""
    img = Image.new("RGB", (width, height), COLOUR)
    for box in ((0, 0, 8, height), (width - 8, 0, width, height), (0, 0, width, 2)):
        img.paste((0, 0, 0), box)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_folder(folder: Path, n=20, extra_rows=(), fmt="jsonl") -> Path:
    """n good images with captions "good <i>", plus `extra_rows` (dicts, or raw lines) at the end."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        (folder / f"img/{i:02d}.png").write_bytes(png())
        rows.append({"file_name": f"img/{i:02d}.png", "text": f"good {i}", "label": i % 10})
    rows += list(extra_rows)
    if fmt == "csv":
        lines = ["file_name,text,label"] + [
            f"{r['file_name']},{r.get('text', '')},{r.get('label', '')}" for r in rows
        ]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    else:
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def fake_trainer(root: Path, world=1, rank=0):
    """What the DataModule reads from a Lightning trainer."""
    return SimpleNamespace(world_size=world, global_rank=rank, default_root_dir=str(root))


def module(root, trainer=None, **kw) -> CaptionedImageDataModule:
    kw = {"batch_size": 4, "num_workers": 0, "val_size": 4, **kw}
    dm = CaptionedImageDataModule(root=str(root), **kw)
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def drain(dm) -> list[str]:
    """The captions of one whole pass over the val and train loaders."""
    loaders = [dm.val_dataloader(), dm.train_dataloader()]
    try:
        return [c for loader in loaders for batch in loader for c in batch["caption"]]
    finally:
        stop_workers(*loaders)


def stop_workers(*loaders) -> None:
    """Stop persistent loader workers now, as Lightning does at teardown: a loader that is left to the
    garbage collector (e.g. held by an exception's traceback) waits 5 s per worker on shutdown."""
    for loader in loaders:
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()


def append_rows(folder: Path, rows) -> None:
    with (folder / "metadata.jsonl").open("a") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_shards(folder: Path, sizes, prefix="s", bad=()) -> list[str]:
    """img2dataset-style shards; sample keys are "<shard><index>", captions "cap <key>"."""
    folder.mkdir(parents=True)
    for s, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"{prefix}{s:04d}.tar")) as tar:
            for i in range(size):
                key = f"{prefix}{s}{i:03d}"
                tar.write({"__key__": key, "png": png(), "txt": f"cap {key}", "json": {"key": key}})
            for sample in bad if s == 0 else ():
                tar.write(sample)
    return sorted(str(p) for p in folder.glob("*.tar"))


def rank_pass(root, val_root, rank, world, **kw):
    """(train batches, train captions, val captions) of one rank of `world`, with 2 loader workers."""
    kw = {"batch_size": 4, "num_workers": 2, **kw}
    dm = CaptionedImageDataModule(root=root, val_root=val_root, **kw)
    dm.trainer = fake_trainer("/nonexistent", world, rank)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    batches = list(train)
    assert len(batches) == len(train) and all(len(b["caption"]) == 4 // world for b in batches)
    result = len(batches), [c for b in batches for c in b["caption"]], [c for b in val for c in b["caption"]]
    stop_workers(train, val)
    return result
