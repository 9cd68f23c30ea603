"""`dlab-sample`'s PNG preview: which of the samples it shows, row by row."""

from __future__ import annotations

from diffusion_lab.sample import PREVIEW_IMAGES, preview_rows

# ---------------------------------------------------------------------------------------------- preview


def test_preview_of_a_thousand_images_is_ten_rows_of_ten():
    labels = [i % 10 for i in range(1000)]  # what dlab-sample n=1000 asks a class model for
    rows = preview_rows(labels, scales=1)
    assert len(rows) == 10 and all(len(r) == 10 for r in rows)
    for digit, row in enumerate(rows):
        assert row == [digit + 10 * j for j in range(10)]  # row r: the first ten samples of digit r


def test_preview_has_a_block_of_columns_per_guidance_scale():
    labels = [i % 10 for i in range(20)]
    rows = preview_rows(labels, scales=2)  # the npz holds 20 images at the first scale, then 20 at the other
    assert rows[3] == [3, 13, 23, 33]  # digit 3: two at the first scale, then the same two at the second
    assert len(rows) == 10 and sum(map(len, rows)) == 40


def test_preview_rows_are_full_when_the_labels_cycle_unevenly():
    rows = preview_rows([i % 10 for i in range(15)], scales=1)  # digits 0-4 twice, 5-9 once
    assert rows == [[digit] for digit in range(10)]


def test_preview_never_shows_more_than_its_limit():
    prompts = [f"prompt {i}" for i in range(300)]
    rows = preview_rows(prompts * 2, scales=3)
    assert sum(map(len, rows)) <= PREVIEW_IMAGES
    assert rows[0] == [0, 600, 1200]  # the first prompt, once per scale
    assert len({i for row in rows for i in row}) == sum(map(len, rows))  # no image twice
