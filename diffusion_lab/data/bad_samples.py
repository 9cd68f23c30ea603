"""The bad-sample policy of captioned data (data.on_bad_sample), the same for both formats.

`raise` stops with a DataError naming the sample; `skip` leaves it out, logs a summary per pass and
lists it in `<run folder>/bad_samples.txt`. Loader workers find bad images in their own processes:
each batch carries the ones its items skipped (under `_bad`), and the loaders below move them into
the main process's `BadSamples`.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from torch.utils.data import DataLoader

from diffusion_lab.data.loaders import ResumableDataLoader
from diffusion_lab.errors import DataError

log = logging.getLogger("diffusion_lab")
SKIP_HINT = "Fix or remove it, or set data.on_bad_sample=skip to leave bad samples out."


class BadSample(Exception):
    """One sample that cannot be used; the message says why (it follows the sample's name)."""


class BadSamples:
    """The bad samples met so far (name → reason), shared by a DataModule's datasets.

    Workers find bad images in their own processes, so they send them along with the batch and the
    loader adds them here, in the main process. Rank 0 writes `bad_samples.txt`; another rank writes
    `bad_samples.rank<r>.txt` only for the lazily found ones that may differ between ranks.
    """

    def __init__(self, policy: str):
        self.policy, self.entries, self.root, self.rank = policy, {}, None, 0
        self.eager = self.reported = 0  # how many were found at setup, and at the last report

    def fail(self, name: str, err: BadSample) -> None:
        if self.policy == "raise":
            raise DataError(f"{name} {err}. {SKIP_HINT}")
        self.entries.setdefault(name, str(err))

    def report(self, when: str, again: bool = True) -> None:
        """Log a summary and rewrite the list: on rank 0 (others: only lazily found ones), and unless
        `again`, only when something new was found since the last report."""
        if not self.entries or (self.rank and len(self.entries) == self.eager):
            return
        if not again and len(self.entries) == self.reported:
            return
        self.reported = len(self.entries)
        names = ", ".join(itertools.islice(self.entries, 5)) + (", ..." if len(self.entries) > 5 else "")
        path = None
        if self.root is not None:
            path = Path(self.root) / (
                "bad_samples.txt" if not self.rank else f"bad_samples.rank{self.rank}.txt"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{k}: {v}\n" for k, v in self.entries.items()))
        log.warning(
            "data.on_bad_sample=skip: %d bad sample(s) left out (%s): %s%s",
            len(self.entries), when, names, f"; all listed in {path}" if path else "",
        )  # fmt: skip


class _Reporting:
    """Loader mixin: take the skipped samples out of each batch into the main process's `BadSamples`,
    summarise them after each pass, and turn a worker's wrapped DataError back into its one line."""

    def __iter__(self):
        bad = self.dataset.bad
        try:
            for batch in super().__iter__():
                for name, reason in batch.pop("_bad"):
                    bad.entries.setdefault(name, reason)
                yield batch
        except DataError as err:
            raise DataError(str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        finally:  # also when Lightning stops early (limit_train_batches) and drops the iterator
            train = getattr(self.dataset, "train", False)
            bad.report("after a train pass" if train else "after a val pass", again=train)


class TrainLoader(_Reporting, ResumableDataLoader):
    """The imagefolder train loader: resumable mid-epoch (see loaders.py)."""


class EvalLoader(_Reporting, DataLoader):
    """Validation loaders, and the webdataset train loader (a stream: nothing to resume)."""
