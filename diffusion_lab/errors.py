"""Errors a user can fix. The console scripts print them as one line, without a traceback
(`HYDRA_FULL_ERROR=1` shows it), and exit with `exit_code`. Each message names the key or file,
says what was expected, and says how to fix it."""

from __future__ import annotations

import signal
import sys
from typing import NoReturn


class UserError(Exception):
    """A known mistake or condition: bad input, a missing or broken file, a diverged run."""

    exit_code = 1
    step: int | None = None  # the global step training stopped at, where known (a run's status.json)


class ConfigError(UserError, ValueError):
    """A config value that cannot work (wrong type or range, a resume with a different model)."""

    exit_code = 2


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint that is missing, unreadable, not written by dlab-train, or could not be saved."""


class DataError(UserError, FileNotFoundError):
    """A data folder or file that is missing or corrupt."""


class DivergedError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Interrupted(UserError):
    """Training stopped on a signal after saving a checkpoint; exits 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint, resume_command: str):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}. "
            f"Resume with: {resume_command}"
        )
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


def exit_with(err: UserError) -> NoReturn:
    """How a command ends on a known mistake: its one line on stderr and its exit code."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)
