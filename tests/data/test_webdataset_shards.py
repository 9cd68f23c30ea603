"""WebDataset shards (webdataset_shards.py) through CaptionedImageDataModule: shards split over
2 ranks x 2 workers (simulated, and one real 2-process DDP run), bad samples under raise and skip,
and shards cut short."""

from __future__ import annotations

import io
import json
import re
import tarfile
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from diffusion_lab.data.captions import CaptionedImageDataModule
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import DataError
from tests.conftest import DATA_DIR, run_cli
from tests.data.captioned import drain, fake_trainer, make_shards, module, png, rank_pass


def test_webdataset_ranks_get_disjoint_shards_and_equal_batch_counts(tmp_path):
    root = tmp_path / "train"
    make_shards(root, [10, 10, 10, 7])  # uneven: rank 1 pads by repeating its short shard
    make_shards(tmp_path / "val", [5], prefix="v")
    (n0, caps0, val0), (n1, caps1, val1) = [rank_pass(str(root), str(tmp_path / "val"), r, 2) for r in (0, 1)]
    assert n0 == n1 == 10  # 37 // 4 = 9 batches a rank, rounded up to whole workers
    assert not set(caps0) & set(caps1) and len(set(caps0) | set(caps1)) == 37
    assert len(caps0) == len(set(caps0)) == 20  # rank 0's two shards hold 20 samples: no repeats
    # Validation: each rank keeps its own share of the one shard (padded by repeats to equal batches).
    assert len(val0) == len(val1) and not set(val0) & set(val1)
    assert set(val0) | set(val1) == {f"cap v0{i:03d}" for i in range(5)}


class Recorder(L.LightningModule):
    """Trains one weight on the batches and writes down the captions each rank saw."""

    def __init__(self, out: Path):
        super().__init__()
        self.weight, self.out, self.seen = torch.nn.Parameter(torch.zeros(())), out, {"train": [], "val": []}

    def training_step(self, batch, _):
        self.seen["train"] += batch["caption"]
        return (batch["image"].mean() - self.weight) ** 2  # DDP all-reduces its gradient every step

    def validation_step(self, batch, _):
        self.seen["val"] += batch["caption"]
        self.log("val/mean", batch["image"].mean(), sync_dist=True)

    def on_fit_end(self):
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_webdataset_under_real_ddp_on_two_cpu_processes(tmp_path):
    """A 2-process gloo run (forked, so it starts in seconds): a rank with fewer batches would hang
    the gradient all-reduce, which the short timeout turns into a failure."""
    make_shards(tmp_path / "train", [6, 6, 6, 5])
    make_shards(tmp_path / "val", [5], prefix="v")
    dm = CaptionedImageDataModule(
        root=str(tmp_path / "train"), val_root=str(tmp_path / "val"), batch_size=4, num_workers=2
    )
    ddp = DDPStrategy(start_method="fork", timeout=timedelta(seconds=60))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ddp,
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Recorder(tmp_path), datamodule=dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    train = [s["train"] for s in seen]
    assert len(train[0]) == len(train[1]) == 2 * 12  # 23 // 4 = 5 batches, rounded up to 2 workers x 3
    assert not set(train[0]) & set(train[1]) and len(set(train[0]) | set(train[1])) == 23
    assert len(seen[0]["val"]) == len(seen[1]["val"])


def test_webdataset_bad_samples_raise_or_are_skipped(tmp_path):
    bad = [
        {"__key__": "broken", "png": b"not a png", "txt": "cap broken"},
        {"__key__": "empty", "png": png(), "txt": " "},
        {"__key__": "notxt", "png": png()},  # eager: found in the tar listing
        {"__key__": "noimage", "txt": "cap noimage"},
    ]
    shards = make_shards(tmp_path / "s", [8, 8], bad=bad)
    with pytest.raises(DataError, match=r"s0000.tar:notxt has no txt caption"):
        module(str(tmp_path / "s"), val_root=shards[1])
    dm = module(str(tmp_path / "s"), fake_trainer(tmp_path / "run"), val_root=shards[1], on_bad_sample="skip")
    assert dm.format == "webdataset"
    captions = drain(dm)
    assert captions and all(c.startswith("cap s") for c in captions)
    assert sorted(b.split(": ")[0].rsplit(":", 1)[1] for b in dm.bad_samples) == [
        "broken",
        "empty",
        "noimage",
        "notxt",
    ]
    assert len((tmp_path / "run" / "bad_samples.txt").read_text().splitlines()) == 4
    # lazily found (when decoded) under raise
    lazy = make_shards(tmp_path / "lazy", [8], bad=bad[:1])
    with pytest.raises(DataError, match=r"lazy/s0000.tar:broken is not a readable image"):
        drain(module(lazy[0], val_root=shards[1]))


