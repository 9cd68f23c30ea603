"""`dlab-train-evaluator`: its argument checks, the accuracy bar it enforces, and the installed command
reusing a cached classifier while rebuilding the real statistics.

The classifier is trained once per machine by the `cache_dir` session fixture (tests/conftest.py).
"""

from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.classifier import evaluator_dir
from diffusion_lab.train_evaluator import train_evaluator
from tests.conftest import DATA_DIR, run_cli


def test_zero_epochs_is_a_clear_error(tmp_path):
    cfg = OmegaConf.create({"paths": {"cache_dir": str(tmp_path), "data_dir": str(DATA_DIR)},
                            "retrain": True, "classifier": {"epochs": 0}})  # fmt: skip
    with pytest.raises(ConfigError, match="classifier.epochs=0: expected a positive whole number"):
        train_evaluator(cfg)


def test_accuracy_below_the_bar_fails_loudly(cache_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(evaluator_dir(cache_dir), evaluator_dir(cache))
    proc = run_cli(
        "dlab-train-evaluator", "min_accuracy=1.01", cwd=tmp_path, env={"DLAB_CACHE_DIR": str(cache)}
    )
    assert proc.returncode == 1
    assert "min_accuracy=1.01" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reuses_the_cache_and_reports_accuracy(cache_dir, tmp_path):
    """The installed `dlab-train-evaluator`, from an empty folder, on a copy of the cache."""
    cache = tmp_path / "cache"
    shutil.copytree(evaluator_dir(cache_dir), evaluator_dir(cache))
    (evaluator_dir(cache) / "real_features_mnist_test.pt").unlink()  # must be rebuilt
    cwd = tmp_path / "empty"
    cwd.mkdir()
    proc = run_cli("dlab-train-evaluator", "floor_sizes=[500]", cwd=cwd, env={"DLAB_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert "Evaluator classifier test accuracy: 0.99" in proc.stdout
    assert "FID floor at N=500" in proc.stdout
    assert (evaluator_dir(cache) / "real_features_mnist_test.pt").is_file()
    assert list((cwd / "outputs" / "evaluator" / "runs").glob("*/.hydra/config.yaml"))
