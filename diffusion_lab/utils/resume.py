"""Resuming: refuse a checkpoint whose run config differs from the one asked for, before loading it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import ConfigError

# Keys a resume may change: how long and where to run, what to log, how to sample. Everything else (model,
# schedule, condition, data, optimizer, seed, ...) defines the run and must match the checkpoint.
MAY_CHANGE = ("ckpt_path", "out", "paths", "trainer", "callbacks", "logger", "sampler", "guidance", "test", "tags",
              "task_name", "data.data_dir", "data.download", "data.num_workers")  # fmt: skip


# How the message shows a key that only the other config has.
ABSENT = "<absent>"


def _flatten(node, prefix: str = "") -> dict:
    """Leaf values by dotted key; an empty node is a leaf (`{}`), so adding or removing one shows."""
    if isinstance(node, dict) and node:
        items = {}
        for key, value in node.items():
            items.update(_flatten(value, f"{prefix}{key}."))
        return items
    return {prefix[:-1]: node}


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def _shown(flat: dict, key: str) -> str:
    return repr(flat[key]) if key in flat else ABSENT


def check_resume_config(saved: dict | None, cfg: DictConfig, path: Path) -> None:
    """Raise a ConfigError listing every key where `cfg` differs from the checkpoint's run config."""
    if not saved:
        return  # a checkpoint from before run configs were stored: nothing to compare
    before, now = _flatten(saved), _flatten(OmegaConf.to_container(cfg, resolve=True))
    # Every key of either side: one added (even as null) or removed since the checkpoint differs too.
    differ = [
        k for k in sorted(before.keys() | now.keys())
        if not _may_change(k) and (k not in before or k not in now or before[k] != now[k])
    ]  # fmt: skip
    if differ:
        lines = "; ".join(f"{k}: {_shown(before, k)} in the checkpoint, {_shown(now, k)} now"
                          for k in differ[:8])  # fmt: skip
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise ConfigError(
            f"ckpt_path={path}: the checkpoint was trained with a different config: {lines}{more}. "
            "Resume with the run's own settings (drop or change these overrides; the original ones are in "
            f"{path.parent.parent / '.hydra' / 'overrides.yaml'}), or start a new run without ckpt_path."
        )
