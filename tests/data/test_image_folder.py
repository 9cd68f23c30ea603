"""Image folders (image_folder.py) through CaptionedImageDataModule: both metadata formats, list
captions, captions that are not text, and a caption column that no row has."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.errors import ConfigError
from tests.data.captioned import append_rows, drain, fake_trainer, make_folder, module


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


def test_wrong_caption_column_lists_the_columns_under_both_policies(tmp_path):
    for fmt in ("jsonl", "csv"):
        folder = make_folder(tmp_path / fmt, fmt=fmt)
        for policy in ("raise", "skip"):
            with pytest.raises(
                ConfigError, match=r"no 'caption' column; its columns are \['file_name', 'text', 'label'\]"
            ):
                module(folder, caption_column="caption", on_bad_sample=policy)
