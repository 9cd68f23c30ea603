"""Resuming: refuse a checkpoint whose run config differs from the one asked for, before loading it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import ConfigError

# Keys a resume may change: how long and where to run, what to log. Everything else (model,
# schedule, condition, data, optimizer, seed, ...) defines the run and must match the checkpoint.
MAY_CHANGE = ("ckpt_path", "out", "paths", "trainer", "callbacks", "logger", "sampler", "test", "tags",
              "task_name", "data.data_dir", "data.download", "data.num_workers")  # fmt: skip


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        items = {}
        for key, value in node.items():
            items.update(_flatten(value, f"{prefix}{key}."))
        return items
    return {prefix[:-1]: node}


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def check_resume_config(saved: dict | None, cfg: DictConfig, path: Path) -> None:
    """Raise a ConfigError listing every key where `cfg` differs from the checkpoint's run config."""
    if not saved:
        return  # a checkpoint from before run configs were stored: nothing to compare
    before, now = _flatten(saved), _flatten(OmegaConf.to_container(cfg, resolve=True))
    differ = [
        k for k in sorted(before.keys() | now.keys()) if not _may_change(k) and before.get(k) != now.get(k)
    ]
    if differ:
        lines = "; ".join(f"{k}: {before.get(k, '<absent>')!r} in the checkpoint, {now.get(k, '<absent>')!r} now"
                          for k in differ[:8])  # fmt: skip
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise ConfigError(
            f"ckpt_path={path}: the checkpoint was trained with a different config: {lines}{more}. "
            "Resume with the run's own settings (drop or change these overrides; the original ones are in "
            f"{path.parent.parent / '.hydra' / 'overrides.yaml'}), or start a new run without ckpt_path."
        )
