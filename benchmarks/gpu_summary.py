"""One table for the recipe sweeps of `benchmarks/gpu_run.sh` (issue 10's default-recipe search).

    python benchmarks/gpu_summary.py <sweep folder> [<sweep folder> ...] --out recipes.md

Each job folder `<sweep>/<N>/` holds Hydra's `.hydra/overrides.yaml`, `metrics.json` (written by
`dlab-train`) and, once `dlab-eval ckpt_path=<job> out=<job>/eval` has run, `eval/eval.json`; further
evals of the same job (`out=<job>/eval_<anything>`, e.g. more guidance scales) are merged in. A job
stopped by a signal (its `error.txt` holds `Interrupted`'s message) is listed as interrupted, not failed:
running the same command into the same folder resumes it. For each job this picks the guidance scale
that meets the accuracy target with the lowest FID (else the most accurate one), prints one Markdown
row, writes the table (`--out`) and a JSON twin, and adds the chosen
figures to the job's `metrics.json` as `eval/*` keys, so `dlab-report sweep=<sweep>` tables and plots
them beside the training metrics.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from diffusion_lab.errors import Interrupted

TARGET_ACCURACY = 0.97  # issue 10: >= 97% conditional accuracy ...
TARGET_FID_FACTOR = 3.0  # ... and FID <= 3x the real-vs-real floor, at one guidance scale


def pick(guidance: dict, target_acc: float) -> tuple[str, dict] | None:
    """The guidance row that meets the accuracy target with the lowest FID, else the most accurate."""
    rows = [(g, r) for g, r in guidance.items() if math.isfinite(r.get("fid", math.nan))]
    if not rows:
        return None
    good = [(g, r) for g, r in rows if r["accuracy"] >= target_acc]
    if good:
        return min(good, key=lambda gr: gr[1]["fid"])
    return max(rows, key=lambda gr: (gr[1]["accuracy"], -gr[1]["fid"]))


def summarise_job(job: Path, target_acc: float, fid_factor: float) -> dict:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict = {"job": f"{job.parent.name}/{job.name}", "overrides": [str(o) for o in overrides]}
    metrics_path = job / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if (job / "error.txt").is_file():
        message = ((job / "error.txt").read_text().strip().splitlines() or [""])[0]
        if Interrupted.describes(message):  # a signal (a deadline, preemption): resumable, not broken
            step = message.split(" at step ")[1].split(";")[0] if " at step " in message else "?"
            row["status"] = f"interrupted at step {step} (rerun into the same folder to resume)"
        else:
            row["status"] = "failed: " + message[:160]
    elif metrics is None:
        row["status"] = "no metrics.json (unfinished)"
    else:
        row["status"] = "trained"
        row["val_loss"] = metrics.get("val/loss")
    eval_paths = sorted(job.glob("eval*/eval.json"))
    if not eval_paths:
        row["status"] += ", not evaluated"
        return row
    ev = {"guidance": {}, "seconds": 0.0}
    for path in eval_paths:  # one model, several dlab-eval runs (same N and floor): one guidance table
        part = json.loads(path.read_text())
        ev |= {k: v for k, v in part.items() if k not in ("guidance", "seconds")}
        ev["seconds"] += part.get("seconds") or 0.0
        ev["guidance"] |= part.get("guidance", {})
    ev["guidance"] = dict(sorted(ev["guidance"].items(), key=lambda gr: float(gr[0])))
    floor = ev.get("fid_real_floor")
    row |= {"n": ev.get("n"), "floor": floor, "eval_s": ev.get("seconds")}
    row["by_guidance"] = {g: {"fid": r["fid"], "accuracy": r["accuracy"]} for g, r in ev["guidance"].items()}
    chosen = pick(ev["guidance"], target_acc)
    if chosen is None:
        row["status"] += ", eval not finite"
        return row
    g, r = chosen
    ratio = r["fid"] / floor if floor else math.nan
    row |= {
        "guidance": float(g),
        "fid": r["fid"],
        "accuracy": r["accuracy"],
        "fid_over_floor": ratio,
        "meets_target": bool(r["accuracy"] >= target_acc and ratio <= fid_factor),
    }
    row["status"] += ", evaluated"
    if metrics is not None:  # dlab-report reads metrics.json: put the chosen eval figures beside val/loss
        metrics |= {
            "eval/fid": r["fid"],
            "eval/accuracy": r["accuracy"],
            "eval/guidance": float(g),
            "eval/fid_over_floor": ratio,
        }
        metrics_path.write_text(json.dumps(metrics, indent=2))
    return row


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict], common: set[str]) -> str:
    lines = [
        "| job | overrides | FID | × floor | accuracy | at guidance | all guidance: FID / acc. | val loss | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        all_g = ", ".join(
            f"{float(g):g}: {v['fid']:.1f} / {v['accuracy']:.3f}" for g, v in r.get("by_guidance", {}).items()
        )
        mark = " **✓**" if r.get("meets_target") else ""
        lines.append(
            f"| {r['job']} | `{' '.join(o for o in r['overrides'] if o not in common)}` | {fmt(r.get('fid'), '.2f')}{mark} "
            f"| {fmt(r.get('fid_over_floor'), '.2f')} | {fmt(r.get('accuracy'), '.3f')} "
            f"| {fmt(r.get('guidance'), 'g')} | {all_g} | {fmt(r.get('val_loss'), '.4f')} | {r['status']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path, help="multirun folders (hydra.sweep.dir)")
    ap.add_argument("--out", type=Path, default=None, help="Markdown table; a .json twin goes beside it")
    ap.add_argument("--target-accuracy", type=float, default=TARGET_ACCURACY)
    ap.add_argument("--fid-factor", type=float, default=TARGET_FID_FACTOR)
    args = ap.parse_args()
    rows = []
    for sweep in args.sweeps:
        if not sweep.is_dir():
            print(f"(no sweep folder {sweep})")
            continue
        jobs = [d for d in sweep.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()]
        for job in sorted(jobs, key=lambda d: int(d.name) if d.name.isdigit() else 10**9):
            rows.append(summarise_job(job, args.target_accuracy, args.fid_factor))
    floors = sorted({r["floor"] for r in rows if r.get("floor")})
    head = (
        f"Target: accuracy >= {args.target_accuracy} and FID <= {args.fid_factor:g}x floor at one guidance "
        f"scale (floor {', '.join(f'{f:.2f}' for f in floors) or '?'}); ✓ = met.\n\n"
    )
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    first = rows[0]["overrides"] if rows else []
    head += f"Every job: `{' '.join(o for o in first if o in common)}`\n\n"
    text = head + table(rows, common)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
