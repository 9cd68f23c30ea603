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

from diffusion_lab.metrics.classifier import EvaluatorMissingError, load_classifier
from diffusion_lab.utils import resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DATA_DIR = Path(os.environ.get("DLAB_DATA_DIR", ROOT.parent / "shared" / "data" / "mnist")).resolve()
CACHE_DIR = Path(os.environ.get("DLAB_CACHE_DIR", ROOT / ".cache" / "pytest")).resolve()
BIN_DIR = Path(sys.executable).parent  # the venv's console scripts

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
        resolvers.register()  # what the console scripts' entry wrapper does before composing
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
    command: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run an installed console script the way a user does: a subprocess from `cwd`, with only the
    data and cache folders set (plus PATH and HOME, which every shell has)."""
    return subprocess.run(
        [str(BIN_DIR / command), *args],
        cwd=cwd, env=user_env(env), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def user_env(extra: dict | None = None) -> dict:
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "DLAB_DATA_DIR": str(DATA_DIR),
        "DLAB_CACHE_DIR": str(CACHE_DIR),
        **(extra or {}),
    }


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A cache dir holding the trained MNIST evaluator: trained once per machine (about a minute)."""
    try:
        load_classifier(CACHE_DIR)
    except EvaluatorMissingError:
        result = run_cli("dlab-train-evaluator", cwd=tmp_path_factory.mktemp("evaluator"))
        assert result.returncode == 0, result.stderr[-3000:]
    return CACHE_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny training run through the CLI with every logger on: (cwd, run folder, process result)."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    result = run_cli("dlab-train", "debug=tiny", "logger=many", "trainer.max_epochs=2", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (cwd / "outputs" / "debug" / "runs").iterdir()
    return cwd, run_dir, result


@pytest.fixture(scope="session")
def captioned_mnist(tmp_path_factory) -> Path:
    """Captioned MNIST (200 train digits, 64 held out) written by the installed `dlab-make-captions`."""
    out = tmp_path_factory.mktemp("captions") / "captioned_mnist"
    result = run_cli("dlab-make-captions", "n=200", "n_val=64", f"out={out}", cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
