"""Spatial conditions read from files (data/condition_files.py): each file becomes the map data.spatial
gives for a real image, and each bad file is one DataError that names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data import spatial
from diffusion_lab.data.condition_files import conditions_from, image_files, read_condition, read_images
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.utils.images import to_model_range, to_uint8


def write_png(path: Path, pixels) -> Path:
    """uint8 (H, W) or (H, W, 3) pixels → a PNG at `path` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def one_line_error(needle: str, call, *args, **kwargs) -> str:
    """The DataError `call` raises: one line that contains `needle`."""
    with pytest.raises(DataError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert needle in message and "\n" not in message, message
    return message


# ---------------------------------------------------------------- files and their errors


def test_a_folder_lists_its_images_sorted_by_name_and_a_file_is_itself(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [f.name for f in image_files(tmp_path, "sketch")] == ["a.jpg", "b.PNG", "c.webp"]
    assert image_files(tmp_path / "notes.txt", "sketch") == [tmp_path / "notes.txt"]


def test_a_missing_path_and_a_folder_without_images_are_errors_naming_the_key(tmp_path):
    one_line_error(
        f"sketch='{tmp_path / 'nope'}' does not exist: give an image file",
        image_files,
        tmp_path / "nope",
        "sketch",
    )
    (tmp_path / "notes.txt").write_text("not an image")
    one_line_error(f"lowres='{tmp_path}' is a folder with no image files", image_files, tmp_path, "lowres")


def test_a_file_pillow_cannot_read_is_named(tmp_path):
    fake = tmp_path / "drawing.png"
    fake.write_text("a text file renamed .png")
    one_line_error(f"sketch={fake}: not an image Pillow can read", read_images, fake, "sketch", 28, 1)


def test_a_wrong_size_is_an_error_and_never_resized(tmp_path):
    png = write_png(tmp_path / "big.png", np.zeros((32, 32)))
    message = one_line_error("is 32x32; this model's sketch is 28x28", read_images, png, "sketch", 28, 1)
    assert message.startswith(f"sketch={png} is 32x32")


def test_images_read_in_model_range_and_converted_to_the_model_channels(tmp_path):
    gray = np.array([[0, 255], [51, 204]])
    rgb = np.stack([gray, 255 - gray, np.full((2, 2), 102)], axis=-1)
    write_png(tmp_path / "a.png", gray)
    write_png(tmp_path / "b.png", rgb)
    images = read_images(tmp_path, "conditions_from", 2, 3)
    assert images.shape == (2, 3, 2, 2) and images.dtype == torch.float32
    torch.testing.assert_close(
        images[1], to_model_range(torch.from_numpy(rgb).permute(2, 0, 1).to(torch.uint8))
    )
    torch.testing.assert_close(
        images[0], to_model_range(torch.from_numpy(gray).to(torch.uint8)).expand(3, 2, 2)
    )
    # and an RGB file of grey pixels (R = G = B) reads as that grey for a one-channel model
    write_png(tmp_path / "grey.png", np.stack([gray] * 3, axis=-1))
    one = read_images(tmp_path / "grey.png", "inpaint", 2, 1)
    torch.testing.assert_close(one, to_model_range(torch.from_numpy(gray).to(torch.uint8)).view(1, 1, 2, 2))


def test_an_unknown_source_and_a_mask_without_inpaint_are_config_errors(tmp_path):
    png = write_png(tmp_path / "a.png", np.zeros((4, 4)))
    with pytest.raises(ConfigError, match="depth= is not a spatial condition"):
        read_condition("depth", png, 4, 1, {})
    with pytest.raises(ConfigError, match="mask= is the inpainting mask; it goes with inpaint="):
        read_condition("sketch", png, 4, 1, {}, mask=png)


# ---------------------------------------------------------------- lowres, inpaint, semantic


def test_a_low_res_image_is_nearest_upsampled_to_the_model_size(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 7))
    png = write_png(tmp_path / "small.png", pixels)
    lowres = read_condition("lowres", png, 28, 1, {"factor": 4})
    small = to_model_range(torch.from_numpy(pixels).to(torch.uint8))
    expected = small.repeat_interleave(4, dim=0).repeat_interleave(4, dim=1)  # each pixel a 4x4 block
    assert lowres.shape == (1, 1, 28, 28)
    torch.testing.assert_close(lowres[0, 0], expected, rtol=0, atol=0)


def test_a_full_size_image_for_lowres_names_the_low_res_size(tmp_path):
    png = write_png(tmp_path / "full.png", np.zeros((28, 28)))
    message = one_line_error(
        "is 28x28; this model's lowres is 7x7", read_condition, "lowres", png, 28, 1, {"factor": 4}
    )
    assert message.startswith(f"lowres={png} ") and "conditions_from=" in message


def test_white_mask_pixels_are_filled_the_rest_kept(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3))
    mask = np.zeros((4, 4))
    mask[1:3, 0:2] = 255  # a white box: fill it in
    mask[0, 3], mask[3, 3] = 200, 100  # brighter than mid-grey is fill, darker is keep
    write_png(tmp_path / "images" / "0.png", rgb)
    write_png(tmp_path / "masks" / "0.png", mask)
    out = read_condition("inpaint", tmp_path / "images", 4, 3, {}, mask=tmp_path / "masks")
    keep = torch.ones(4, 4)
    keep[1:3, 0:2] = 0
    keep[0, 3] = 0
    image = to_model_range(torch.from_numpy(rgb).permute(2, 0, 1).to(torch.uint8))
    assert out.shape == (1, 4, 4, 4)
    torch.testing.assert_close(out[0, 3], keep, rtol=0, atol=0)  # the keep mask comes last
    torch.testing.assert_close(out[0, :3], image * keep, rtol=0, atol=0)  # filled pixels are 0 (mid-grey)


