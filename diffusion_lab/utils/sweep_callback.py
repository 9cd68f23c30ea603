"""The Hydra callback that gives every multirun a record when it starts and one summary line when it ends.

A job that fails inside a multirun prints its error line and returns NaN instead of ending the process
(`diffusion_lab.cli`), so the sweep goes on to its next job; this callback then says how the jobs ended
and makes the command exit 1 when any failed. It is listed under `callbacks:` in conf/hydra/default.yaml.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.utils.sweeps import load_jobs, summary

log = logging.getLogger("diffusion_lab")

# The sweeps of this process that had a job fail or stop: the entry point exits 1 after Hydra returns.
failed_sweeps: list[Path] = []


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Hydra's basic sweeper writes multirun.yaml as it starts (and writes it again); the Optuna
        # sweeper writes none. `dlab-report` counts the jobs a sweep was to run from it.
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")
        if "optuna" in str(config.hydra.sweeper._target_):
            tell_optuna_nan_is_a_failed_trial()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = load_jobs(sweep_dir)
        bad = [j for j in jobs if j.status != "ok"]
        line = f"sweep {sweep_dir}: {summary(jobs)}"
        if not bad:
            print(line, flush=True)
            return
        first = bad[0]
        more = f"; {len(bad) - 1} more: dlab-report sweep={sweep_dir}" if len(bad) > 1 else ""
        print(f"{line} (job {first.name} {first.status}: {first.message or 'no record'}{more})",
              file=sys.stderr, flush=True)  # fmt: skip
        failed_sweeps.append(sweep_dir)


def tell_optuna_nan_is_a_failed_trial() -> None:
    """Make `optuna.Study.tell(trial, values=[nan])` record the trial as FAIL, as Optuna 3 does.

    A workaround that patches a library, kept to this function: hydra-optuna-sweeper 1.2.0 (the newest
    release) tells Optuna each job's return value as a COMPLETE trial. Optuna 2.10 (which it requires)
    raises on NaN; the sweeper then tells FAIL and re-raises, which ends the whole search at its first
    failed trial (the same for a job that raised or returned None). Hydra's main branch has since added
    `max_failure_rate`, unreleased. A failed job returns NaN (cli.py): with this, its trial is FAIL, the
    sampler ignores it, and the search goes on. Drop it with a sweeper release that tolerates failures.
    """
    import optuna  # here, not at the top: it takes seconds to import, and only an Optuna sweep needs it

    tell = optuna.Study.tell
    if getattr(tell, "nan_is_a_failed_trial", False):
        return

    complete, fail = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL

    @functools.wraps(tell)
    def tell_nan_as_failed(study, trial, values=None, state=complete):
        told = values if isinstance(values, Sequence) else [values]
        if state == complete and any(isinstance(v, float) and math.isnan(v) for v in told):
            number = trial if isinstance(trial, int) else trial.number
            log.warning("Optuna trial %d failed (its job returned no value); the search goes on", number)
            return tell(study, trial, state=fail)
        return tell(study, trial, values=values, state=state)

    tell_nan_as_failed.nan_is_a_failed_trial = True
    optuna.Study.tell = tell_nan_as_failed
