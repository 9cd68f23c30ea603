"""Argument checks that commands run before any work, each failing with the key, the value and an example."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_lab.errors import ConfigError


def is_int(value) -> bool:
    """A whole number, and not a bool (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_at_least(cfg: DictConfig, key: str, example: int, least: int, what: str) -> int:
    value = OmegaConf.select(cfg, key)  # also a dotted key: data.batch_size
    if not is_int(value) or value < least:
        raise ConfigError(f"{key}={value!r}: expected {what}, e.g. {key}={example}")
    return value


def positive_int(cfg: DictConfig, key: str, example: int) -> int:
    return _int_at_least(cfg, key, example, 1, "a positive whole number")


def optional_positive_int(cfg: DictConfig, key: str, example: int) -> int | None:
    return None if cfg.get(key) is None else positive_int(cfg, key, example)


def non_negative_int(cfg: DictConfig, key: str, example: int) -> int:
    return _int_at_least(cfg, key, example, 0, "a whole number >= 0")


def as_list(value) -> list:
    return list(value) if isinstance(value, ListConfig | list | tuple) else [value]


def guidance_scales(cfg: DictConfig, key: str = "guidance") -> list[float | dict[str, float]]:
    """One number or a list of numbers >= 0 (0 unconditional, 1 conditional, > 1 guided); or, for a model
    with several conditions, one scale per condition, `{sketch: 1.5, text: 3}`, where a list per condition
    (`{sketch: [1, 2], text: [1, 3]}`) asks for every combination (a grid, in the order written)."""
    value = cfg.get(key)
    if isinstance(value, DictConfig | dict):
        return _per_condition_scales(key, value)
    scales = as_list(value)
    if not scales or not all(is_number(s) and s >= 0 for s in scales):
        raise ConfigError(
            f"{key}={value!r}: expected a number >= 0 or a list of them, e.g. {key}=2 or {key}=[1,3], or "
            f"one per condition, e.g. {key}='{{sketch: 1.5, text: 3}}'"
        )
    return [float(s) for s in scales]


def _per_condition_scales(key: str, value) -> list[dict[str, float]]:
    per_name = {str(name): as_list(scales) for name, scales in value.items()}
    if not per_name or not all(s and all(is_number(x) and x >= 0 for x in s) for s in per_name.values()):
        raise ConfigError(
            f"{key}={OmegaConf.to_container(value) if isinstance(value, DictConfig) else value!r}: expected "
            f"one scale >= 0 (or a list of them) per condition, e.g. {key}='{{sketch: 1.5, text: 3}}'"
        )
    grid = [{}]
    for name, scales in per_name.items():
        grid = [point | {name: float(s)} for point in grid for s in scales]
    return grid


def guidance_form(cfg: DictConfig, key: str = "guidance_form") -> str:
    """How per-condition scales combine: `nested` (InstructPix2Pix) or `independent` (composable diffusion)."""
    form = cfg.get(key, "nested")
    if form not in ("nested", "independent"):
        raise ConfigError(
            f"{key}={form!r}: expected nested (ε(∅) + s₁(ε(c₁) − ε(∅)) + s₂(ε(c₁,c₂) − ε(c₁))) or "
            "independent (ε(∅) + Σ sᵢ(ε(cᵢ) − ε(∅)))"
        )
    return form


def optional_guidance_scales(cfg: DictConfig, key: str = "guidance") -> list[float] | None:
    """null (the checkpoint's own scale, known once it loads) or what `guidance_scales` accepts."""
    return None if cfg.get(key) is None else guidance_scales(cfg, key)


# The interval that `guidance_interval=null` stands for (every step guided), as samples.npz and eval.json record it.
EVERY_STEP = (0.0, math.inf)


def guidance_interval(cfg: DictConfig, key: str = "guidance_interval") -> tuple[float, float] | None:
    """null (guide every step) or [σ_lo, σ_hi] with 0 <= σ_lo < σ_hi (σ_hi may be inf)."""
    value = cfg.get(key)
    if value is None:
        return None
    bounds = as_list(value)
    numbers = all(is_number(b) for b in bounds)
    if len(bounds) != 2 or not numbers or not 0 <= bounds[0] < bounds[1]:
        raise ConfigError(
            f"{key}={value!r}: expected [σ_lo, σ_hi], the noise levels σ = √((1 − ᾱ)/ᾱ) between which "
            f"guidance is applied, with 0 <= σ_lo < σ_hi, e.g. {key}=[0.3,5] or [2,inf] (null: every step)"
        )
    return float(bounds[0]), float(bounds[1])


def class_labels(cfg: DictConfig, key: str = "labels") -> list[int] | None:
    """null (balanced over the classes), one label, or a list of whole numbers (the class encoder checks
    that they are classes of the model)."""
    if cfg.get(key) is None:
        return None
    labels = as_list(cfg.get(key))
    if not labels or not all(is_int(v) and v >= 0 for v in labels):
        raise ConfigError(
            f"{key}={cfg.get(key)!r}: expected class labels (whole numbers from 0), "
            f"e.g. {key}=3 or {key}=[3,7] (or {key}=null for all classes)"
        )
    return labels


def prompts(cfg: DictConfig) -> list[str] | None:
    """`prompts=` (one string or a list) or `prompts_file=` (a text file, one prompt a line); None if neither."""
    if cfg.get("prompts") is not None and cfg.get("prompts_file") is not None:
        raise ConfigError("give prompts= or prompts_file=, not both")
    if cfg.get("prompts_file") is not None:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"prompts_file={path}: no such file; expected a text file with one prompt a line"
            )
        found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not found:
            raise ConfigError(f"prompts_file={path} holds no prompt; expected one prompt a line")
        return found
    if cfg.get("prompts") is None:
        return None
    found = [str(p).strip() for p in as_list(cfg.prompts)]
    example = "e.g. prompts='[\"a thick seven\"]'"
    if not found:
        raise ConfigError(f"prompts=[]: the list is empty; give at least one caption, {example}")
    if not all(found):
        raise ConfigError(f"prompts={cfg.prompts!r}: holds an empty caption; give text for each, {example}")
    return found


def writable_dir(path: str | Path, key: str = "out") -> Path:
    """Create `path` if needed and prove that files can be written there, before the slow part."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(
            f"{key}={path}: cannot write there ({err.strerror}). Pick a folder you can write to."
        ) from err
    return path