def test_inpaint_needs_one_mask_per_image(tmp_path):
    for i in range(2):
        write_png(tmp_path / "images" / f"{i}.png", np.zeros((4, 4)))
    for i in range(3):
        write_png(tmp_path / "masks" / f"{i}.png", np.zeros((4, 4)))
    one_line_error(
        "inpaint= needs mask=<png or folder>", read_condition, "inpaint", tmp_path / "images", 4, 1, {}
    )
    message = one_line_error(
        "has 2 images but mask=",
        read_condition,
        "inpaint",
        tmp_path / "images",
        4,
        1,
        {},
        mask=tmp_path / "masks",
    )
    assert "has 3 masks" in message


def test_an_index_image_is_one_hot_by_its_pixel_values(tmp_path):
    ids = np.array([[0, 1, 2], [2, 1, 0], [0, 0, 1]])
    write_png(tmp_path / "a_grey.png", ids)
    palette = Image.fromarray(ids.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0])  # ids shown as colours; the ids still count
    palette.save(tmp_path / "b_palette.png")
    semantic = read_condition("semantic", tmp_path, 3, 1, {})
    one_hot = torch.tensor([[[r == i for i in row] for row in ids] for r in range(3)], dtype=torch.float32)
    assert spatial.channels("semantic", 1) == 3
    torch.testing.assert_close(semantic, torch.stack([one_hot, one_hot]), rtol=0, atol=0)


def test_a_region_id_the_model_lacks_and_a_colour_image_are_errors(tmp_path):
    png = write_png(tmp_path / "ids.png", [[0, 3], [1, 2]])
    one_line_error(
        f"semantic={png} has region id 3; this model's semantic map has 3 regions",
        read_condition,
        "semantic",
        png,
        2,
        1,
        {},
    )
    rgb = write_png(tmp_path / "rgb.png", np.zeros((2, 2, 3)))
    one_line_error(
        f"semantic={rgb} has 3 channels (RGB); semantic= takes an index image",
        read_condition,
        "semantic",
        rgb,
        2,
        1,
        {},
    )


# ---------------------------------------------------------------- sketches


