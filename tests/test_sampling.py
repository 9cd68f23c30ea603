"""The sampling path below the commands: seeded batches, the guidance a checkpoint names, the PNG preview."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import DEFAULT_GUIDANCE, generate_batched, guidance_for, pick_device
from diffusion_lab.sample import PREVIEW_IMAGES, preview_rows


class NoiseModule:
    """Stands in for DiffusionModule.generate: each image is the first draw of the batch's generator, so
    two images are equal exactly when their batches were seeded alike."""

    def __init__(self, run_config: dict | None = None):
        self.run_config = run_config

    def generate(self, inputs, guidance_scale, sampler, generator, guidance_interval=None):
        return torch.rand(len(inputs), 1, 4, 4, generator=generator) * 2 - 1  # (B, 1, 4, 4) in [-1, 1]


def batches(seed: int, n: int = 40, batch_size: int = 10) -> list[bytes]:
    images = generate_batched(NoiseModule(), torch.zeros(n), 1.0, None, batch_size, seed, progress=False)
    return [chunk.numpy().tobytes() for chunk in images.split(batch_size)]


# ---------------------------------------------------------------------------------------------- seeds


def test_no_two_batches_of_a_run_share_noise():
    drawn = batches(seed=0)
    assert len(set(drawn)) == len(drawn) == 4


def test_two_seeds_share_no_batch():
    """With batch k seeded `seed + k`, seed 1's first batch was seed 0's second."""
    seen = [b for seed in range(4) for b in batches(seed)]
    assert len(set(seen)) == len(seen) == 16


def test_an_image_does_not_depend_on_which_command_asks():
    # The same (seed, batch size) gives the same images, with or without a progress bar (commands show
    # one, the validation callbacks do not), and the first batches do not depend on how many follow.
    shown = generate_batched(NoiseModule(), torch.zeros(20), 1.0, None, 10, 5, progress=True)
    assert torch.equal(
        shown, generate_batched(NoiseModule(), torch.zeros(20), 1.0, None, 10, 5, progress=False)
    )
    assert torch.equal(shown, generate_batched(NoiseModule(), torch.zeros(40), 1.0, None, 10, 5, False)[:20])


# ---------------------------------------------------------------------------------------------- guidance


def test_guidance_asked_for_wins_over_the_runs_own():
    assert guidance_for(NoiseModule({"guidance": 1.35}), [1.0, 3.0]) == ([1.0, 3.0], "guidance 1, 3")


def test_without_guidance_the_checkpoint_names_its_own():
    assert guidance_for(NoiseModule({"guidance": 1.35}), None) == ([1.35], "guidance 1.35 (the run's own)")


def test_a_checkpoint_that_names_no_scale_gets_the_documented_default():
    scales, words = guidance_for(NoiseModule({"seed": 0}), None)
    assert scales == [DEFAULT_GUIDANCE] == [1.6]  # conf/train.yaml's default, the README's advice
    assert words == "guidance 1.6 (the default: the run names no scale)"


@pytest.mark.parametrize(
    ("experiment", "scale"),
    [("mnist_cpu", 1.6), ("mnist_best", 1.35), ("mnist_text_concat", 3.0), ("mnist_gpu", DEFAULT_GUIDANCE)],
)
def test_each_recipe_names_the_scale_it_samples_best_at(compose_cfg, experiment, scale):
    assert compose_cfg(f"experiment={experiment}").guidance == scale


# ---------------------------------------------------------------------------------------------- device


def test_a_device_this_machine_lacks_is_one_line_naming_device():
    with pytest.raises(ConfigError, match=r"^device='gpu': expected cpu, cuda, cuda:<index> or auto$"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device=cuda: this machine has no GPU"):
            pick_device("cuda")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"^device=cuda:{count}: this machine has {count} GPU"):
            pick_device(f"cuda:{count}")


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
