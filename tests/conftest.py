"""Shared fixtures: real configs composed with Hydra's compose API, real MNIST, tmp outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import diffusion_lab.utils.resolvers  # noqa: F401
from diffusion_lab.metrics.classifier import EvaluatorMissingError, load_classifier
from diffusion_lab.metrics.train_evaluator import train_evaluator

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DATA_DIR = Path(os.environ.get("DLAB_DATA_DIR", ROOT.parent / "shared" / "data" / "mnist")).resolve()

torch.set_num_threads(2)

# A random-weight CLIP text model small enough for unit tests (no weights can be downloaded here).
TINY_CLIP = {
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
CAPTIONS = ["a thin digit 3", "a bold seven leaning right", "zero", "a small 1"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.fail(f"real MNIST not found at {DATA_DIR}; set DLAB_DATA_DIR (see ../shared/data/README.md)")
    return DATA_DIR


@pytest.fixture
def compose_cfg(tmp_path, data_dir):
    """compose_cfg(*overrides, config_name="train") -> the real config, writing under tmp_path, on CPU."""

    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.paths.data_dir = str(data_dir)
            cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra  # the app never sees this node (Hydra keeps it apart), so neither do tests
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run a console entry point the way a user does (a subprocess), with offline W&B and real MNIST."""
    full_env = {
        **os.environ,
        "DLAB_DATA_DIR": str(DATA_DIR),
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def evaluator_cfg(cache_dir, *overrides: str) -> DictConfig:
    """The real `dlab-train-evaluator` config, caching under `cache_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "evaluator", overrides=[f"paths.cache_dir={cache_dir}", f"paths.data_dir={DATA_DIR}", *overrides]
        )


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A cache dir holding the trained MNIST evaluator: trained once per machine (about a minute)."""
    cache = Path(os.environ.get("DLAB_CACHE_DIR", ROOT / ".cache" / "pytest"))
    try:
        load_classifier(cache)
    except EvaluatorMissingError:
        train_evaluator(evaluator_cfg(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny training run through the CLI with every logger on: (cwd, run folder, process result)."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    result = run_cli("diffusion_lab.train", "debug=tiny", "logger=many", "trainer.max_epochs=2", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (cwd / "outputs" / "train" / "runs").iterdir()
    return cwd, run_dir, result