def test_a_one_pixel_drawing_reads_back_as_drawn(tmp_path):
    drawn = np.zeros((12, 12))
    drawn[2, 2:9] = drawn[2:10, 2] = 255  # an L
    drawn[range(5, 10), range(4, 9)] = 255  # and a diagonal
    png = write_png(tmp_path / "sketch.png", drawn)
    sketch = read_condition("sketch", png, 12, 3, {})
    torch.testing.assert_close(
        sketch, torch.from_numpy(drawn / 255).float().view(1, 1, 12, 12), rtol=0, atol=0
    )


def test_a_thick_pen_stroke_reads_back_as_its_centre_line(tmp_path):
    drawn = np.full((12, 12), 100)  # a dark-grey background: below mid-grey, so no stroke
    drawn[4:7, 2:10] = 200  # a bar 3 px thick, brighter than mid-grey
    sketch = read_condition("sketch", write_png(tmp_path / "bar.png", drawn), 12, 1, {})
    centre = torch.zeros(1, 1, 12, 12)
    centre[0, 0, 5, 3:8] = 1  # its middle row; thinning (Zhang-Suen) wears a pixel or two off each end
    torch.testing.assert_close(sketch, centre, rtol=0, atol=0)


# ---------------------------------------------------------------- real digits


@pytest.fixture
def digits(tmp_path, data_dir) -> tuple[Path, torch.Tensor]:
    """Three real MNIST test digits written as PNGs, and the digits in model range."""
    images = load_split(data_dir, train=False)[0][:3]
    for i, image in enumerate(images):
        write_png(tmp_path / "digits" / f"{i}.png", image[0].numpy())
    return tmp_path / "digits", to_model_range(images)


SOURCES = {"sketch": {}, "semantic": {}, "lowres": {"factor": 4}, "inpaint": {"masks": ["box", "free_form"]}}


def test_conditions_from_real_digits_are_what_training_derives(digits):
    folder, images = digits
    read, maps = conditions_from(folder, SOURCES, 28, 1, seed=7)
    expected = spatial.derive(images, SOURCES, spatial.sample_seeds(7, torch.arange(3)))
    torch.testing.assert_close(read, images, rtol=0, atol=0)
    assert maps.keys() == expected.keys() == SOURCES.keys()
    for source, map_ in expected.items():
        torch.testing.assert_close(maps[source], map_, rtol=0, atol=0, msg=source)


def test_derived_conditions_written_as_files_read_back_the_same(digits, tmp_path):
    """The file formats: a sketch PNG, an index PNG, a 7x7 PNG, and images with masks (white = fill)."""
    folder, images = digits
    maps = conditions_from(folder, SOURCES, 28, 1, seed=7)[1]
    for i in range(3):
        write_png(tmp_path / "sketch" / f"{i}.png", maps["sketch"][i, 0].numpy() * 255)
        write_png(tmp_path / "semantic" / f"{i}.png", maps["semantic"][i].argmax(0).numpy())
        write_png(tmp_path / "lowres" / f"{i}.png", to_uint8(maps["lowres"][i, 0, ::4, ::4]).numpy())
        write_png(tmp_path / "mask" / f"{i}.png", (1 - maps["inpaint"][i, 1].numpy()) * 255)
    for source in ("sketch", "semantic"):
        read = read_condition(source, tmp_path / source, 28, 1, SOURCES[source])
        torch.testing.assert_close(read, maps[source], rtol=0, atol=0, msg=source)
    lowres = read_condition("lowres", tmp_path / "lowres", 28, 1, SOURCES["lowres"])
    torch.testing.assert_close(
        lowres, maps["lowres"], rtol=0, atol=0.5 / 127.5 + 1e-6
    )  # a PNG rounds to whole grey levels
    inpaint = read_condition("inpaint", folder, 28, 1, {}, mask=tmp_path / "mask")
    torch.testing.assert_close(inpaint, maps["inpaint"], rtol=0, atol=0)
