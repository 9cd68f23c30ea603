"""The spatial condition transforms (data/spatial.py) against maps worked out by hand, their per-sample
seeds, and the captioned DataModule that adds them at collate time (MNIST's: test_mnist.py)."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.data import spatial
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError
from diffusion_lab.utils.images import to_model_range
from tests.conftest import DATA_DIR
from tests.data.captioned import make_folder, make_shards, module


def drawn(h: int, w: int, pixels) -> torch.Tensor:
    """A (1, 1, H, W) image in [-1, 1]: white (1) where `pixels` (an index into (H, W)) says, else black."""
    image = -torch.ones(h, w)
    image[pixels] = 1
    return image[None, None]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """The first 16 real MNIST test digits in [-1, 1]."""
    return to_model_range(load_split(DATA_DIR, train=False)[0][:16])


# ---- sketch -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vertical", [False, True])
def test_a_thick_bars_sketch_is_its_centre_line(vertical):
    bar = torch.zeros(9, 20, dtype=torch.bool)
    bar[3:6, 2:18] = True  # 3 px thick, rows 3..5: the centre line is row 4
    centre, inner = torch.zeros_like(bar), torch.zeros_like(bar)
    centre[4, 2:18] = True
    inner[4, 4:16] = True  # the centre line, give or take 2 px at either end
    if vertical:
        bar, centre, inner = bar.T, centre.T, inner.T
    sketch = spatial.sketch(drawn(*bar.shape, bar))[0, 0].bool()
    assert not (sketch & ~centre).any() and sketch[inner].all()


@pytest.mark.parametrize(
    "line",
    [
        (torch.tensor([4]), torch.arange(2, 14)),  # horizontal
        (torch.arange(1, 8), torch.tensor([6])),  # vertical
        (torch.arange(1, 8), torch.arange(3, 10)),  # diagonal
        (torch.tensor([1, 2, 3, 4, 5, 5, 5, 5]), torch.tensor([2, 2, 2, 2, 2, 3, 4, 5])),  # an L
    ],
)
def test_a_one_pixel_line_is_its_own_sketch(line):
    image = drawn(9, 16, line)
    assert torch.equal(spatial.sketch(image), (image > 0).float())


def test_a_digits_sketch_is_thin_inside_its_strokes_and_a_fixed_point(digits):
    sketches = spatial.sketch(digits)
    assert sketches.shape == (16, 1, 28, 28) and set(sketches.unique().tolist()) == {0.0, 1.0}
    strokes = digits > 0
    assert not (sketches.bool() & ~strokes).any()
    assert (sketches.sum((1, 2, 3)) > 0).all() and sketches.sum() < strokes.sum() / 2  # thinned, not gone
    assert torch.equal(spatial.sketch(sketches), sketches)
    # RGB: the luminance's strokes, so a grey digit copied to 3 channels has the same sketch.
    assert torch.equal(spatial.sketch(digits.expand(-1, 3, -1, -1)), sketches)


# ---- semantic ---------------------------------------------------------------------------------------
def ring(diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, expected classes) of a 1-px ring on 11x11: a square, or a diamond of diagonal steps
    (8-connected only, so its inside is closed only to a 4-connected flood fill)."""
    ys, xs = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
    if diagonal:
        distance = (ys - 5).abs() + (xs - 5).abs()  # a diamond of radius 4
    else:
        distance = torch.maximum((ys - 5).abs(), (xs - 5).abs())  # a square of radius 3
    radius = 4 if diagonal else 3
    classes = torch.where(distance == radius, 1, torch.where(distance < radius, 2, 0))
    return drawn(11, 11, distance == radius), classes


@pytest.mark.parametrize("diagonal", [False, True])
def test_a_rings_inside_is_a_hole_and_its_outside_background(diagonal):
    image, classes = ring(diagonal)
    regions = spatial.semantic(image)
    assert regions.shape == (1, 3, 11, 11) and torch.equal(regions.sum(1), torch.ones(1, 11, 11))
    assert torch.equal(regions[0].argmax(0), classes)
    opened = image.clone()
    opened[..., 5, 2 if not diagonal else 1] = -1  # a gap in the left side: the inside leaks out
    assert not spatial.semantic(opened)[:, 2].any()


