"""A run's end as data (`status.json`), and a Hydra multirun as the jobs it was to run and how each ended.

Every command's entry wrapper (`diffusion_lab.cli`) writes `status.json` into its run folder when it
ends: {"status": "ok" | "failed" | "interrupted", "error": the error's class name or null, "message": its
one line or null, "step": the global step training stopped at, or null}. A sweep is `<sweep>/multirun.yaml`
(the composed config, written when the sweep starts) and one folder `<sweep>/<N>/` per job that started;
the jobs it was to run come from that record, so a job that never ran is counted as `missing`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode

from diffusion_lab.errors import ConfigError, DataError, Interrupted
from diffusion_lab.utils import checks

STATUS_FILE = "status.json"
STATUSES = ("ok", "interrupted", "failed", "nan", "missing")
EXAMPLE = "sweep=outputs/train/multiruns/<time>"


# ---------------------------------------------------------------------------------------------------------
# One run's end
# ---------------------------------------------------------------------------------------------------------


def write_status(folder: Path, error: BaseException | None = None, message: str | None = None) -> None:
    """Record in `folder` how the run ended: ok (no error), interrupted (a signal stopped it after saving
    a checkpoint to resume from) or failed."""
    status = "ok" if error is None else "interrupted" if isinstance(error, Interrupted) else "failed"
    record = {
        "status": status,
        "error": None if error is None else type(error).__name__,
        "message": message,
        "step": getattr(error, "step", None),
    }
    (Path(folder) / STATUS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_status(folder: Path) -> dict | None:
    """A run's status.json, or None when the run left no record of its end (never ran, still running,
    killed). A folder from before status.json existed and holding an `error.txt` counts as failed, with
    that file's first line as the message (the line is for people: its wording is never parsed)."""
    path, error_txt = Path(folder) / STATUS_FILE, Path(folder) / "error.txt"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            return {"status": "failed", "error": None, "message": f"{STATUS_FILE} is not valid JSON ({err})"}
    if error_txt.is_file():
        message = (error_txt.read_text().strip().splitlines() or ["(error.txt is empty)"])[0]
        return {"status": "failed", "message": message}
    return None


# ---------------------------------------------------------------------------------------------------------
# The jobs of a sweep
# ---------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, str]:
    """`+model.lr=1e-3` → ("model.lr", "1e-3"); Hydra's `+`/`++`/`~` prefixes don't change the key."""
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value


@dataclass
class Job:
    name: str
    overrides: dict[str, str]
    metrics: dict | None = None  # None: no metrics.json
    record: dict | None = None  # its status.json (read_status); None: no record of an end
    evaluation: dict | None = None  # a dlab-eval job's eval.json; None: none

    @property
    def status(self) -> str:
        ended = (self.record or {}).get("status")
        if ended not in (None, "ok"):
            return ended
        if self.metrics is None:
            return "missing" if ended is None else "ok"
        return "nan" if self.non_finite else "ok"

    @property
    def non_finite(self) -> list[str]:
        return [k for k, v in (self.metrics or {}).items() if checks.is_number(v) and not math.isfinite(v)]

    @property
    def message(self) -> str:
        if self.status in ("failed", "interrupted"):
            return self.record.get("message") or self.record.get("error") or ""
        return f"not finite: {', '.join(self.non_finite)}" if self.status == "nan" else ""


def _read_job(folder: Path, overrides: dict[str, str]) -> Job:
    hydra_overrides = folder / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        overrides = dict(parse_override(o) for o in yaml.safe_load(hydra_overrides.read_text()) or [])
    metrics, record = _read_result(folder / "metrics.json", read_status(folder))
    evaluation, record = _read_result(folder / "eval.json", record)
    return Job(folder.name, overrides, metrics, record, evaluation)


def _read_result(path: Path, record: dict | None) -> tuple[dict | None, dict | None]:
    """(what a job's metrics.json or eval.json holds, or None without one; its record, failed when the file
    is not valid JSON)."""
    if not path.is_file():
        return None, record
    try:  # json reads the NaN / Infinity that json.dump writes for non-finite floats
        return json.loads(path.read_text()), record
    except json.JSONDecodeError as err:  # e.g. a job killed while writing: report it, not crash
        if (record or {}).get("status") in (None, "ok"):
            record = {"status": "failed", "message": f"{path.name} is not valid JSON ({err})"}
        return None, record


def _grid(sweeper: dict, task: list[str]) -> list[dict[str, str]] | None:
    """Every combination of the sweep's discrete values (`a=1,2`, `choice(...)`, `range(...)`), in the
    order Hydra's basic sweeper runs them; None for values it cannot list (an interval, a glob)."""
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides([*params, *task])
        (grid,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException:
        return None
    return [dict(parse_override(o) for o in job) for job in grid]


def planned_jobs(sweep: Path) -> list[dict[str, str]] | None:
    """The overrides of each job the sweep was to run, read from its multirun.yaml: the grid of Hydra's
    basic sweeper, or the `n_trials` of a sweeper that picks each job's values as it goes (Optuna: known
    once a job starts; a grid sampler stops at the grid's size). None without a record that says."""
    path = Path(sweep) / "multirun.yaml"
    record = yaml.safe_load(path.read_text()) if path.is_file() else None
    hydra = (record or {}).get("hydra") or {}
    sweeper, task = hydra.get("sweeper") or {}, (hydra.get("overrides") or {}).get("task") or []
    n_trials = sweeper.get("n_trials")
    if isinstance(n_trials, int):
        on_a_grid = str((sweeper.get("sampler") or {}).get("_target_")).endswith("GridSampler")
        grid = _grid(sweeper, task) if on_a_grid else None
        return [{} for _ in range(n_trials if grid is None else min(n_trials, len(grid)))]
    return _grid(sweeper, task) if str(sweeper.get("_target_", "")).endswith(".BasicSweeper") else None


def load_jobs(sweep: str | Path) -> list[Job]:
    """The jobs of a multirun folder, sorted by job number: those that started (a folder `<N>/`) and,
    from the sweep's multirun.yaml, those that never did."""
    root = Path(sweep)
    if not root.is_dir():
        raise ConfigError(f"sweep={sweep}: no such folder. Expected a Hydra multirun folder, e.g. {EXAMPLE}")
    planned = dict(enumerate(planned_jobs(root) or []))
    started = {d.name: d for d in root.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()}
    names = {*started, *(str(n) for n in planned)}
    if not names:
        raise DataError(
            f"sweep={sweep}: the folder holds no jobs; expected <sweep>/<N>/.hydra/overrides.yaml "
            f"(pass the folder of one sweep, the one that holds multirun.yaml, e.g. {EXAMPLE})"
        )

    def number(name: str):  # 10 sorts after 9; non-numeric names last
        return (not name.isdigit(), int(name) if name.isdigit() else 0, name)

    overrides = {str(n): o for n, o in planned.items()}
    return [_read_job(root / name, overrides.get(name, {})) for name in sorted(names, key=number)]


def summary(jobs: list[Job]) -> str:
    """`5 jobs: 1 ok, 1 interrupted, 1 failed, 1 nan, 1 missing`."""
    counts = Counter(j.status for j in jobs)
    return f"{len(jobs)} jobs: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)


def sweeper_optimises() -> bool:
    """Whether this Hydra job's sweeper uses the value the task returns: every sweeper but the basic
    grid (Optuna, Nevergrad, Ax)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return not str(HydraConfig.get().sweeper.get("_target_", "")).endswith(".BasicSweeper")
