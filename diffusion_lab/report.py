"""`dlab-report <multirun dir> [--out DIR]`: one table and comparison plots for a Hydra multirun.

Each job folder `<multirun>/<N>/` holds `.hydra/overrides.yaml` (Hydra's list of `key=value` strings) and,
if training finished, `metrics.json` (a flat dict written by `dlab-train`). Writes to `--out` (default: the
multirun folder) `report.md` and `report.csv` (one row per job: status, every override key, every metric)
and `plots/<metric>.png`: bars per job labelled by the overrides that vary, or, when exactly two keys
vary (e.g. conditioning × schedule), bars grouped by the first key and coloured by the second.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MISSING = "missing"  # status of a job without metrics.json (failed or still running)


@dataclass
class Job:
    name: str
    overrides: dict[str, str]
    metrics: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.metrics else MISSING


def parse_override(text: str) -> tuple[str, str]:
    """`+model.lr=1e-3` → ("model.lr", "1e-3"); Hydra's `+`/`++`/`~` prefixes don't change the key."""
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value


def load_jobs(multirun_dir: str | Path) -> list[Job]:
    """The jobs of a multirun folder, sorted by job number."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a folder; pass a Hydra multirun folder such as outputs/train/multiruns/<time>"
        )
    folders = [d for d in root.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()]
    if not folders:
        raise FileNotFoundError(
            f"{root} holds no jobs: expected <multirun>/<N>/.hydra/overrides.yaml "
            f"(pass the folder of one sweep, the one that holds multirun.yaml)"
        )
    jobs = []
    for folder in sorted(
        folders, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name)
    ):
        overrides = dict(
            parse_override(o)
            for o in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
        )
        metrics_file = folder / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        jobs.append(Job(folder.name, overrides, metrics))
    return jobs


def _ordered_keys(dicts) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


def varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (absent counts as a value)."""
    return [
        k for k in _ordered_keys(j.overrides for j in jobs) if len({j.overrides.get(k) for j in jobs}) > 1
    ]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(jobs: list[Job]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) with columns job, status, override keys, metric keys."""
    keys = _ordered_keys(j.overrides for j in jobs)
    metrics = _ordered_keys(j.metrics for j in jobs)
    header = ["job", "status", *keys, *metrics]
    rows = [
        [
            j.name,
            j.status,
            *(j.overrides.get(k, "") for k in keys),
            *(_fmt(j.metrics.get(m)) for m in metrics),
        ]
        for j in jobs
    ]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", r"\|") if c else "—" for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def plot_metric(jobs: list[Job], metric: str, path: Path) -> Path:
    """Bar chart of one numeric metric over the finished jobs (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [j for j in jobs if isinstance(j.metrics.get(metric), int | float)]
    vary = varying_keys(jobs)
    if len(vary) == 2:  # grouped: x = values of the first key, one bar colour per value of the second
        k1, k2 = vary
        xs = list(dict.fromkeys(j.overrides.get(k1) for j in done))
        series = list(dict.fromkeys(j.overrides.get(k2) for j in done))
        width = 0.8 / len(series)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(xs) * len(series) + 2), 4.5))
        for i, s in enumerate(series):
            cell = {x: [j.metrics[metric] for j in done if j.overrides.get(k1) == x and j.overrides.get(k2) == s]
                    for x in xs}  # fmt: skip
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar(
                [x + offset for x in range(len(xs))], [_mean(cell[x]) for x in xs], width, label=f"{k2}={s}"
            )
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_xlabel(k1)
        ax.legend()
    else:  # one bar per job, labelled by the overrides that vary
        labels = [j.name + "".join(f"\n{k}={j.overrides.get(k, '')}" for k in vary) for j in done]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(done) + 2), 4.5))
        ax.bar(range(len(done)), [j.metrics[metric] for j in done])
        ax.set_xticks(range(len(done)), labels, fontsize=8)
    ax.set(ylabel=metric, title=metric)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def write_report(multirun_dir: str | Path, out: str | Path | None = None) -> dict:
    """Write report.md, report.csv and plots/*.png; returns {"markdown", "md", "csv", "plots", "jobs"}."""
    jobs = load_jobs(multirun_dir)
    out = Path(out or multirun_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(jobs)
    md = markdown(header, rows)
    (out / "report.md").write_text(f"# Report: {Path(multirun_dir).resolve()}\n\n{md}")
    with open(out / "report.csv", "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    numeric = [m for m in _ordered_keys(j.metrics for j in jobs)
               if any(isinstance(j.metrics.get(m), int | float) for j in jobs)]  # fmt: skip
    plots = [
        plot_metric(jobs, m, out / "plots" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', m)}.png") for m in numeric
    ]
    return {"markdown": md, "md": out / "report.md", "csv": out / "report.csv", "plots": plots, "jobs": jobs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dlab-report", description=__doc__.split("\n")[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun folder (holds <N>/.hydra/overrides.yaml)")
    parser.add_argument(
        "--out", default=None, help="where to write the report (default: the multirun folder)"
    )
    args = parser.parse_args(argv)
    try:
        result = write_report(args.multirun_dir, args.out)
    except FileNotFoundError as err:
        parser.error(str(err))  # exit code 2 with the reason, no traceback
    print(result["markdown"], end="")
    print(f"\nwrote report.md, report.csv and {len(result['plots'])} plot(s) to {result['md'].parent}")


if __name__ == "__main__":
    main()