def test_semantic_of_rgb_is_its_colour_region():
    # Pixel k has channel c above 0 iff bit (2 - c) of k is set: regions 0..7 from left to right.
    bits = torch.tensor([[(k >> (2 - c)) & 1 for k in range(8)] for c in range(3)], dtype=torch.float32)
    image = (bits * 1.6 - 0.8)[None, :, None, :]  # (1, 3, 1, 8): ±0.8
    regions = spatial.semantic(image)
    assert regions.shape == (1, 8, 1, 8) and torch.equal(regions[0, :, 0], torch.eye(8))
    assert spatial.channels("semantic", 3) == 8 and spatial.channels("semantic", 1) == 3


# ---- lowres -----------------------------------------------------------------------------------------
def test_lowres_averages_blocks_and_keeps_the_size():
    checker = (torch.arange(8)[:, None] + torch.arange(8)).remainder(2).float() * 2 - 1  # ±1
    assert torch.equal(spatial.lowres(checker[None, None], 2), torch.zeros(1, 1, 8, 8))
    constant = torch.full((2, 3, 8, 8), 0.25)
    assert torch.equal(spatial.lowres(constant, 4), constant)
    blocks = torch.randn(2, 1, 7, 7).repeat_interleave(4, -2).repeat_interleave(4, -1)  # 28x28 of 4x4 blocks
    assert torch.allclose(spatial.lowres(blocks, 4), blocks)
    ramp = torch.arange(16.0).view(1, 1, 4, 4)  # known block means: (0+1+4+5)/4 = 2.5, ...
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(spatial.lowres(ramp, 2)[0, 0], expected)


def test_a_factor_that_does_not_divide_the_side_names_the_key():
    with pytest.raises(
        ConfigError, match=r"data\.conditions\.lowres\.factor=3 .*28x28.*\[1, 2, 4, 7, 14, 28\]"
    ):
        spatial.lowres(torch.zeros(1, 1, 28, 28), 3)


# ---- inpaint ----------------------------------------------------------------------------------------
def test_inpaint_masks_are_seeded_per_sample_and_zero_the_hole():
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    seeds = spatial.sample_seeds(0, torch.arange(6))
    state = torch.get_rng_state()
    out = spatial.inpaint(images, seeds)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched
    assert out.shape == (6, 4, 16, 16)
    keep = out[:, -1:]
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert (keep.mean((1, 2, 3)) >= 0.75).all()  # 1 marks the kept pixels: a box is at most 1/4 of them
    assert torch.equal(out[:, :3], images * keep)  # kept pixels unchanged, holes 0
    assert ((keep == 0).flatten(1).any(1) & (keep == 1).flatten(1).any(1)).all()
    # One seed, one mask, whatever the batch around it; other seeds, other masks.
    assert torch.equal(spatial.inpaint(images[3:4], seeds[3:4]), out[3:4])
    assert len({tuple(k.flatten().tolist()) for k in keep}) == 6


