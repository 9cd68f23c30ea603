"""CaptionedImageDataModule on small generated folders and shards: the batch contract (resize and
centre crop), list captions, both metadata formats, each bad-sample case under raise and skip, the
val split, mid-epoch resume, and webdataset shards split over 2 ranks x 2 workers (simulated, and one
real 2-process DDP run)."""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import webdataset as wds
from hydra.errors import OverrideParseException
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from diffusion_lab.data.captions import CaptionedImageDataModule, shard_pattern
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError, DataError
from tests.conftest import DATA_DIR, ROOT, run_cli

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


# --- the batch contract -------------------------------------------------------------------------


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_batches_follow_the_contract(tmp_path, channels, size):
    dm = module(make_folder(tmp_path / "f"), channels=channels, image_size=size, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption"}
    image = batch["image"]
    assert image.shape == (8, channels, size, size) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert all(isinstance(c, str) and c.startswith("good ") for c in batch["caption"])
    # Side bands cropped away, top band kept: the shorter side was resized, then centre-cropped.
    colour = torch.tensor([88] if channels == 1 else COLOUR) / 127.5 - 1
    middle = image[:, :, size // 2, :]  # (B, C, W)
    assert torch.allclose(middle, colour.view(1, -1, 1).expand_as(middle), atol=0.02)
    assert (image[:, :, 0, size // 2] < -0.5).all()


@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_metadata_reads_like_jsonl(tmp_path, fmt, bom):
    """Also when it starts with a UTF-8 byte-order mark, as spreadsheet programs write CSV."""
    folder = make_folder(tmp_path / "f", fmt=fmt)
    meta = folder / f"metadata.{fmt}"
    meta.write_text(("\ufeff" if bom else "") + meta.read_text(), encoding="utf-8")
    dm = module(folder, val_size=0)
    assert sorted(drain(dm)) == sorted(f"good {i}" for i in range(20))


def test_a_caption_that_is_not_text_is_named_with_its_type(tmp_path):
    folder = make_folder(tmp_path / "f", n=4)
    cases = [(5, "5 is a number"), (True, "true is true/false"), (["a", 2.5], "2.5 is a number")]
    cases += [({"en": "a 3"}, '{"en": "a 3"} is an object'), ([["a 3"]], '["a 3"] is a list')]
    append_rows(folder, [{"file_name": "img/00.png", "text": value} for value, _ in cases])
    dm = module(folder, fake_trainer(tmp_path / "run"), on_bad_sample="skip", val_size=0)
    assert dm.bad_samples == [
        f"{folder / 'img/00.png'} (metadata.jsonl:{line}): has a caption that is not text ({what}): a "
        "caption is a string in quotes, or a list of them"
        for line, (_, what) in enumerate(cases, 5)
    ]


def test_list_caption_is_sampled_in_training_and_first_in_validation(tmp_path):
    row = {"file_name": "img/00.png", "text": ["first caption", "second caption"]}
    folder = make_folder(tmp_path / "f", n=4, extra_rows=[row])
    dm = module(folder, val_root=str(folder))
    index = len(dm.train_set) - 1  # the list row comes last in both sets

    def draws():
        torch.manual_seed(0)
        return [dm.train_set[index]["caption"] for _ in range(16)]

    assert set(draws()) == {"first caption", "second caption"}
    assert draws() == draws()  # seeded by torch's RNG
    assert {dm.val_set[index]["caption"] for _ in range(8)} == {"first caption"}


# --- bad samples ----------------------------------------------------------------------------------


def bad_case(folder: Path, case: str) -> tuple[dict | str, str]:
    """Add one bad sample to a folder; (its metadata row, what the error must name)."""
    (folder / "img" / "bad.png").write_bytes(png())
    good = {"file_name": "img/bad.png"}
    if case == "truncated":
        (folder / "img" / "bad.png").write_bytes(png()[:60])
        return {**good, "text": "bad"}, "img/bad.png"
    if case == "not_an_image":
        (folder / "img" / "bad.png").write_text("a caption saved under an image name")
        return {**good, "text": "bad"}, "img/bad.png"
    if case == "missing_file":
        return {"file_name": "img/gone.png", "text": "bad"}, "img/gone.png"
    if case == "not_json":
        return '{"file_name": "img/bad.png", "text": ', "metadata.jsonl:21"
    caption = {
        "number": {"text": 5},
        "empty_string": {"text": "  "},
        "empty_list": {"text": []},
        "null": {"text": None},
        "absent": {},
    }
    return {**good, **caption[case]}, "metadata.jsonl:21"


def append_rows(folder: Path, rows) -> None:
    with (folder / "metadata.jsonl").open("a") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


CASES = [
    "truncated",
    "not_an_image",
    "missing_file",
    "not_json",
    "number",
    "empty_string",
    "empty_list",
    "null",
    "absent",
]
LAZY = {"truncated", "not_an_image"}  # image bytes: checked when decoded, eagerly only in memory


RAISE_CASES = [
    pytest.param(case, in_memory, id=f"{case}-{'memory' if in_memory else 'stream'}")
    for case in CASES
    for in_memory in ((True, False) if case in LAZY else (True,))
]


@pytest.mark.parametrize("case, in_memory", RAISE_CASES)
def test_bad_sample_raises_naming_the_file(tmp_path, case, in_memory):
    folder = make_folder(tmp_path / "f")
    row, named = bad_case(folder, case)
    append_rows(folder, [row])
    workers = 0 if in_memory else 2  # streamed: the error comes from a loader worker
    with pytest.raises(DataError, match="on_bad_sample=skip") as err:
        drain(module(folder, in_memory=in_memory, val_root=str(folder), num_workers=workers))
    assert named in str(err.value) and "\n" not in str(err.value)
    if case not in LAZY:
        assert "metadata.jsonl:21" in str(err.value)


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "stream"])
@pytest.mark.parametrize("case", CASES)
def test_bad_sample_is_skipped_counted_and_listed(tmp_path, case, in_memory):
    folder = make_folder(tmp_path / "f")
    row, named = bad_case(folder, case)
    append_rows(folder, [row])
    dm = module(
        folder,
        fake_trainer(tmp_path / "run"),
        on_bad_sample="skip",
        in_memory=in_memory,
        val_root=str(folder),
    )
    captions = drain(dm)
    assert captions and all(c.startswith("good ") for c in captions)
    assert len(dm.bad_samples) == 1 and named in dm.bad_samples[0]
    assert (tmp_path / "run" / "bad_samples.txt").read_text().splitlines() == dm.bad_samples


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_case_at_once_is_counted_exactly(tmp_path, caplog, workers):
    """Streamed, so the image cases are found lazily: with workers, in their processes."""
    folder = make_folder(tmp_path / "f")
    rows = []
    for i, case in enumerate(CASES):
        row, _ = bad_case(folder, case)
        if case in LAZY:  # each needs its own broken file
            (folder / "img" / f"bad{i}.png").write_bytes((folder / "img" / "bad.png").read_bytes())
            row = {**row, "file_name": f"img/bad{i}.png"}
        rows.append(row)
    (folder / "img" / "bad.png").write_bytes(png())  # the caption cases' image is fine
    append_rows(folder, rows)
    run = fake_trainer(tmp_path / "run")
    dm = module(folder, run, on_bad_sample="skip", in_memory=False, val_size=0, num_workers=workers)
    with caplog.at_level("WARNING", logger="diffusion_lab"):
        captions = drain(dm)
    assert all(c.startswith("good ") for c in captions)
    assert len(dm.bad_samples) == len(CASES)
    assert f"{len(CASES)} bad sample(s) left out (after a train pass)" in caplog.text
    assert len((tmp_path / "run" / "bad_samples.txt").read_text().splitlines()) == len(CASES)


def test_wrong_caption_column_lists_the_columns_under_both_policies(tmp_path):
    for fmt in ("jsonl", "csv"):
        folder = make_folder(tmp_path / fmt, fmt=fmt)
        for policy in ("raise", "skip"):
            with pytest.raises(
                ConfigError, match=r"no 'caption' column; its columns are \['file_name', 'text', 'label'\]"
            ):
                module(folder, caption_column="caption", on_bad_sample=policy)


# --- splits, layout, config, resume ---------------------------------------------------------------


def test_holdout_is_seeded_and_disjoint_and_val_root_replaces_it(tmp_path):
    folder = make_folder(tmp_path / "f")

    def split(seed):
        dm = module(folder, val_size=5, split_seed=seed)
        return [r.name for r in dm.train_set.rows], [r.name for r in dm.val_set.rows]

    train, val = split(0)
    assert len(val) == 5 and not set(train) & set(val) and len(set(train) | set(val)) == 20
    assert split(0) == (train, val) and split(1)[1] != val
    other = make_folder(tmp_path / "v", n=3)
    dm = module(folder, val_root=str(other))
    assert len(dm.train_set) == 20 and {r.name.split(" (")[0] for r in dm.val_set.rows} == {
        str(other / f"img/{i:02d}.png") for i in range(3)
    }


def test_config_composes_for_a_make_captions_folder(compose_cfg, tmp_path):
    """`data=captions data.root=<out>` with <out>/train and <out>/val, as dlab-make-captions writes."""
    make_folder(tmp_path / "out" / "train", n=12)
    make_folder(tmp_path / "out" / "val", n=4)
    cfg = compose_cfg("data=captions", f"data.root={tmp_path / 'out'}", "data.batch_size=4")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (12, 4) and dm.format == "imagefolder"
    with pytest.raises(Exception) as info:  # Hydra wraps what the constructor raises
        instantiate(compose_cfg("data=captions").data)
    err = info.value
    while not isinstance(err, ConfigError):
        err = err.__cause__
    assert "data.root=None" in str(err)


def test_the_documented_shard_pattern_reaches_hydra_whole(compose_cfg):
    """The README's pattern, split by a shell as typed there, composes; the braces left bare do not."""
    readme = (ROOT / "README.md").read_text() + (ROOT / "conf" / "data" / "captions.yaml").read_text()
    typed = re.findall(r"\"data\.root='shards/\{00000\.\.00099\}\.tar'\"", readme)
    assert len(typed) == 2  # the README and the config's comment
    (override,) = shlex.split(typed[0])
    assert compose_cfg("data=captions", override).data.root == "shards/{00000..00099}.tar"
    with pytest.raises(OverrideParseException, match="mismatched input '{'"):
        compose_cfg("data=captions", *shlex.split("data.root='shards/{00000..00099}.tar'"))
    with pytest.raises(DataError) as err:  # a file that is neither metadata nor a shard
        module(ROOT / "README.md")
    assert shard_pattern("data.root") in str(err.value)  # the hint shows the pattern as it must be typed


def test_format_detection_and_missing_roots(tmp_path):
    folder = make_folder(tmp_path / "f", n=6)
    assert module(folder / "metadata.jsonl", val_size=2).format == "imagefolder"
    shards = make_shards(tmp_path / "s", [4, 4, 4])
    dm = module(f"{tmp_path}/s/s{{0000..0002}}.tar")  # no val_root: the first shard is held out
    assert dm.format == "webdataset" and dm.val_set.urls == shards[:1] and dm.train_set.num_samples == 8
    (tmp_path / "empty").mkdir()
    for root, message in [
        (tmp_path / "nothing", "does not exist"),
        (tmp_path / "empty", "holds neither metadata.jsonl nor metadata.csv"),
        (folder / "img/00.png", "is a file but neither metadata.jsonl nor metadata.csv nor a .tar shard"),
        (f"{tmp_path}/s/s{{0000..0009}}.tar", "s0003.tar, which does not exist"),
    ]:
        with pytest.raises(DataError, match=message):
            module(root)
    (folder / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(DataError, match="holds both metadata.jsonl and metadata.csv"):
        module(folder, format="imagefolder")


def test_resumed_train_loader_continues_with_the_next_batch(tmp_path):
    dm = module(make_folder(tmp_path / "f"), val_size=0, in_memory=False)
    full = dm.train_dataloader()
    expected = [b["caption"] for b in full]
    first = dm.train_dataloader()
    it = iter(first)
    seen = [next(it)["caption"] for _ in range(2)]
    resumed = dm.train_dataloader()
    resumed.load_state_dict(first.state_dict())
    assert seen + [b["caption"] for b in resumed] == expected


# --- webdataset -----------------------------------------------------------------------------------


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


def test_image_folder_ranks_get_disjoint_shares_that_cover_the_set(tmp_path):
    """Two simulated ranks: each trains and validates on its own half of the folder."""
    folder = make_folder(tmp_path / "f", n=24)
    (n0, train0, val0), (n1, train1, val1) = [
        rank_pass(str(folder), None, rank, 2, val_size=8, num_workers=0) for rank in (0, 1)
    ]
    assert n0 == n1 == 4 and len(train0) == len(train1) == 8 and len(val0) == len(val1) == 4
    assert not set(train0) & set(train1) and not set(val0) & set(val1)
    assert set(train0 + train1 + val0 + val1) == {f"good {i}" for i in range(24)}


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