# --- truncated shards -----------------------------------------------------------------------------


def digit_shards(folder: Path, n=10) -> list[Path]:
    """Three shards of n real MNIST test digits each, written with tarfile: per sample `<key>.png` then
    `<key>.txt` ("digit <label> #<index>"), keys "<shard>-<index>"."""
    digits, labels = load_split(DATA_DIR, train=False)
    folder.mkdir(parents=True)
    paths = []
    for s in range(3):
        paths.append(folder / f"{s:05d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for i in range(s * n, (s + 1) * n):
                buf = io.BytesIO()
                Image.fromarray(digits[i, 0].numpy()).save(buf, "PNG")
                for name, data in (
                    (f"{s}-{i:03d}.png", buf.getvalue()),
                    (f"{s}-{i:03d}.txt", f"digit {labels[i]} #{i}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def cut_at(shard: Path, where: str) -> tuple[int, str | None]:
    """Cut `shard` in the 8th of its 10 samples (index 7); (the byte it now ends at, the key lost with
    the cut, or None where the tar cannot show one: a cut between samples)."""
    members = tarfile.open(shard).getmembers()
    png, txt = members[14], members[15]  # sample 7's two files
    cut, lost = {
        "between samples": (png.offset, None),
        "inside a header": (png.offset + 100, None),
        "between a sample's files": (txt.offset, png.name[:-4]),
        "inside a file's data": (png.offset_data + png.size // 2, png.name[:-4]),
        "inside its last file's data": (txt.offset_data + 3, png.name[:-4]),
    }[where]
    shard.write_bytes(shard.read_bytes()[:cut])
    return cut, lost


CUTS = [
    "between samples",
    "inside a header",
    "between a sample's files",
    "inside a file's data",
    "inside its last file's data",
]


@pytest.mark.parametrize("where", CUTS)
def test_truncated_shard_raises_naming_the_byte_or_is_skipped_and_listed(tmp_path, where):
    """Shard 00001 cut in its 8th sample: tarfile and webdataset read 7 samples from it without a word."""
    shards = digit_shards(tmp_path / "s")
    cut, lost = cut_at(shards[1], where)
    with pytest.raises(DataError, match=rf"00001.tar is truncated at byte {cut}\b.*on_bad_sample=skip"):
        module(str(tmp_path / "s"))  # the first shard is held out for validation
    # Under skip the cut shard is read first for validation (its stream must go on to the next shard)
    # and among the train shards; every complete sample is read once.
    val_root = f"{tmp_path}/s/{{00001..00002}}.tar"
    run = fake_trainer(tmp_path / "run")
    dm = module(str(tmp_path / "s"), run, on_bad_sample="skip", val_root=val_root, batch_size=1)
    assert dm.val_set.num_samples == 17  # the complete samples: 7 before the cut, and shard 00002's 10
    labels = load_split(DATA_DIR, train=False)[1]
    kept = [f"digit {labels[i]} #{i}" for i in [*range(10, 17), *range(20, 30)]]
    first = [f"digit {labels[i]} #{i}" for i in range(10)]
    captions = drain(dm)
    assert captions[:17] == kept and sorted(captions[17:]) == sorted(first + kept)
    listed = (tmp_path / "run" / "bad_samples.txt").read_text().splitlines()
    assert listed == dm.bad_samples and listed[0].startswith(f"{shards[1]}: is truncated at byte {cut}")
    lost_line = f"{shards[1]}:{lost}: is lost: the shard is cut at byte {cut}"
    assert [line[: len(lost_line)] for line in listed[1:]] == ([lost_line] if lost else [])


@pytest.mark.slow
def test_a_cut_shard_is_one_line_through_dlab_train(tmp_path):
    """The installed command, from an empty folder, with the README's shard pattern: the cut shard stops
    setup with one line naming it and the byte, before any training (the other data mistakes are tested
    on the DataModule above; they reach the user through the same entry wrapper)."""
    cut, _ = cut_at(digit_shards(tmp_path / "shards")[1], "between samples")
    result = run_cli(
        "dlab-train", "experiment=mnist_text_adaln", "debug=tiny", "data.root='shards/{00000..00002}.tar'",
        "data.val_root=null", "data.on_bad_sample=raise", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.search(rf"shards/00001.tar is truncated at byte {cut}\b.*on_bad_sample=skip", line), line
