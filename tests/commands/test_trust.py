"""A run gives a right result or exits non-zero with one clear line: never a silent wrong one.

Each test drives a way a run can go wrong through the installed commands, as users run them.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tomllib
import torch

from diffusion_lab import report
from diffusion_lab.utils.checkpoints import find_checkpoint
from tests.conftest import BIN_DIR, ROOT, assert_one_line_error, run_cli, start_training, user_env

SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
HELP_KEYS = {  # what each command's --help must name, besides Hydra's listing of the whole config
    "dlab-train": ["ckpt_path=", "out=", "experiment="],
    "dlab-sample": [
        "ckpt_path=",
        "labels=",
        "prompts=",
        "prompts_file=",
        "guidance=",
        "guidance_interval=",
        "guidance_model=",
        "out=",
    ],
    "dlab-eval": [
        "ckpt_path=",
        "n=",
        "guidance=",
        "guidance_interval=",
        "guidance_model=",
        "ema=",
        "steps_sweep",
        "out=",
    ],
    "dlab-viz": ["plot=", "schedules", "forward", "trajectory", "ckpt_path=", "index=", "columns=", "out="],
    "dlab-report": ["sweep=", "out=", "failed"],
    "dlab-train-evaluator": ["retrain=", "paths.cache_dir="],
    "dlab-make-captions": ["n=", "n_val=", "phrasing=", "out="],
    "dlab-phema": ["ckpt_path=", "sigma_rel=", "callbacks=post_hoc_ema", "out="],
    "dlab-demo": ["ckpt_path=", "compare=", "host=", "port=", "127.0.0.1"],
}


def digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_has_help(script, tmp_path):
    result = run_cli(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    header = result.stdout.split("== Config")[0]  # the command's own header, before Hydra's key listing
    assert header.startswith(f"{script}: ")
    for key in HELP_KEYS[script]:
        assert key in header, key
    assert not list(tmp_path.iterdir())  # --help writes nothing


# ------------------------------------------------------------------------------------ checkpoints in


def test_sample_reads_ckpt_path_and_never_writes_into_the_training_run(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    record = digest(run_dir / ".hydra" / "config.yaml")
    result = run_cli("dlab-sample", f"ckpt_path={run_dir}", "n=10", "steps=2", "guidance=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"sampled 10 images from {run_dir}/checkpoints/" in result.stdout
    (out,) = (tmp_path / "outputs" / "sample" / "runs").iterdir()
    assert (out / "samples.npz").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert digest(run_dir / ".hydra" / "config.yaml") == record
    assert not list(run_dir.glob(".hydra/rerun_*"))


def test_hydra_full_error_adds_the_traceback(tmp_path):
    result = run_cli("dlab-sample", "ckpt_path=gone.ckpt", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "error: ckpt_path=gone.ckpt: no checkpoint at" in result.stderr


def test_debug_runs_are_never_picked_up_by_last(tmp_path):
    train = run_cli("dlab-train", "debug=fdr", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    assert not list(tmp_path.glob("outputs/**/*.ckpt"))
    sample = run_cli("dlab-sample", "ckpt_path=last", cwd=tmp_path)
    assert_one_line_error(sample, 1, "ckpt_path=last: no run under", "outputs/train/runs")


def test_truncated_checkpoint_names_the_file(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    ckpt = tmp_path / "outputs" / "train" / "runs" / "broken" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:100_000])
    result = run_cli("dlab-sample", cwd=tmp_path)  # ckpt_path=last
    assert_one_line_error(result, 1, str(ckpt), "truncated")


def test_non_finite_weights_are_refused(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name].fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    result = run_cli("dlab-sample", f"ckpt_path={tmp_path / 'nan.ckpt'}", cwd=tmp_path)
    assert_one_line_error(result, 1, "nan.ckpt has non-finite weights", name)
    assert not list(tmp_path.glob("outputs/**/samples.npz"))


# The checks that need the model (its classes, its schedule's length); the plain argument checks are
# tests/utils/test_checks.py's, in-process.
@pytest.mark.parametrize(("override", "key"), [("labels=[12]", "labels=[12]"), ("steps=5000", "steps=5000")])
def test_bad_sampling_arguments_fail_before_writing(tiny_run, tmp_path, override, key):
    _, run_dir, _ = tiny_run
    result = run_cli("dlab-sample", f"ckpt_path={run_dir}", override, "out=samples", cwd=tmp_path)
    assert_one_line_error(result, 2, key)
    assert "sampling (guidance" not in result.stdout  # no progress bar starts before the error
    assert not (tmp_path / "samples" / "samples.npz").exists()


def test_unwritable_out_fails_before_sampling(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    (tmp_path / "a_file").write_text("")
    result = run_cli("dlab-sample", f"ckpt_path={run_dir}", f"out={tmp_path / 'a_file' / 'x'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "a_file" in result.stderr and "sampling" not in result.stdout


def test_gpu_recipe_on_a_cpu_machine_says_how_to_run_it(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("dlab-train", "experiment=mnist_adaln", cwd=tmp_path)
    assert_one_line_error(result, 2, "needs a GPU", "experiment=mnist_adaln", "trainer=cpu")


# ------------------------------------------------------------------------------------ training runs


def test_divergence_stops_the_run_and_keeps_no_checkpoint(tmp_path):
    result = run_cli("dlab-train", "debug=tiny", "optimizer.lr=1e6", cwd=tmp_path)
    assert_one_line_error(result, 1, "training diverged at step", "optimizer.lr")
    (run_dir,) = (tmp_path / "outputs" / "debug" / "runs").iterdir()
    assert not list(run_dir.glob("checkpoints/*.ckpt")) and not (run_dir / "metrics.json").exists()
    assert "diverged" in (run_dir / "error.txt").read_text()


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    """Two commands started in the same second each get their own run folder (the pid is in its name)."""
    procs = [
        subprocess.Popen([str(BIN_DIR / "dlab-viz"), "plot=schedules", f"timesteps={t}"], cwd=tmp_path,
                         env=user_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for t in (10, 20)
    ]  # fmt: skip
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    runs = sorted((tmp_path / "outputs" / "viz" / "runs").iterdir())
    assert len(runs) == 2
    overrides = sorted(
        (r / ".hydra" / "overrides.yaml").read_text().split("timesteps=")[1].strip() for r in runs
    )
    assert overrides == ["10", "20"] and all((r / "schedules.png").is_file() for r in runs)


def test_failed_resume_names_the_keys_and_keeps_the_record(tiny_run, tmp_path):
    _, source, _ = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    before = {p.name: digest(p) for p in [*run_dir.glob(".hydra/*.yaml"), *run_dir.glob("checkpoints/*")]}
    result = run_cli("dlab-train", "debug=tiny", "model=unet_small", f"ckpt_path={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, 2, "different config", "model.channels", "[16, 32]")
    after = {p.name: digest(p) for p in [*run_dir.glob(".hydra/*.yaml"), *run_dir.glob("checkpoints/*")]}
    assert after == before  # no checkpoint added, the record of how the run was made untouched


def _start_training(tmp_path: Path) -> tuple[subprocess.Popen, list[str]]:
    """A long tiny run, a few steps in."""
    args = ["debug=tiny", "trainer.limit_train_batches=2000", "trainer.log_every_n_steps=1"]
    proc = start_training(*args, cwd=tmp_path)
    time.sleep(2)  # a few training steps
    return proc, args


def test_sigterm_saves_a_checkpoint_that_last_and_the_run_folder_find(tmp_path):
    proc, args = _start_training(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "debug" / "runs").iterdir()
    ckpt = run_dir / "checkpoints" / "interrupted.ckpt"
    assert "stopped by SIGTERM at step" in stderr and str(ckpt) in stderr and "Traceback" not in stderr
    assert report.load_jobs(run_dir.parent)[0].status == "interrupted"  # dlab-report: not "failed"
    assert find_checkpoint(str(run_dir), "unused") == ckpt
    assert find_checkpoint("last", run_dir.parent) == ckpt
    step = torch.load(ckpt, weights_only=False)["global_step"]
    assert step >= 1

    resumed = run_cli(
        "dlab-train", *args, f"trainer.max_steps={step + 2}", f"ckpt_path={run_dir}", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{step + 2}/{step + 2}" in resumed.stdout  # the progress bar counts steps across the resume
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step + 2
    assert list(run_dir.glob(".hydra/rerun_*/config.yaml"))  # the resume's config, beside the original


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    proc, _ = _start_training(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped by SIGINT" in stderr
    assert list(tmp_path.glob("outputs/debug/runs/*/checkpoints/interrupted.ckpt"))


@pytest.mark.slow
def test_a_bad_training_value_is_one_line_before_data_or_models_are_built(tmp_path):
    """Through the installed command, once; every kind of bad value is tests/utils/test_config_checks.py's."""
    result = run_cli("dlab-train", "debug=tiny", "optimizer.lr=-1", "+foo=1", cwd=tmp_path)
    assert_one_line_error(result, 2, "optimizer.lr=-1", "Invalid learning rate", "e.g. optimizer.lr=0.001")
    assert "instantiating datamodule" not in result.stdout
    assert "nothing reads (they change nothing): +foo." in result.stdout  # an added key that nothing reads


@pytest.mark.slow
def test_a_yaml_syntax_error_in_a_user_config_folder_is_one_line(tmp_path):
    experiment = tmp_path / "my_configs" / "experiment" / "my_exp.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text("# @package _global_\ntrainer:\n  max_steps: [1, 2\nseed: 3\n")
    search_path = f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]"
    result = run_cli("dlab-train", search_path, "experiment=my_exp", cwd=tmp_path)
    assert_one_line_error(result, 2, f"{experiment}, line 4, column 5: not valid YAML", "flow sequence")
