"""A sweep survives a failed job: each job records how it ended (status.json), the sweep goes on and ends
with a summary line and exit code 1, `dlab-report` counts the jobs from the sweep's own record, and an
Optuna search records a failed trial as FAIL. Real sweeps through the installed command, then units."""

from __future__ import annotations

import json
import logging
import math
import signal
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError, DivergedError, Interrupted
from diffusion_lab.train import first_validation_after, objective
from diffusion_lab.utils.sweep_callback import tell_optuna_nan_is_a_failed_trial
from diffusion_lab.utils.sweeps import load_jobs, planned_jobs, read_status, summary, write_status
from tests.conftest import run_cli

# Two training batches: lr=1e9 diverges at step 1 (step 0 runs at the warmup's lr of 0).
TINY = ["debug=tiny", "trainer.limit_train_batches=2"]
DIVERGED = "training diverged at step 1"


@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("dlab-train", "-m", *TINY, "optimizer.lr=1e-3,1e9,1e-3", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {DIVERGED}")
    assert (
        f"sweep {sweep}: 3 jobs: 2 ok, 0 interrupted, 1 failed, 0 nan, 0 missing (job 1 failed: {DIVERGED}"
        in (result.stderr)
    )
    assert [read_status(sweep / j)["status"] for j in "012"] == ["ok", "failed", "ok"]  # job 2 ran
    assert json.loads((sweep / "1" / "status.json").read_text()) == {
        "status": "failed", "error": "DivergedError", "step": 1,
        "message": (sweep / "1" / "error.txt").read_text().strip(),
    }  # fmt: skip
    assert (sweep / "2" / "metrics.json").is_file()

    report = run_cli("dlab-report", f"sweep={sweep}", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "3 jobs: 2 ok, 0 interrupted, 1 failed, 0 nan, 0 missing" in report.stdout


@pytest.mark.slow
def test_a_failed_optuna_trial_is_failed_and_the_search_goes_on(tmp_path):
    """Two trials, one after the other. With seed 0, the random sampler picks lr 1e9 (diverges), then
    1e-3: the failed trial is told FAIL, and the search goes on to the next."""
    result = run_cli(
        "dlab-train", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
        "optimizer.lr=choice(1e-3,1e9)", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", *TINY, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Optuna trial 0 failed (its job returned no value); the search goes on" in result.stdout
    (sweep,) = (tmp_path / "outputs" / "debug" / "multiruns").iterdir()
    jobs = [(j.status, j.overrides["optimizer.lr"]) for j in load_jobs(sweep)]
    assert jobs == [("failed", "1000000000.0"), ("ok", "0.001")]
    assert f"sweep {sweep}: 2 jobs: 1 ok, 0 interrupted, 1 failed, 0 nan, 0 missing" in result.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"optimizer.lr": 0.001}
    assert best["best_value"] == json.loads((sweep / "1" / "metrics.json").read_text())["val/loss"]


# ---------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------


def test_status_json_records_how_a_run_ended(tmp_path):
    write_status(tmp_path)
    assert read_status(tmp_path) == {"status": "ok", "error": None, "message": None, "step": None}
    write_status(tmp_path, DivergedError("diverged", step=3), "diverged")
    assert read_status(tmp_path) == {
        "status": "failed",
        "error": "DivergedError",
        "message": "diverged",
        "step": 3,
    }
    stopped = Interrupted(signal.SIGTERM, 120, tmp_path / "interrupted.ckpt", "dlab-train")
    write_status(tmp_path, stopped, str(stopped))
    assert read_status(tmp_path) == {"status": "interrupted", "error": "Interrupted", "message": str(stopped),
                                     "step": 120}  # fmt: skip
    write_status(tmp_path, ValueError("boom"), "ValueError: boom")
    assert read_status(tmp_path)["status"] == "failed" and read_status(tmp_path)["step"] is None


def _multirun_yaml(sweep, sweeper: dict, task: list[str]) -> None:
    sweep.mkdir(parents=True, exist_ok=True)
    record = {"hydra": {"sweeper": sweeper, "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(record))


def _job(sweep, num: int, overrides: list[str], metrics: dict | None) -> None:
    (sweep / str(num) / ".hydra").mkdir(parents=True)
    (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (sweep / str(num) / "metrics.json").write_text(json.dumps(metrics))
        write_status(sweep / str(num))


def test_a_job_that_never_ran_is_missing(tmp_path):
    """The jobs come from multirun.yaml: the basic sweeper's grid (its params and the command line's),
    in Hydra's order, or an Optuna search's n_trials; a job without a folder is missing."""
    grid = tmp_path / "grid"
    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": {"seed": "1,2"}}
    _multirun_yaml(grid, basic, ["debug=tiny", "schedule=linear,cosine"])
    assert planned_jobs(grid) == [
        {"seed": s, "debug": "tiny", "schedule": k} for s in ("1", "2") for k in ("linear", "cosine")
    ]
    _job(grid, 0, ["seed=1", "debug=tiny", "schedule=linear"], {"val/loss": 0.1})
    _job(grid, 3, ["seed=2", "debug=tiny", "schedule=cosine"], {"val/loss": 0.2})
    jobs = load_jobs(grid)
    assert [(j.name, j.status, j.overrides.get("seed"), j.overrides.get("schedule")) for j in jobs] == [
        ("0", "ok", "1", "linear"), ("1", "missing", "1", "cosine"),
        ("2", "missing", "2", "linear"), ("3", "ok", "2", "cosine"),
    ]  # fmt: skip
    assert summary(jobs) == "4 jobs: 2 ok, 0 interrupted, 0 failed, 0 nan, 2 missing"

    search = tmp_path / "optuna"
    optuna_sweeper = {
        "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        "n_trials": 3,
    }
    _multirun_yaml(search, optuna_sweeper, ["hparams_search=mnist_optuna"])
    _job(search, 0, ["optimizer.lr=0.001"], {"val/loss": 0.1})
    assert [j.status for j in load_jobs(search)] == ["ok", "missing", "missing"]
    grid_search = tmp_path / "optuna_grid"  # a grid sampler stops at the grid's size
    on_a_grid = {**optuna_sweeper, "sampler": {"_target_": "optuna.samplers.GridSampler"}}
    _multirun_yaml(grid_search, on_a_grid, ["debug=tiny", "optimizer.lr=choice(1e-3,1e9)"])
    assert planned_jobs(grid_search) == [{}, {}]


def test_a_nan_told_to_optuna_is_a_failed_trial_and_numbers_are_kept():
    import optuna  # only here: it takes seconds to import

    tell_optuna_nan_is_a_failed_trial()
    tell_optuna_nan_is_a_failed_trial()  # a second sweep in the same process: patched once
    study = optuna.create_study()
    failed, done, by_number = study.ask(), study.ask(), study.ask()
    study.tell(failed, values=[math.nan], state=optuna.trial.TrialState.COMPLETE)  # as the sweeper tells it
    study.tell(done, values=[0.5], state=optuna.trial.TrialState.COMPLETE)
    study.tell(by_number.number, 0.25)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert study.best_value == 0.25


def _trainer(**numbers) -> SimpleNamespace:
    """The numbers Lightning has counted by on_train_start (here: debug=tiny's, 3 batches an epoch)."""
    base = {"num_val_batches": [2], "limit_val_batches": 2, "val_check_batch": 3, "val_check_interval": 1.0,
            "num_training_batches": 3, "check_val_every_n_epoch": 1, "max_steps": -1, "max_epochs": 1,
            "accumulate_grad_batches": 1}  # fmt: skip
    return SimpleNamespace(**{**base, **numbers})


def test_a_run_that_would_end_before_its_first_validation_is_found_before_training():
    assert first_validation_after(_trainer()) is None  # debug=tiny validates at the end of its epoch
    assert first_validation_after(_trainer(max_steps=3)) is None  # the 3rd batch is the last, and validates
    assert "it trains 2 (trainer.max_steps=2" in first_validation_after(_trainer(max_steps=2))
    # experiment=mnist_cpu trainer.max_steps=3: validation every 1150 batches, counted over the run
    mnist_cpu = _trainer(val_check_batch=1150, val_check_interval=1150, check_val_every_n_epoch=None,
                         num_training_batches=844, max_steps=3, max_epochs=-1)  # fmt: skip
    assert "first validation would come after 1150 training batches, and it trains 3 " in (
        first_validation_after(mnist_cpu)
    )
    assert first_validation_after(_trainer(**{**vars(mnist_cpu), "max_steps": 1150})) is None
    # every 2nd epoch: the first validation is at batch 3 + 3
    assert first_validation_after(_trainer(check_val_every_n_epoch=2, max_epochs=2)) is None
    assert "after 6 training batches" in first_validation_after(
        _trainer(check_val_every_n_epoch=2, max_steps=5)
    )
    assert first_validation_after(_trainer(max_steps=2, accumulate_grad_batches=2)) is None  # 4 batches
    assert "no validation batch (trainer.limit_val_batches=0)" in first_validation_after(
        _trainer(num_val_batches=[0], limit_val_batches=0)
    )


def test_a_grid_sweep_that_did_not_log_the_optimized_metric_gets_a_warning(caplog):
    cfg = OmegaConf.create({"optimized_metric": "val/loss"})
    with caplog.at_level(logging.WARNING, logger="diffusion_lab"):
        assert objective({"train/loss": 0.3}, cfg, in_sweep=True, used_by_sweeper=False) is None
    assert "optimized_metric=val/loss: this run logged no such metric" in caplog.text
    assert "basic sweeper does not use it" in caplog.text
    with pytest.raises(ConfigError, match="optimized_metric=val/loss: this run logged no such metric"):
        objective({"train/loss": 0.3}, cfg, in_sweep=True, used_by_sweeper=True)
    assert objective({"val/loss": 0.2}, cfg, in_sweep=True, used_by_sweeper=False) == 0.2
