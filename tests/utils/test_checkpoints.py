"""Finding checkpoints: where `ckpt_path=last` searches and says it did, what a truncated checkpoint's
error suggests instead, and the error for a model of the other kind than asked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.inference import conditions
from diffusion_lab.nets.encoders import ClassEncoder, LearnedTextEncoder
from diffusion_lab.utils.checkpoints import find_checkpoint, picked_line, read_checkpoint
from tests.conftest import assert_one_line_error, run_cli


def write(path: Path, mtime: float, truncated: bool = False) -> Path:
    """A checkpoint written at `mtime` (seconds since the epoch); `truncated` keeps its first half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    if truncated:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    os.utime(path, (mtime, mtime))
    return path


def test_last_says_where_it_searched(tmp_path):
    runs = tmp_path / "outputs" / "train" / "runs"
    write(runs / "a" / "checkpoints" / "last.ckpt", 1_000)
    newest = write(runs / "b" / "checkpoints" / "interrupted.ckpt", 2_000)
    assert find_checkpoint("last", runs) == newest
    assert picked_line("last", newest, runs) == f"ckpt_path=last: newest under {runs}: {newest}"
    assert picked_line(str(runs / "a"), runs / "a" / "checkpoints" / "last.ckpt", runs).endswith(
        f"newest in that run: {runs / 'a' / 'checkpoints' / 'last.ckpt'}"
    )
    with pytest.raises(CheckpointError, match=f"no run under {tmp_path / 'elsewhere'} .*searches only there"):
        find_checkpoint("last", tmp_path / "elsewhere")


def test_a_truncated_checkpoint_names_the_newest_intact_one_of_its_run(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    write(folder / "step_0000002.ckpt", 1_000)
    good = write(folder / "step_0000004.ckpt", 2_000)
    write(folder / "step_0000006.ckpt", 3_000, truncated=True)  # newer than `good`, but cut too
    bad = write(folder / "last.ckpt", 4_000, truncated=True)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(find_checkpoint(str(tmp_path / "run"), "unused"))
    message = str(caught.value)
    assert str(bad) in message and "truncated" in message
    assert f"newest intact checkpoint of the run is step_0000004.ckpt: pass ckpt_path={good}" in message

    good.unlink()
    (folder / "step_0000002.ckpt").unlink()
    with pytest.raises(CheckpointError, match="has no other intact checkpoint: pass a checkpoint of another"):
        read_checkpoint(bad)


@pytest.mark.parametrize(
    ("encoder", "labels", "prompts", "kind"),
    [
        (ClassEncoder(), None, ["a seven"], "class-conditional model"),
        (LearnedTextEncoder(dim=16, heads=2, layers=1), [3], None, "caption model"),
    ],
)
def test_a_model_of_the_other_kind_names_the_file_and_how_to_pick_another(
    tmp_path, encoder, labels, prompts, kind
):
    picked = tmp_path / "runs" / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as caught:
        conditions(encoder, labels, prompts, 4, checkpoint=picked)
    assert str(caught.value).startswith(f"{picked}: this is a {kind}")
    assert "pick another model with ckpt_path=<run folder or .ckpt>" in str(caught.value)


@pytest.mark.slow
def test_sample_names_the_picked_checkpoint_and_a_good_one_to_try(tiny_run, tmp_path):
    """The installed dlab-sample from an empty folder: `last` picks a class model for prompts=, then the
    run's last.ckpt is cut short and its run folder is asked for."""
    _, tiny_dir, _ = tiny_run
    run = tmp_path / "outputs" / "train" / "runs" / "a"
    good = run / "checkpoints" / "step.ckpt"
    good.parent.mkdir(parents=True)
    shutil.copy(tiny_dir / "checkpoints" / "last.ckpt", good)

    wrong_kind = run_cli("dlab-sample", 'prompts=["a thick seven"]', cwd=tmp_path)
    assert_one_line_error(
        wrong_kind, 2, f"{good}: this is a class-conditional model", "ckpt_path=<run folder"
    )
    assert f"ckpt_path=last: newest under {run.parent}: {good}" in wrong_kind.stdout + wrong_kind.stderr

    (run / "checkpoints" / "last.ckpt").write_bytes(good.read_bytes()[:100_000])  # newer and cut short
    truncated = run_cli("dlab-sample", f"ckpt_path={run}", cwd=tmp_path)
    assert_one_line_error(truncated, 1, "last.ckpt is not a readable", f"is step.ckpt: pass ckpt_path={good}")
