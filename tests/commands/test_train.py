"""The training app end to end on real MNIST: every conditioning method, exact resume, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io import torch_io
from omegaconf import open_dict

from diffusion_lab.callbacks.checkpointing import VerifiedCheckpointIO
from diffusion_lab.errors import CheckpointError
from diffusion_lab.train import train
from diffusion_lab.utils.instantiate import build_module
from diffusion_lab.utils.post_hoc_ema import load_snapshots

FAST_DEV_RUNS = [
    # (conditioning, schedule, prediction, loss): each schedule and prediction varied at least once
    ("concat", "cosine", "v_prediction", "uniform"),
    ("cross_attn", "sigmoid", "sample", "min_snr"),
    ("adaln", "zero_terminal_snr", "v_prediction", "min_snr"),
    ("none", "linear", "epsilon", "uniform"),
]


@pytest.mark.parametrize(("conditioning", "schedule", "prediction", "loss"), FAST_DEV_RUNS)
def test_fast_dev_run_each_conditioning_method(compose_cfg, conditioning, schedule, prediction, loss):
    cfg = compose_cfg(
        "debug=tiny",
        "trainer.fast_dev_run=true",
        f"conditioning={conditioning}",
        f"schedule={schedule}",
        f"prediction={prediction}",
        f"loss={loss}",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def _run(compose_cfg, tmp_path, name, *overrides):
    cfg = compose_cfg(
        "debug=tiny",
        "trainer.limit_train_batches=3",
        "lr_scheduler.total_steps=6",  # both runs decay the LR over the same 6 steps
        "callbacks.sample_grid.every_n_epochs=100",
        "model.dropout=0.1",  # dropout masks must resume exactly too
        *overrides,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    return train(cfg)


def test_resume_continues_exactly(compose_cfg, tmp_path):
    post_hoc = ["callbacks=post_hoc_ema", "callbacks.post_hoc_ema.every_n_steps=2"]  # its averages resume too
    _run(compose_cfg, tmp_path, "straight", "trainer.max_epochs=2", *post_hoc)
    _run(compose_cfg, tmp_path, "resumed", "trainer.max_epochs=1", *post_hoc)
    first = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    _, objects = _run(
        compose_cfg, tmp_path, "resumed", "trainer.max_epochs=2", f"ckpt_path={first}", *post_hoc
    )
    assert objects["trainer"].global_step == 6

    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert straight["global_step"] == resumed["global_step"] == 6
    # `state_dict` holds the EMA weights, `current_model_state` the raw ones (Lightning's EMA callback).
    for key in ("state_dict", "current_model_state"):
        assert straight[key].keys() == resumed[key].keys()
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    # And the two copies differ, so the comparison above covered two different things.
    differs = [
        n for n, v in straight["state_dict"].items() if not torch.equal(v, straight["current_model_state"][n])
    ]
    assert differs
    for a, b in zip(*(c["callbacks"]["PostHocEMA"]["averages"] for c in (straight, resumed)), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    snapshots = [load_snapshots(tmp_path / run / "post_hoc_ema")[-1] for run in ("straight", "resumed")]
    assert snapshots[0]["step"] == snapshots[1]["step"] == 6
    for a, b in zip(*(s["averages"] for s in snapshots), strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def _step_losses(run_dir) -> dict[int, float]:
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as file:
            rows += [r for r in csv.DictReader(file) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def test_resume_from_a_mid_epoch_checkpoint_continues_exactly(compose_cfg, tmp_path):
    """10 steps straight against 5 steps, stop, resume to 10, inside one 20-batch epoch."""
    step_based = ["trainer.max_epochs=-1", "trainer.limit_train_batches=20", "trainer.val_check_interval=5",
                  "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=1",
                  "lr_scheduler.total_steps=10"]  # fmt: skip
    _run(compose_cfg, tmp_path, "straight", *step_based, "trainer.max_steps=10")
    _run(compose_cfg, tmp_path, "resumed", *step_based, "trainer.max_steps=5")
    first = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(first, weights_only=False)["global_step"] == 5  # mid-epoch: batch 5 of 20
    _run(compose_cfg, tmp_path, "resumed", *step_based, "trainer.max_steps=10", f"ckpt_path={first}")

    straight, resumed = _step_losses(tmp_path / "straight"), _step_losses(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == list(range(10))
    assert resumed == straight  # every step's loss, to the last bit
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")


def test_resume_from_missing_checkpoint_is_an_error(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=tiny", f"ckpt_path={tmp_path}/nowhere/last.ckpt")
    with pytest.raises(CheckpointError, match="nowhere"):
        train(cfg)


def test_a_checkpoint_that_was_not_written_fails_the_run(tmp_path, monkeypatch):
    """Lightning's writer can swallow a PermissionError; the verifying writer notices the missing file."""
    writer = VerifiedCheckpointIO()
    checkpoint = {"state_dict": {"w": torch.zeros(1000)}}
    monkeypatch.setattr(torch_io, "_atomic_save", lambda *args: None)
    with pytest.raises(CheckpointError, match="does not exist"):
        writer.save_checkpoint(checkpoint, str(tmp_path / "last.ckpt"))

    def truncated(checkpoint, path):
        torch.save(checkpoint, path)
        Path(path).write_bytes(Path(path).read_bytes()[:-500])

    monkeypatch.setattr(torch_io, "_atomic_save", truncated)
    with pytest.raises(CheckpointError, match="saving the checkpoint .*last.ckpt failed"):
        writer.save_checkpoint(checkpoint, str(tmp_path / "last.ckpt"))
    monkeypatch.undo()
    writer.save_checkpoint(checkpoint, str(tmp_path / "last.ckpt"))  # a whole file passes


