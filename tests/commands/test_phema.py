"""dlab-phema and post_hoc_module on a tiny model from the real configs, whose snapshots the real callback
wrote in-process (no training): the rebuilt checkpoint loads like any other and holds reconstruct()'s
weights; known mistakes are one error naming the file or key."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.callbacks.post_hoc_ema import PostHocEMA, averaged_names, post_hoc_module
from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.inference import load_module
from diffusion_lab.phema import run
from diffusion_lab.utils.checkpoints import find_checkpoint
from diffusion_lab.utils.instantiate import build_module
from diffusion_lab.utils.post_hoc_ema import load_snapshots, reconstruct
from tests.conftest import run_cli

STEPS = 12


@pytest.fixture
def trained_run(compose_cfg, tmp_path) -> Path:
    """A run folder: snapshots at steps 4, 8, 12 of weights that move each step (a seeded random walk), and
    checkpoints/last.ckpt at step 12 holding the raw weights, as `dlab-train callbacks=post_hoc_ema` leaves."""
    cfg = compose_cfg("debug=tiny")
    module = build_module(cfg)
    run_dir = tmp_path / "run"
    callback = PostHocEMA(dirpath=str(run_dir / "post_hoc_ema"), every_n_steps=4)
    generator = torch.Generator().manual_seed(0)
    trained = dict(module.named_parameters())
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for name in averaged_names(module):
                trained[name].add_(0.05 * torch.randn(trained[name].shape, generator=generator))
        trainer = SimpleNamespace(global_step=step, fast_dev_run=False, is_global_zero=True)
        callback.on_train_batch_end(trainer, module)
    (run_dir / "checkpoints").mkdir()
    record = {"run_config": OmegaConf.to_container(cfg, resolve=True), "global_step": STEPS}
    torch.save(record | {"state_dict": module.state_dict()}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir


def _assert_holds_reconstruction(module, run_dir: Path, sigma_rel: float) -> None:
    expected, _ = reconstruct(load_snapshots(run_dir / "post_hoc_ema"), sigma_rel)
    state = module.state_dict()
    assert len(expected) == len(averaged_names(module)) > 10
    for name, value in expected.items():
        assert torch.equal(state[name], value), name


def test_post_hoc_module_loads_the_rebuilt_weights_beside_the_snapshots(trained_run):
    module, path = post_hoc_module(trained_run, 0.15, runs_dir=trained_run.parent)
    assert path == (trained_run / "post_hoc_ema" / "sigma_rel_0.15.ckpt").resolve()
    _assert_holds_reconstruction(module, trained_run, 0.15)
    raw = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    rebuilt = module.state_dict()
    assert all(not torch.equal(rebuilt[name], raw[name]) for name in averaged_names(module))
    entry = torch.load(path, weights_only=False)["post_hoc_ema"]
    assert entry["step"] == STEPS and entry["snapshots"] == [f"step_{s:07d}.pt" for s in (4, 8, 12)]
    assert entry["tracked"] == pytest.approx([0.05, 0.10])
    # The rebuilt file is not where a resume or `last` looks; rebuilding from it finds the same snapshots.
    assert find_checkpoint(str(trained_run), trained_run.parent).name == "last.ckpt"
    again, _ = post_hoc_module(path, 0.15, runs_dir=trained_run.parent)
    _assert_holds_reconstruction(again, trained_run, 0.15)


def test_dlab_phema_writes_a_checkpoint_per_length_that_loads_like_any_other(trained_run, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = run_cli("dlab-phema", f"ckpt_path={trained_run}", "sigma_rel=[0.03,0.2]", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    for sigma_rel in (0.03, 0.2):
        path = trained_run / "post_hoc_ema" / f"sigma_rel_{sigma_rel:g}.ckpt"
        assert f"sigma_rel {sigma_rel:g} " in result.stdout and str(path) in result.stdout
        module, _ = load_module(path)
        _assert_holds_reconstruction(module, trained_run, sigma_rel)
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_mistakes_name_the_key_or_the_file(compose_cfg, trained_run, tmp_path):
    def phema(*overrides):
        return run(compose_cfg(*overrides, f"paths.train_runs={tmp_path}/none", config_name="phema"))

    with pytest.raises(ConfigError, match=r"sigma_rel=0.3: .*0 < sigma_rel < 0.2887"):
        phema(f"ckpt_path={trained_run}", "sigma_rel=[0.1,0.3]")
    with pytest.raises(ConfigError, match="sigma_rel='a': expected a number or a list"):
        phema(f"ckpt_path={trained_run}", "sigma_rel=a")
    with pytest.raises(CheckpointError, match="ckpt_path=last: no run under"):
        phema("sigma_rel=0.1")

    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    (bare / "checkpoints" / "last.ckpt").write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(
        CheckpointError, match=r"bare/post_hoc_ema holds no post-hoc EMA snapshots.*callbacks=post_hoc_ema"
    ):
        phema(f"ckpt_path={bare}")

    early = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False) | {"global_step": 3}
    torch.save(early, trained_run / "early.ckpt")
    with pytest.raises(CheckpointError, match=r"early.ckpt is at step 3, before the first .* \(step 4\)"):
        phema(f"ckpt_path={trained_run / 'early.ckpt'}")

    (trained_run / "post_hoc_ema" / "step_0000008.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="step_0000008.pt is not a readable post-hoc EMA snapshot"):
        phema(f"ckpt_path={trained_run}")
