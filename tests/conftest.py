"""Shared fixtures: real configs composed with Hydra's compose API, real MNIST, tmp outputs."""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.metrics.classifier import EvaluatorMissingError, load_classifier
from diffusion_lab.utils import resolvers
from diffusion_lab.utils.instantiate import build_module

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DATA_DIR = Path(os.environ.get("DLAB_DATA_DIR", ROOT.parent / "shared" / "data" / "mnist")).resolve()
CACHE_DIR = Path(os.environ.get("DLAB_CACHE_DIR", ROOT / ".cache" / "pytest")).resolve()
BIN_DIR = Path(sys.executable).parent  # the venv's console scripts
# Set in each pytest-xdist worker (`make test` runs the suite on two): "gw0", "gw1", ...
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")

# Two intra-op threads, or fewer under pytest-xdist so the workers together use no more threads than the
# machine has cores (on two cores, `make test`'s two workers run one thread each).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // WORKERS)))

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


def start_training(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`dlab-train args` as a user starts it, returned once its signal handlers are in place (it logs
    that line), so a test can interrupt it mid-training."""
    proc = subprocess.Popen([str(BIN_DIR / "dlab-train"), *args], cwd=cwd, env=user_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "interrupted.ckpt after the current step" in line or time.monotonic() > deadline:
            break
    return proc


def user_env(extra: dict | None = None) -> dict:
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "DLAB_DATA_DIR": str(DATA_DIR),
        "DLAB_CACHE_DIR": str(CACHE_DIR),
        **(extra or {}),
    }


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (pytest-xdist workers, or two test runs on one machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """A command that failed the way a known mistake must: exit `code`, no traceback, and one
    `error:` line that holds every needle."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    for needle in needles:
        assert needle in line, line


def once_per_session(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder that `make(folder)` fills once per test session: with pytest-xdist, the first worker to
    ask makes it in the session's common temp folder while the others wait on a lock, then all share it.
    A failure is recorded, so a worker that asks later fails with the same message instead of retrying."""
    if XDIST_WORKER is None:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # each worker's basetemp is root/popen-gwN
    folder, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
    with file_lock(root / f"{name}.lock"):
        if failed.exists():
            pytest.fail(f"{name} failed in another worker:\n{failed.read_text()}", pytrace=False)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                make(folder)
            except BaseException as error:
                failed.write_text(str(error)[-5000:])
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A cache dir holding the trained MNIST evaluator: trained once per machine (about a minute). The lock
    keeps xdist workers (and concurrent test runs) from training it twice into the same folder."""
    with file_lock(CACHE_DIR.parent / f".{CACHE_DIR.name}.lock"):
        try:
            load_classifier(CACHE_DIR)
        except EvaluatorMissingError:
            result = run_cli("dlab-train-evaluator", cwd=tmp_path_factory.mktemp("evaluator"))
            assert result.returncode == 0, result.stderr[-3000:]
    return CACHE_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny training run through the CLI with every logger on: (cwd, run folder, process result)."""

    def make(cwd: Path) -> None:
        result = run_cli("dlab-train", "debug=tiny", "logger=many", "trainer.max_epochs=2", cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = (cwd / "outputs" / "debug" / "runs").iterdir()
        record = {"args": result.args, "returncode": result.returncode, "stdout": result.stdout,
                  "stderr": result.stderr, "run_dir": str(run_dir)}  # fmt: skip
        (cwd.parent / f"{cwd.name}.json").write_text(json.dumps(record))

    cwd = once_per_session(tmp_path_factory, "tiny_run", make)
    record = json.loads((cwd.parent / f"{cwd.name}.json").read_text())
    run_dir = Path(record.pop("run_dir"))
    return cwd, run_dir, subprocess.CompletedProcess(**record)


@pytest.fixture(scope="session")
def captioned_mnist(tmp_path_factory) -> Path:
    """Captioned MNIST (200 train digits, 64 held out) written by the installed `dlab-make-captions`."""

    def make(folder: Path) -> None:
        out = folder / "captioned_mnist"
        result = run_cli("dlab-make-captions", "n=200", "n_val=64", f"out={out}", cwd=folder)
        assert result.returncode == 0, result.stderr[-3000:]

    return once_per_session(tmp_path_factory, "captions", make) / "captioned_mnist"


# What a test or fixture calls when it starts a process (an installed command, DDP ranks, a build).
STARTS_A_PROCESS = ("run_cli(", "start_training(", "subprocess.", "BIN_DIR", "_run(")


def _starts_a_process(function, seen: set | None = None) -> bool:
    """Whether `function` starts a process, itself or through a helper of its own test module."""
    seen = set() if seen is None else seen
    if function in seen:
        return False
    seen.add(function)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if any(call in source for call in STARTS_A_PROCESS):
        return True
    helpers = [
        function.__globals__.get(name)
        for name in getattr(getattr(function, "__code__", None), "co_names", ())
    ]
    return any(
        _starts_a_process(helper, seen)
        for helper in helpers
        if inspect.isfunction(helper) and helper.__module__ == function.__module__
    )


def pytest_collection_modifyitems(config, items):
    """Every test that starts a process, itself or through a fixture, is marked `slow`, so
    `pytest -m "not slow"` runs the unit tests alone; a test cannot forget the marker.

    Under pytest-xdist (`--dist loadgroup`, see pyproject.toml) tests go to whichever worker is free, so
    a module-scoped fixture (a built wheel, a training run) would be made once per worker: the tests that
    use one are kept together on one worker instead."""
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        defs = [d for name in info.names_closure for d in info.name2fixturedefs.get(name, ())]
        if _starts_a_process(getattr(item, "function", None)) or any(_starts_a_process(d.func) for d in defs):
            item.add_marker(pytest.mark.slow)
        if xdist and not item.get_closest_marker("xdist_group") and any(d.scope == "module" for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def untrained_run(folder: Path, *overrides: str) -> Path:
    """A run folder holding an untrained checkpoint of the real config with `overrides` (no training: the
    page only needs the model's shape and kind), written the way dlab-train writes one."""
    resolvers.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"paths.output_dir={folder}"])
    GlobalHydra.instance().clear()
    module = build_module(cfg)
    (folder / "checkpoints").mkdir(parents=True)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"run_config": run_config, "state_dict": module.state_dict(), "global_step": 0},
               folder / "checkpoints" / "last.ckpt")  # fmt: skip
    return folder