def test_training_checkpoints_go_through_the_verifying_writer(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=tiny")
    _, objects = train(cfg)
    assert isinstance(objects["trainer"].strategy.checkpoint_io, VerifiedCheckpointIO)


def test_sample_grid_every_n_epochs_counts_from_one(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=tiny", "trainer.max_epochs=2", "callbacks.sample_grid.every_n_epochs=2")
    train(cfg)
    # 3 steps an epoch: the grid comes after the 2nd epoch (step 6), not after the 1st.
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000006.png"]


@pytest.mark.slow  # loads and scores the whole 10,000-image test split
def test_test_split_runs_after_fit(compose_cfg):
    cfg = compose_cfg("debug=tiny", "test=true", "data.batch_size=250", "+trainer.limit_test_batches=2")
    metrics, objects = train(cfg)
    assert metrics["test/loss"] > 0
    assert len(objects["datamodule"].test_set) == 10_000  # the official test split


def _training_noise(module, rank: int, batch: dict, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and timesteps that DDP rank `rank` draws for the first batch of training."""
    monkeypatch.setattr(type(module), "global_rank", property(lambda self: rank))
    drawn = {}
    add_noise = module.schedule.add_noise

    def recording_add_noise(x0, noise, t):
        drawn.update(noise=noise.clone(), t=t.clone())
        return add_noise(x0, noise, t)

    monkeypatch.setattr(module.schedule, "add_noise", recording_add_noise)
    module.on_train_batch_start(batch, 0)
    module.diffusion_loss(batch)
    return drawn["noise"], drawn["t"]


def test_each_ddp_rank_draws_its_own_reproducible_noise_and_timesteps(compose_cfg, monkeypatch):
    module = build_module(compose_cfg("debug=tiny"))
    batch = {"image": torch.zeros(16, 1, 28, 28), "label": torch.arange(16) % 10}
    rank0, rank0_again, rank1 = (_training_noise(module, r, batch, monkeypatch) for r in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank0_again, strict=True))  # reproducible
    assert not torch.equal(rank0[0], rank1[0])  # noise differs
    assert not torch.equal(rank0[1], rank1[1])  # timesteps differ
