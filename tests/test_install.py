"""A regular (non-editable) install: the wheel carries the configs, and `dlab-train` runs from any folder.

The wheel is built offline (`--no-build-isolation`, setuptools from the [dev] extra) and installed with
`pip install --target` into a scratch folder, then run with only that folder on PYTHONPATH, from an
empty working folder. PYTHONPATH comes before site-packages and before the venv's editable-install
finder (appended to sys.meta_path), so the checkout cannot shadow the wheel: the second test checks it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, ROOT

# Overrides for a real but tiny run: two optimiser steps (one epoch of two batches), one validation
# batch, then the checkpoints. CSV only: no W&B or TensorBoard files to write.
TINY_RUN = ["debug=tiny", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger=csv"]

# Top-level entries of a checkout that are not sources: left out of the copy the wheel is built from.
NOT_SOURCES = {".git", ".venv", ".cache", ".whl", "outputs", "multirun", "wandb", "lightning_logs"}
NOT_SOURCES |= {"data", "build", "dist", ".pytest_cache", ".ruff_cache"}


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == ROOT
    return {n for n in names if (top and n in NOT_SOURCES) or n == "__pycache__" or n.endswith(".egg-info")}


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The wheel built from (a copy of) this checkout, and the folder it is pip-installed into."""
    tmp = tmp_path_factory.mktemp("install")
    # A copy: building in place would leave build/ and *.egg-info in the checkout (stale files in
    # build/lib would even end up in the next wheel), and two test runs at once would share them.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)]
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("diffusion_lab-*.whl")
    site = tmp / "site"
    done = _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"src": src, "wheel": wheel, "site": site, "tmp": tmp}


def _env(installed: dict[str, Path]) -> dict[str, str]:
    """Only the installed wheel on the path; data from the shared MNIST copy; nothing online."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJECT_ROOT")}
    env.update(
        PYTHONPATH=str(installed["site"]),
        DLAB_DATA_DIR=str(DATA_DIR),
        DLAB_CACHE_DIR=str(installed["tmp"] / "cache"),
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
        HYDRA_FULL_ERROR="1",
    )
    return env


def _train(installed: dict[str, Path], cwd: Path, *overrides: str) -> Path:
    """Run the installed `dlab-train` console script in `cwd`; return the run folder it wrote."""
    script = installed["site"] / "bin" / "dlab-train"  # pip --target writes it, with this venv's python
    result = _run([str(script), *overrides], cwd=cwd, env=_env(installed))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The run folder's name is not this test's business: find it by its checkpoints.
    checkpoints = sorted(cwd.glob("outputs/**/checkpoints/*.ckpt"))
    assert checkpoints, f"no checkpoint under {cwd}/outputs: {sorted(cwd.rglob('*'))}"
    (run_dir,) = {c.parent.parent for c in checkpoints}
    return run_dir


def test_wheel_ships_every_module_and_config(installed):
    src, wheel = installed["src"], installed["wheel"]
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(src).as_posix() for p in (src / "diffusion_lab").rglob("*.py")}
    configs = {
        "diffusion_lab/conf/" + p.relative_to(src / "conf").as_posix() for p in (src / "conf").rglob("*.yaml")
    }
    assert "diffusion_lab/conf/train.yaml" in configs and "diffusion_lab/conf/debug/tiny.yaml" in configs
    assert not modules - names, "add the missing subpackage to [tool.setuptools] packages in pyproject.toml"
    assert {n for n in names if n.startswith("diffusion_lab/conf/")} == configs
    assert not [n for n in names if n.startswith("conf/")]  # inside the package, not a top-level `conf`
    metadata = zipfile.ZipFile(wheel).read("diffusion_lab-0.1.0.dist-info/METADATA").decode()
    assert "Requires-Dist: wandb" in metadata  # a core dependency, not only an extra


def test_the_wheel_not_the_checkout_is_imported(installed, tmp_path):
    code = "import diffusion_lab; print(diffusion_lab.__file__); print(diffusion_lab.CONFIG_DIR)"
    result = _run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed))
    assert result.returncode == 0, result.stderr[-3000:]
    module_file, config_dir = map(Path, result.stdout.splitlines())
    site = installed["site"].resolve()
    assert module_file.resolve().is_relative_to(site), module_file
    assert not module_file.resolve().is_relative_to(ROOT)
    assert Path(config_dir) == site / "diffusion_lab" / "conf"


def test_installed_dlab_train_runs_from_an_empty_folder(installed, tmp_path):
    run_dir = _train(installed, tmp_path, *TINY_RUN)
    assert run_dir.is_relative_to(tmp_path / "outputs")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_user_config_folder_adds_an_experiment(installed, tmp_path):
    """A user's own configs beside the packaged ones, through Hydra's search path (README recipe)."""
    user_conf = tmp_path / "my_conf"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: unet_tiny\ntags: [mine]\n"
    )
    cwd = tmp_path / "work"
    cwd.mkdir()
    run_dir = _train(installed, cwd, f"hydra.searchpath=[file://{user_conf}]", "experiment=my_exp", *TINY_RUN)
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "tags:\n- mine\n" in config
    assert "- experiment=my_exp" in (run_dir / ".hydra" / "overrides.yaml").read_text()