def test_box_masks_are_rectangles_of_a_quarter_to_half_the_side():
    seeds = spatial.sample_seeds(1, torch.arange(20))
    holes = spatial.inpaint(torch.zeros(20, 1, 16, 24), seeds, masks=["box"])[:, -1] == 0
    for hole in holes:
        rows, cols = hole.any(1).nonzero()[:, 0], hole.any(0).nonzero()[:, 0]
        assert hole[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # its bounding box
        assert hole.sum() == len(rows) * len(cols)
        assert 4 <= len(rows) <= 8 and 6 <= len(cols) <= 12


def test_free_form_masks_are_brush_strokes():
    seeds = spatial.sample_seeds(2, torch.arange(20))
    holes = spatial.inpaint(torch.zeros(20, 1, 28, 28), seeds, masks=("free_form",))[:, -1] == 0
    area = holes.sum((1, 2)).float()
    assert (area >= 9).all() and (area <= 28 * 28 / 3).all()  # at least a brush's dot, far from all
    boxes = [h[h.any(1)][:, h.any(0)].all() for h in holes]
    assert sum(boxes) < 5  # bent strokes do not fill their bounding box


def test_sample_seeds_are_stable_and_distinct():
    # Pinned: the same in every process and Python run (a str hash() would differ per run), and an
    # index's seed does not depend on the batch it is in.
    assert spatial.sample_seeds(0, torch.arange(2)).tolist() == [3560153452049741418, 2754921267890689017]
    assert spatial.sample_seeds(0, torch.tensor([1])).tolist() == [2754921267890689017]
    many = spatial.sample_seeds(0, torch.arange(1000))
    assert many.dtype == torch.int64 and (many >= 0).all() and len(set(many.tolist())) == 1000
    assert not set(many.tolist()) & set(spatial.sample_seeds(1, torch.arange(1000)).tolist())
    assert spatial.key_seeds(0, ["a", "b"]).tolist() != spatial.key_seeds(1, ["a", "b"]).tolist()


# ---- derive and its config --------------------------------------------------------------------------
def test_derive_makes_every_asked_map_with_its_channels(digits):
    conditions = {"sketch": {}, "semantic": None, "lowres": {"factor": 4}, "inpaint": {"masks": ["box"]}}
    seeds = spatial.sample_seeds(3, torch.arange(16))
    maps = spatial.derive(digits, conditions, seeds)
    assert list(maps) == list(conditions)
    for name, value in maps.items():
        assert value.shape == (16, spatial.channels(name, 1), 28, 28)
    assert torch.equal(maps["lowres"], spatial.lowres(digits, 4))
    assert torch.equal(maps["inpaint"], spatial.inpaint(digits, seeds, ["box"]))


@pytest.mark.parametrize(
    "conditions, needles",
    [
        ({"skecth": {}}, ["data.conditions.skecth", "'sketch', 'semantic', 'lowres', 'inpaint'"]),
        ({"lowres": {"size": 4, "factor": 4}}, ["data.conditions.lowres.size", "['factor']"]),
        ({"lowres": {}}, ["data.conditions.lowres needs factor", "data.conditions.lowres.factor"]),
        ({"inpaint": {"masks": ["circle"]}}, ["data.conditions.inpaint.masks=['circle']", "'free_form'"]),
        ({"sketch": 3}, ["data.conditions.sketch=3", "data.conditions.sketch={}"]),
    ],
)
def test_bad_conditions_name_the_key_and_the_known_ones(conditions, needles):
    with pytest.raises(ConfigError) as err:
        spatial.derive(torch.zeros(1, 1, 8, 8), conditions, torch.zeros(1, dtype=torch.int64))
    assert all(needle in str(err.value) for needle in needles), str(err.value)


# ---- the captioned DataModule -----------------------------------------------------------------------
CONDITIONS = {"inpaint": {}, "lowres": {"factor": 2}}


def test_imagefolder_batches_carry_maps_seeded_by_index(tmp_path):
    dm = module(make_folder(tmp_path / "folder", n=12), channels=3, conditions=CONDITIONS, condition_seed=5)
    batch = dm.train_set.__getitems__([7, 2, 5])
    assert batch.keys() == {"image", "caption", "_bad", "inpaint", "lowres"}
    expected = spatial.derive(batch["image"], CONDITIONS, spatial.sample_seeds(5, torch.tensor([7, 2, 5])))
    assert all(torch.equal(batch[k], expected[k]) for k in CONDITIONS)
    one = dm.train_set[2]
    assert torch.equal(one["inpaint"], batch["inpaint"][1]) and one.keys() == {
        "image",
        "caption",
        *CONDITIONS,
    }
    assert module(make_folder(tmp_path / "plain", n=12)).train_set[2].keys() == {"image", "caption"}
    # Under skip, a bad image's place is taken by the next good one, and so are its maps.
    folder = make_folder(tmp_path / "skip", n=6)
    (folder / "img/03.png").write_bytes(b"not a png")
    kw = {"on_bad_sample": "skip", "in_memory": False, "val_size": 0}
    data = module(folder, conditions=CONDITIONS, **kw).train_set
    assert torch.equal(data[3]["inpaint"], data[4]["inpaint"])


def test_shard_batches_carry_maps_seeded_by_key(tmp_path):
    make_shards(tmp_path / "train", [6, 6])
    dm = module(tmp_path / "train", image_size=16, conditions=CONDITIONS, condition_seed=5)
    batch = next(iter(dm.train_dataloader()))
    keys = [caption.removeprefix("cap ") for caption in batch["caption"]]
    expected = spatial.derive(batch["image"], CONDITIONS, spatial.key_seeds(5, keys))
    assert all(torch.equal(batch[k], expected[k]) for k in CONDITIONS)
    with pytest.raises(ConfigError, match="data.conditions.sktech"):
        module(tmp_path / "train", conditions={"sktech": {}})
