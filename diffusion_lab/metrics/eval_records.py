"""A `dlab-eval -m` sweep as rows for `dlab-report`: one per job and guidance key, its scores as columns.

Each job's eval.json holds a row of scores per guidance key and the provenance of them all
(metrics/provenance.py). Scores share a column only when every job was scored by the same feature extractor
against the same reference set (`comparable`); otherwise the report stops with one line naming two jobs and
what differs. Of the provenance, the values that differ between rows become columns (N, sampler, steps,
NFE, EMA, ...) and those that do not become one line under the table. A row whose N differs from the most
common N gets its scores starred (FID is biased upwards at small N: compare it with its own floor).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.provenance import comparable
from diffusion_lab.utils import checks
from diffusion_lab.utils.sweeps import Job

# A row's numbers that are not scores: N is a provenance column, the floor's N follows from it.
NOT_SCORES = {"n", "fid_real_floor_n"}
STAR = "*"


@dataclass
class EvalRows:
    rows: list[Job]  # one per job and guidance key (a job without eval.json: one row, no scores)
    starred: list[bool]  # per row: its N differs from the most common N
    notes: list[str] = field(default_factory=list)  # lines under the table


def scores(row: dict, results: dict) -> dict[str, float]:
    """The numbers of one guidance row in eval.json's order, each caption attribute's agreement, and each
    spatial score's real-data floor."""
    found = {k: v for k, v in row.items() if checks.is_number(v) and k not in NOT_SCORES}
    found |= {f"agreement_{k}": v for k, v in (row.get("attribute_agreement") or {}).items()}
    return found | {f"{k}_real_floor": v for k, v in (results.get("fidelity_real_floor") or {}).items()}


def _words(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def row_sets(results: dict) -> list[tuple[str | None, dict]]:
    """(post-hoc EMA σ_rel, or None for the checkpoint's own weights; {guidance key: row}) of an eval.json:
    its guidance sweep, then the same sweep on each post-hoc EMA length of `ema=`."""
    return [(None, results["guidance"]), *(results.get("ema") or {}).items()]


def provenance_columns(results: dict, key: str, sigma_rel: str | None = None) -> dict[str, str]:
    """What the scores of row `key` (of the weights post-hoc EMA rebuilt at `sigma_rel`, if given) depend on
    besides the extractor and the reference, as text; an eval.json from before provenance was recorded gives
    N, the sampler and the post-hoc length only."""
    record = results.get("provenance") or {}
    sampler = record.get("sampler") or results.get("sampler") or {}
    guidance, ema, checkpoint, code = (record.get(k) or {} for k in ("guidance", "ema", "checkpoint", "code"))
    if sigma_rel is not None:
        ema = {"kind": "post_hoc", "sigma_rel": sigma_rel}
    length = ema.get("decay", ema.get("sigma_rel"))
    columns = {
        "N": results["guidance"][key].get("n", results.get("n")),
        "sampler": sampler.get("name"),
        "steps": sampler.get("steps"),
        "NFE": (sampler.get("nfe") or {}).get(key),
        "EMA": " ".join(_words(v) for v in (ema.get("kind"), length) if v is not None) or None,
        "guidance kind": guidance.get("kind"),
        "interval": guidance.get("interval"),
        "form": guidance.get("form"),
        "guidance model": guidance.get("model"),
        "ckpt step": checkpoint.get("step"),
        "seed": record.get("seed"),
        "code": code.get("commit") and code["commit"][:8] + ("+dirty" if code.get("dirty") else ""),
    }
    return {name: _words(value) for name, value in columns.items()}


def _check_comparable(jobs: list[Job], sweep) -> None:
    reason = comparable({j.name: j.evaluation.get("provenance") for j in jobs if j.evaluation is not None})
    if reason is not None:
        raise ConfigError(
            f"sweep={sweep}: jobs {reason}: scores from different feature extractors or reference sets cannot "
            "share a column; re-run dlab-eval on these checkpoints with the same evaluator (paths.cache_dir, "
            "dlab-train-evaluator) and reference set"
        )


def _scored_by(jobs: list[Job]) -> str | None:
    """`scored by <extractor> against <reference>`, from the first job with a provenance (all agree)."""
    record = next((j.evaluation["provenance"] for j in jobs if (j.evaluation or {}).get("provenance")), None)
    if record is None:
        return None
    ext, ref = record["extractor"], record["reference"]
    return (
        f"Scored by {ext['name']} (feature dim {ext['feature_dim']}, sha256 {ext['sha256']:.8}…) against "
        f"{ref['name']} {ref.get('split', '')} ({ref['size']} images, sha256 {ref['sha256']:.8}…)"
    )


def eval_rows(jobs: list[Job], sweep) -> EvalRows:
    """The rows of a dlab-eval sweep (module docstring); a ConfigError when two jobs' scores cannot share a
    column. Varying provenance columns go into each row's `overrides`, after the job's own overrides."""
    _check_comparable(jobs, sweep)
    rows, columns = [], []
    for job in jobs:
        results = job.evaluation
        if results is None:  # failed, missing or interrupted: a row that says so
            rows.append(job)
            columns.append({})
            continue
        for sigma_rel, by_key in row_sets(results):
            for key, row in by_key.items():
                overrides = {**job.overrides, "guidance": key}
                rows.append(replace(job, overrides=overrides, metrics=scores(row, results)))
                columns.append(provenance_columns(results, key, sigma_rel))
    names = list(dict.fromkeys(name for c in columns for name in c))
    varying = [name for name in names if len({c.get(name) for c in columns if c}) > 1]
    rows = [
        replace(r, overrides={**r.overrides, **{k: c[k] for k in varying if k in c}})
        for r, c in zip(rows, columns, strict=True)
    ]
    notes = [line for line in [_scored_by(jobs)] if line]
    same = {k: v for k, v in next((c for c in columns if c), {}).items() if k not in varying and v}
    if same:
        notes.append("Every row: " + ", ".join(f"{k} {v}" for k, v in same.items()))
    counts = Counter(c["N"] for c in columns if c.get("N"))
    usual = counts.most_common(1)[0][0] if counts else None
    starred = [bool(c.get("N")) and c["N"] != usual for c in columns]
    if any(starred):
        notes.append(
            f"{STAR} N differs from the most common N ({usual}): FID is biased upwards at small N, so compare "
            "such a score with its own fid_real_floor, not down the column"
        )
    return EvalRows(rows, starred, notes)
