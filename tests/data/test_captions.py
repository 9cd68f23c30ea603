"""CaptionedImageDataModule on small generated folders and shards: the batch contract (resize and
centre crop), the val split, the layout dlab-make-captions writes, format detection, mid-epoch
resume, and an image folder split over 2 simulated ranks. The formats' own tests: test_image_folder.py,
test_webdataset_shards.py; bad samples: test_bad_samples.py."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
from hydra.errors import OverrideParseException
from hydra.utils import instantiate

from diffusion_lab.data.webdataset_shards import shard_pattern
from diffusion_lab.errors import ConfigError, DataError
from tests.conftest import ROOT
from tests.data.captioned import COLOUR, make_folder, make_shards, module, rank_pass

# --- the batch contract ---------------------------------------------------------------------------


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


def test_image_folder_ranks_get_disjoint_shares_that_cover_the_set(tmp_path):
    """Two simulated ranks: each trains and validates on its own half of the folder."""
    folder = make_folder(tmp_path / "f", n=24)
    (n0, train0, val0), (n1, train1, val1) = [
        rank_pass(str(folder), None, rank, 2, val_size=8, num_workers=0) for rank in (0, 1)
    ]
    assert n0 == n1 == 4 and len(train0) == len(train1) == 8 and len(val0) == len(val1) == 4
    assert not set(train0) & set(train1) and not set(val0) & set(val1)
    assert set(train0 + train1 + val0 + val1) == {f"good {i}" for i in range(24)}
