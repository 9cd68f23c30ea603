"""Building objects from configs: one logged `instantiate` whose complaints name the config key, and the
LightningModule of a run config."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_lab.errors import ConfigError, UserError

log = logging.getLogger("diffusion_lab")


def config_path(node: DictConfig, fallback: str) -> str:
    """Where `node` sits in the run config (`trainer`, `callbacks.sample_grid`)."""
    return node._get_full_key(None) or fallback  # OmegaConf has no public spelling of this


def _is_hydra_key(key) -> bool:
    return str(key).startswith("_") and str(key).endswith("_")  # _target_, _partial_, ...


def _scalars(node: DictConfig, prefix: str = "") -> dict[str, object]:
    """The node's plain values by their key under it (nested nodes flattened, lists and `_target_` & co.
    left out)."""
    found = {}
    for key in (k for k in node if not _is_hydra_key(k)):
        value = node.get(key)
        if isinstance(value, DictConfig):
            found.update(_scalars(value, f"{prefix}{key}."))
        elif not isinstance(value, ListConfig):
            found[f"{prefix}{key}"] = value
    return found


def _mentioned(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w.])", text) is not None


def guilty_key(node: DictConfig, message: str) -> str | None:
    """The one key of `node` that a constructor's message is about: named in it, else the only key whose
    value it quotes (`Invalid learning rate: -1` is about `lr=-1`); None when that is not clear."""
    values = _scalars(node)
    named = [k for k in values if _mentioned(message, k.rsplit(".", 1)[-1])]
    quoted = [
        k
        for k, v in values.items()
        if v is not None and not isinstance(v, bool) and _mentioned(message, str(v))
    ]
    for candidates in (named, quoted):
        if len(candidates) == 1:
            return candidates[0]
    return None


def _default(node: DictConfig, key: str):
    """The target's own default for `key` (an example of a value it accepts), or None."""
    with contextlib.suppress(Exception):  # no target, or one whose signature cannot be read
        owner = OmegaConf.select(node, key.rsplit(".", 1)[0]) if "." in key else node
        parameter = inspect.signature(get_object(owner._target_)).parameters[key.rsplit(".", 1)[-1]]
        if isinstance(parameter.default, int | float | str):
            return parameter.default
    return None


def refused(path: str, node: DictConfig, err: Exception) -> ConfigError:
    """A constructor's ValueError/TypeError as one line naming the key, its value, and a value that works."""
    target = str(node.get("_target_", "?")).rsplit(".", 1)[-1]
    key = guilty_key(node, str(err))
    if key is None:
        return ConfigError(
            f"{path}: {target} refused its settings ({err}). "
            f"Check the values under {path} (`--cfg job --package {path}` prints them)."
        )
    example = _default(node, key)
    hint = f"; e.g. {path}.{key}={example}" if example is not None else "; check its spelling and value"
    return ConfigError(f"{path}.{key}={OmegaConf.select(node, key)!r} is refused by {target} ({err}){hint}")


@contextlib.contextmanager
def config_errors(path: str, node: DictConfig) -> Iterator[None]:
    """Turn a constructor's ValueError or TypeError (a value it rejects, an argument it lacks) into a
    ConfigError naming `path` and the key; errors written for users already (UserError) pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except (InstantiationException, ValueError, TypeError) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if isinstance(cause, UserError):
            raise cause from None  # its own message is the one line; Hydra's wrapping adds nothing
        if not isinstance(cause, ValueError | TypeError):
            raise
        raise refused(path, node, cause) from err


def build(name: str, node: DictConfig, **kwargs):
    """`hydra.utils.instantiate` that says what it built (the run log shows every object), and whose
    constructor complaints name the config key."""
    log.info("instantiating %s <%s>", name, node.get("_target_", "?"))
    with config_errors(config_path(node, name), node):
        return instantiate(node, **kwargs)


def _sampling_parts(cfg: DictConfig) -> dict:
    """What a module samples with: the net, the noise schedule, the condition encoder, the sampler."""
    return {
        "net": build("net", cfg.model),
        "schedule": build("schedule", cfg.schedule),
        "encoder": build("condition encoder", cfg.condition),
        "sampler": build("sampler", cfg.sampler),
    }


def build_module(cfg: DictConfig):
    """The DiffusionModule of a composed config, to train: with its optimizer and LR-schedule partials."""
    return build(
        "module",
        cfg.module,
        **_sampling_parts(cfg),
        optimizer=build("optimizer", cfg.optimizer),
        lr_scheduler=build("lr_scheduler", cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
    )


def build_sampling_module(cfg: DictConfig):
    """The DiffusionModule of a checkpoint's run config, to sample (`inference.load_module`): only the
    parts sampling reads, so neither the optimizer nor the LR schedule of the run is built."""
    return build("module", cfg.module, **_sampling_parts(cfg))
