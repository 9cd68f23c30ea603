"""`dlab-report sweep=<multirun folder>`: one table and comparison plots for a Hydra multirun.

    dlab-report sweep=outputs/train/multiruns/<time>                # writes to outputs/report/runs/<time>_<pid>
    dlab-report sweep=outputs/train/multiruns/<time> out=reports/conditioning

The jobs are those the sweep was to run, read from `<sweep>/multirun.yaml` (the grid of the basic
sweeper, or an Optuna search's n_trials), plus any job folder `<sweep>/<N>/` found. Each holds Hydra's
`.hydra/overrides.yaml`, `status.json` (how it ended, written by the entry wrapper `diffusion_lab.cli`)
and, if training finished, `metrics.json`. Writes to the run folder `report.md` and `report.csv` (one row
per job: status, message, every override key, every metric) and `plots/<metric>.png`: bars per job
labelled by the overrides that vary, or, when exactly two keys vary (e.g. conditioning × schedule), bars
grouped by the first key and coloured by the second.
A job's status is `ok`, `interrupted` (stopped by a signal after saving `interrupted.ckpt`: running the
same command into the same folder resumes it), `failed` (any other error), `nan` (a metric is NaN or
infinite), or `missing` (no record of an end: never ran, still running, or killed without a trace).
A job from before status.json existed counts as failed if it left an `error.txt`.

A `dlab-eval -m` sweep (jobs holding eval.json) gives a row per job and guidance key, the scores as columns,
the provenance that varies (N, sampler, steps, NFE, EMA, guidance kind, ...) as columns and the rest as a
line under the table (metrics/eval_records.py). Scores by different feature extractors or against
different reference sets are refused with one line; a score whose N differs from the column's is starred.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from omegaconf import DictConfig

from diffusion_lab.cli import hydra_app
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.eval_records import STAR, eval_rows
from diffusion_lab.utils import checks
from diffusion_lab.utils.plots import plt
from diffusion_lab.utils.sweeps import EXAMPLE, Job, load_jobs, summary

CELL_WIDTH = 80  # longer Markdown cells (error messages) are cut; report.csv keeps them whole


def _finite(value) -> bool:
    return checks.is_number(value) and math.isfinite(value)


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
    """(header, rows) with columns job, status, message, override keys, metric keys."""
    keys = _ordered_keys(j.overrides for j in jobs)
    metrics = _ordered_keys(j.metrics or {} for j in jobs)
    header = ["job", "status", "message", *keys, *metrics]
    rows = [
        [
            j.name,
            j.status,
            j.message,
            *(j.overrides.get(k, "") for k in keys),
            *(_fmt((j.metrics or {}).get(m)) for m in metrics),
        ]
        for j in jobs
    ]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        text = text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 1] + "…"
        return text.replace("|", r"\|") if text else "—"

    def line(cells):
        return "| " + " | ".join(cell(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]) + "\n"


def star_scores(jobs: list[Job], rows: list[list[str]], starred: list[bool]) -> list[list[str]]:
    """`table`'s rows with a star after each metric of a starred row (Markdown only: the CSV keeps numbers)."""
    first = 3 + len(_ordered_keys(j.overrides for j in jobs))  # job, status, message, overrides, metrics
    return [
        [cell + STAR if star and i >= first and cell else cell for i, cell in enumerate(row)]
        for row, star in zip(rows, starred, strict=True)
    ]


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def finite_jobs(jobs: list[Job], metric: str) -> list[Job]:
    """The jobs to draw a bar for: a NaN or infinite value would be an empty gap or break the y axis."""
    return [j for j in jobs if _finite((j.metrics or {}).get(metric))]


def plot_metric(jobs: list[Job], metric: str, path: Path) -> Path:
    """Bar chart of one metric over the jobs where it is a finite number (see the module docstring)."""
    done = finite_jobs(jobs, metric)
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


def write_report(sweep: str | Path, out: str | Path) -> dict:
    """Write report.md, report.csv and plots/*.png into `out`;
    returns {"markdown", "summary", "md", "csv", "plots", "jobs": the table's rows}."""
    jobs = load_jobs(sweep)
    counts, starred, notes = summary(jobs), [False] * len(jobs), []
    if any(j.evaluation is not None for j in jobs):  # a dlab-eval sweep: a row per job and guidance key
        evaluated = eval_rows(jobs, sweep)
        jobs, starred, notes = evaluated.rows, evaluated.starred, evaluated.notes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(jobs)
    md = markdown(header, star_scores(jobs, rows, starred)) + "".join(f"\n{line}\n" for line in notes)
    (out / "report.md").write_text(f"# Report: {Path(sweep).resolve()}\n\n{md}\n{counts}\n")
    with open(out / "report.csv", "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    plotted = [m for m in _ordered_keys(j.metrics or {} for j in jobs) if finite_jobs(jobs, m)]
    plots = [
        plot_metric(jobs, m, out / "plots" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', m)}.png") for m in plotted
    ]
    return {"markdown": md, "summary": counts, "md": out / "report.md", "csv": out / "report.csv",
            "plots": plots, "jobs": jobs}  # fmt: skip


def run(cfg: DictConfig) -> dict:
    # Checked here rather than with Hydra's `???`, whose MissingMandatoryValue does not say what to pass.
    if cfg.sweep is None or str(cfg.sweep).strip() == "":
        raise ConfigError(f"sweep=<multirun folder> is required, e.g. dlab-report {EXAMPLE}")
    out = checks.writable_dir(cfg.paths.output_dir)
    result = write_report(str(cfg.sweep), out)  # str: `sweep=2024` would arrive as an int
    print(result["markdown"], end="")
    print(f"\n{result['summary']}")
    print(f"wrote report.md, report.csv and {len(result['plots'])} plot(s) to {out}")
    return result


@hydra_app("report")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
