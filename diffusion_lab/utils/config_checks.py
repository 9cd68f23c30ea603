"""Config mistakes found before any data or model is built, each reported as one line naming the key.

- `check_run_config`: values a constructor's signature rules out (`trainer.max_steps=abc`), arguments it
  does not take, ranges no constructor checks (`data.batch_size=0`), and what the cheap parts refuse
  (schedule, sampler, optimizer: built once here on a dummy parameter, so `optimizer.lr=-1` fails now,
  not when training starts).
- `warn_unread_additions`: `+key=value` overrides that nothing reads.
- `check_user_config_files`: YAML syntax errors in a user's config folder (Hydra would print a traceback).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.utils import checks
from diffusion_lab.utils.checks import positive_int
from diffusion_lab.utils.instantiate import config_errors, config_path

log = logging.getLogger("diffusion_lab")

# Ranges no constructor checks when it is built (the mistake would surface once training starts), with
# an example of a good value.
POSITIVE_INTS = {"data.batch_size": 128}


def check_run_config(cfg: DictConfig) -> None:
    """Every check of a training config that needs no data and no model."""
    for path, node in instantiated_nodes(cfg):
        check_arguments(path, node)
    for key, example in POSITIVE_INTS.items():
        positive_int(cfg, key, example)
    check_cheap_parts(cfg)


# ---------------------------------------------------------------------------------------------------------
# Constructor signatures
# ---------------------------------------------------------------------------------------------------------


def instantiated_nodes(node: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """Every node with a `_target_` (nested ones too), with its path in the config."""
    if "_target_" in node:
        yield config_path(node, "?"), node
    for key in node:
        child = node.get(key)
        if isinstance(child, DictConfig):
            yield from instantiated_nodes(child)


def _signature(target: str) -> tuple[dict[str, inspect.Parameter], dict[str, object]] | None:
    """(parameters, resolved annotations) of a `_target_`; None when it cannot be read."""
    try:
        function = get_object(target)
        parameters = dict(inspect.signature(function).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None  # instantiate reports a target it cannot find, with its own message
    try:
        hints = typing.get_type_hints(function.__init__ if inspect.isclass(function) else function)
    except Exception:  # a forward reference to a name imported only for type checkers
        hints = {}
    return parameters, hints


def _accepts(annotation, value) -> bool | None:
    """Whether `value` fits a plain annotation (int, float, bool, str, None, Literal, unions of them);
    None where the annotation says nothing checkable (a class, a list, Any)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(arm, value) for arm in typing.get_args(annotation)]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return any(type(value) is type(option) and value == option for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return checks.is_int(value)
    if annotation is float:
        return checks.is_number(value)
    if annotation is str:
        return isinstance(value, str)
    return None


def _describe(annotation) -> str:
    """An annotation in words: `int | None` → "a whole number or null"."""
    words = {int: "a whole number", float: "a number", bool: "true or false", str: "text", type(None): "null"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_arguments(path: str, node: DictConfig) -> None:
    """Each key of an instantiated node must be an argument of its target, of a type it accepts."""
    found = _signature(str(node._target_))
    if found is None:
        return
    parameters, hints = found
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    target = str(node._target_).rsplit(".", 1)[-1]
    for key in (str(k) for k in node if not (str(k).startswith("_") and str(k).endswith("_"))):
        if key not in parameters:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, parameters, n=3)
            options = f"did you mean {' or '.join(close)}?" if close else f"it takes {', '.join(parameters)}"
            raise ConfigError(
                f"{path}.{key}: {target} takes no argument {key!r} ({options}). Fix or drop it."
            )
        value, annotation = node.get(key), hints.get(key)
        # In a partial, null marks an argument that the code supplies (lr_scheduler.total_steps).
        left_to_code = value is None and node.get("_partial_", False)
        if (
            left_to_code
            or isinstance(value, DictConfig | ListConfig)
            or annotation is None
            or _accepts(annotation, value) is not False
        ):
            continue
        default = parameters[key].default
        example = (
            f", e.g. {path}.{key}={default}" if _accepts(annotation, default) and default is not None else ""
        )
        raise ConfigError(f"{path}.{key}={value!r}: {target} expects {_describe(annotation)} here{example}")


# ---------------------------------------------------------------------------------------------------------
# The cheap parts, built once here so their complaints come before data and models
# ---------------------------------------------------------------------------------------------------------


def check_cheap_parts(cfg: DictConfig) -> None:
    """Build the schedule, the sampler on it, and the optimizer on one dummy parameter (all instant)."""
    with config_errors("schedule", cfg.schedule):
        schedule = instantiate(cfg.schedule)
    check_prediction_fits(schedule, cfg.module.prediction_type)
    with config_errors("sampler", cfg.sampler):
        instantiate(cfg.sampler)(schedule=schedule, prediction_type=cfg.module.prediction_type)
    with config_errors("optimizer", cfg.optimizer):
        instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])


