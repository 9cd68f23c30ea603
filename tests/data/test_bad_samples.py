"""data.on_bad_sample (bad_samples.py) on image folders: each bad-sample case under raise and skip,
found at setup or lazily in loader workers, and the list each rank writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_lab.data.bad_samples import BadSample, BadSamples
from diffusion_lab.errors import DataError
from tests.data.captioned import append_rows, drain, fake_trainer, make_folder, module, png


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


# --- the list and its summary ---------------------------------------------------------------------


def test_raise_names_the_sample_and_the_way_out():
    with pytest.raises(DataError) as err:
        BadSamples("raise").fail("img/a.png", BadSample("is missing"))
    assert str(err.value) == (
        "img/a.png is missing. Fix or remove it, or set data.on_bad_sample=skip to leave bad samples out."
    )


def test_another_rank_lists_only_what_it_found_lazily_and_reports_only_news(tmp_path, caplog):
    bad = BadSamples("skip")
    bad.root, bad.rank = tmp_path / "run", 1
    bad.fail("a.png", BadSample("is missing"))
    bad.fail("a.png", BadSample("counts once"))
    bad.eager = 1  # found at setup: every rank finds it, rank 0 lists it
    with caplog.at_level("WARNING", logger="diffusion_lab"):
        bad.report("at setup")
        assert not caplog.text and not bad.root.exists()
        bad.fail("b.png", BadSample("is not a readable image"))
        bad.report("after a val pass", again=False)
        listed = bad.root / "bad_samples.rank1.txt"
        assert listed.read_text().splitlines() == ["a.png: is missing", "b.png: is not a readable image"]
        assert caplog.messages == [
            f"data.on_bad_sample=skip: 2 bad sample(s) left out (after a val pass): a.png, b.png; "
            f"all listed in {listed}"
        ]
        bad.report("after a val pass", again=False)  # nothing new
        bad.report("after a train pass")
    assert len(caplog.messages) == 2 and "(after a train pass)" in caplog.messages[1]