def check_prediction_fits(schedule, prediction_type: str) -> None:
    """schedule=edm and prediction=edm go together: EDM's preconditioning is written in the σ of its own
    schedule, and its schedule's σ means nothing to an ε, x₀ or v target. An unknown prediction type (or a
    schedule of the user's that names none) is left to the sampler's constructor."""
    fits = getattr(schedule, "prediction_types", None)
    if fits is None or prediction_type in fits:
        return
    if prediction_type == "edm":
        raise ConfigError(
            f"prediction=edm (module.prediction_type) needs schedule=edm, whose noise level σ its "
            f"preconditioning reads; the schedule is {type(schedule).__name__}({schedule.extra_repr()}). "
            "Add schedule=edm, or choose prediction=epsilon, sample or v_prediction"
        )
    if "edm" in fits:
        raise ConfigError(
            f"schedule=edm needs prediction=edm (EDM's preconditioned denoiser), not module.prediction_type="
            f"{prediction_type!r}. Add prediction=edm"
        )


# ---------------------------------------------------------------------------------------------------------
# `+key=value` that nothing reads
# ---------------------------------------------------------------------------------------------------------


def unread_additions(cfg: DictConfig, overrides: list[str], groups: typing.Iterable[str]) -> list[str]:
    """The keys added with `+key=value` that no code reads: neither a config group (`+sampler=ddim`, which
    dlab-sample reads) nor under a node that is built (its constructor gets the key, and refuses one it
    does not take). Commands read their other keys from their own config, where `+` cannot add them."""
    unread = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if not override.is_add() or override.package is not None or key in groups:
            continue
        parts = key.split(".")
        prefixes = [".".join(parts[:n]) for n in range(1, len(parts))]
        built = any(
            isinstance(n := OmegaConf.select(cfg, p), DictConfig) and "_target_" in n for p in prefixes
        )
        if not built:
            unread.append(key)
    return unread


def warn_unread_additions(cfg: DictConfig) -> None:
    """Warn about `+key=value` overrides of this command that nothing reads (Hydra accepts any)."""
    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    unread = unread_additions(cfg, list(hydra.overrides.task), hydra.runtime.choices.keys())
    if unread:
        log.warning(
            "added keys that nothing reads (they change nothing): %s. Check their spelling and place; "
            "a key is read only under a node that is built (with a _target_), e.g. +trainer.<argument>=...",
            ", ".join(f"+{k}" for k in unread),
        )


# ---------------------------------------------------------------------------------------------------------
# YAML syntax in a user's config folder
# ---------------------------------------------------------------------------------------------------------


def user_config_folders(argv: list[str]) -> list[Path]:
    """The folders a command line adds to Hydra's search path: `hydra.searchpath=[file://...]` and
    `--config-dir`/`-cd`."""
    folders = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            folders.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            folders.append(arg.split("=", 1)[1])
        elif arg.startswith("hydra.searchpath="):
            with contextlib.suppress(Exception):  # Hydra reports a malformed override itself
                (override,) = OverridesParser.create().parse_overrides([arg])
                entries = override.value()
                entries = entries if isinstance(entries, list) else [entries]
                folders += [
                    str(e).removeprefix("file://") for e in entries if not str(e).startswith("pkg://")
                ]
    return [Path(f).expanduser() for f in folders]


def _line_column(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def check_user_config_files(argv: list[str]) -> None:
    """A config file in the user's folders that is not valid YAML: its file, line and column."""
    for folder in user_config_folders(argv):
        for path in sorted(folder.rglob("*.y*ml")) if folder.is_dir() else []:
            try:
                yaml.safe_load(path.read_text())
            except yaml.MarkedYAMLError as err:
                where = f"{path}, {_line_column(err.problem_mark)}" if err.problem_mark else str(path)
                begun = f" begun at {_line_column(err.context_mark)}" if err.context_mark else ""
                problem = re.sub(r"\s+", " ", f"{err.context or ''}{begun}: {err.problem or ''}").strip(" :")
                raise ConfigError(
                    f"{where}: not valid YAML ({problem}). Fix the file and run again."
                ) from err
