"""The provenance of a score: everything an FID or an accuracy depends on, written beside it in eval.json.

An FID is only comparable with another computed by the same feature extractor against the same reference
set, and it moves with N (FID is biased upwards at small N), the sampler, its steps, the guidance and the
EMA. `provenance(...)` gathers one record from the parts below (each a plain function of plain values, so
`dlab-eval` calls them and a test can too), and `comparable` says why two records cannot share a column.

The extractor is identified by a sha256 of its weights: the state_dict's tensors in key order, each
preceded by its key, dtype and shape, hashed from their CPU bytes, so the same weights give the same hash in
any process and on any machine, and one changed weight gives another.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

import diffusion_lab
from diffusion_lab.utils.checkpoints import run_dir_of

GUIDANCE_KINDS = ("none", "cfg", "autoguidance")
# What must match for two scores to share a column: (label in the message, (part, key)).
IDENTITY = (
    ("extractor name", ("extractor", "name")),
    ("extractor feature_dim", ("extractor", "feature_dim")),
    ("extractor sha256", ("extractor", "sha256")),
    ("reference name", ("reference", "name")),
    ("reference split", ("reference", "split")),
    ("reference size", ("reference", "size")),
    ("reference sha256", ("reference", "sha256")),
)


# ---------------------------------------------------------------------------------------------------------
# Hashes: the extractor's weights, the reference images
# ---------------------------------------------------------------------------------------------------------


def digest(parts: Iterable[torch.Tensor | str], algorithm: str = "sha256") -> str:
    """Hex digest of `parts` in order: strings as UTF-8, tensors as their bytes on CPU in C order (any
    dtype, bfloat16 too), so equal values give equal digests on any device, process and machine."""
    h = hashlib.new(algorithm)
    for part in parts:
        if isinstance(part, str):
            h.update(part.encode())
        else:
            flat = part.detach().cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state_dict in key order, each tensor preceded by `key dtype shape` (module docstring)."""
    return digest(
        part
        for key, tensor in state_dict.items()
        for part in (f"{key} {tensor.dtype} {tuple(tensor.shape)}\n", tensor)
    )


def extractor_identity(evaluator) -> dict:
    """{name, feature_dim, sha256} of an evaluator's feature extractor (`fid.MNISTEvaluator.classifier`)."""
    classifier = evaluator.classifier
    return {
        "name": type(classifier).__name__,
        "feature_dim": classifier.feature_dim,
        "sha256": state_dict_sha256(classifier.state_dict()),
    }


def reference_identity(evaluator, n: int) -> dict:
    """The evaluator's reference set (`MNISTEvaluator.reference`: name, split, size, sha256 of its images,
    what the floor is measured against) and the real-vs-real FID floor at `n` (memoised by the evaluator)."""
    value, floor_n = evaluator.fid_real_floor(n)
    return {**evaluator.reference, "fid_real_floor": value, "fid_real_floor_n": floor_n}


# ---------------------------------------------------------------------------------------------------------
# The sampler and the guidance: NFE
# ---------------------------------------------------------------------------------------------------------


def model_calls(sampler: str, steps: int) -> int:
    """Sampling-loop calls per image for a sampler (its class or config name) and step count: one per step;
    Heun two (an Euler stage and its correction) except the last step, to σ = 0, which is Euler alone
    (EDM's Algorithm 1: 2·steps − 1)."""
    return 2 * steps - 1 if "heun" in sampler.lower() else steps


def guidance_passes(kind: str, scale: float | Mapping[str, float]) -> int:
    """Model evaluations per guided call (diffusion/guidance.py): 1 unguided; one scale s of CFG or of
    autoguidance: 1 at s = 1 (the model alone) and, for CFG, at s = 0 (the null pass alone), else 2 (CFG:
    conditional + null; autoguidance: the model + the weaker one); one scale per condition: 1 + one pass
    per scale, in both forms."""
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"guidance kind {kind!r}: expected one of {', '.join(GUIDANCE_KINDS)}")
    if kind == "none":
        return 1
    if isinstance(scale, Mapping):
        return 1 + len(scale)
    alone = (1.0,) if kind == "autoguidance" else (0.0, 1.0)
    return 1 if float(scale) in alone else 2


def nfe(
    sampler: str,
    steps: int,
    kind: str = "none",
    scale: float | Mapping[str, float] = 1.0,
    calls: int | None = None,
    guided_calls: int | None = None,
) -> int:
    """Model evaluations per image: `calls` sampling-loop calls (default `model_calls(sampler, steps)`), of
    which `guided_calls` (default all; fewer with a guidance interval) run `guidance_passes` each."""
    calls = model_calls(sampler, steps) if calls is None else calls
    guided = calls if guided_calls is None else guided_calls
    return calls + (guidance_passes(kind, scale) - 1) * guided


def sampler_record(name: str, steps: int, nfe_by_key: Mapping[str, int]) -> dict:
    """{name, steps, nfe: {guidance key: NFE}}: NFE differs per row (s = 1 skips the second pass)."""
    return {"name": name, "steps": steps, "nfe": dict(nfe_by_key)}


def guidance_record(
    kind: str,
    scales: Iterable[str],
    interval: tuple[float, float] | None = None,
    form: str | None = None,
    model: str | Path | None = None,
    model_step: int | None = None,
) -> dict:
    """{kind, scales (the rows' keys), interval (null: every step; JSON has no infinity: "inf"), form (per
    -condition scales), model and model_step (autoguidance's weaker model, else null)}."""
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"guidance kind {kind!r}: expected one of {', '.join(GUIDANCE_KINDS)}")
    bounds = None if interval is None else [b if b != float("inf") else "inf" for b in interval]
    return {"kind": kind, "scales": list(scales), "interval": bounds, "form": form,
            "model": None if model is None else str(model), "model_step": model_step}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The weights: EMA, checkpoint, code
# ---------------------------------------------------------------------------------------------------------


def ema_record(run_config: Mapping | None, sigma_rel: float | None = None) -> dict:
    """{kind: post_hoc, sigma_rel} for weights reconstructed by post-hoc EMA; else {kind: ema, decay} from
    the run config's `callbacks.ema` (the weights a checkpoint holds); else {kind: none} (raw weights)."""
    if sigma_rel is not None:
        return {"kind": "post_hoc", "sigma_rel": float(sigma_rel)}
    ema = ((run_config or {}).get("callbacks") or {}).get("ema")
    if ema:
        return {"kind": "ema", "decay": ema.get("decay")}
    return {"kind": "none"}


def checkpoint_record(path: str | Path, step: int | None) -> dict:
    """{path, step (the global step it was saved at), run (its run folder)}."""
    path = Path(path).resolve()
    return {"path": str(path), "step": step, "run": str(run_dir_of(path))}


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(folder: str | Path | None = None) -> dict:
    """{version: diffusion_lab.__version__, commit, dirty}: the commit and whether tracked files differ
    from it, when `folder` (default: the folder holding the package) is the top of a git checkout; else
    null for both (an installed wheel, no git, or a package inside someone else's repository)."""
    folder = Path(diffusion_lab.__file__).resolve().parents[1] if folder is None else Path(folder)
    top = _git(folder, "rev-parse", "--show-toplevel")
    commit = _git(folder, "rev-parse", "HEAD") if top and Path(top).resolve() == folder.resolve() else None
    dirty = _git(folder, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "version": diffusion_lab.__version__,
        "commit": commit,
        "dirty": None if dirty is None else bool(dirty),
    }


# ---------------------------------------------------------------------------------------------------------
# The record, and whether two can share a column
# ---------------------------------------------------------------------------------------------------------


def provenance(
    *,
    n: int,
    seed: int,
    batch_size: int,
    extractor: dict,
    reference: dict,
    sampler: dict,
    guidance: dict,
    ema: dict,
    checkpoint: dict,
    code: dict | None = None,
) -> dict:
    """The record beside a dlab-eval score (the parts from the functions above; `code` default
    `code_version()`). `seed` and `batch_size` together fix the images: batch k is drawn with
    `inference.batch_seed(seed, k)`."""
    return {"n": n, "seed": seed, "batch_size": batch_size, "extractor": extractor, "reference": reference,
            "sampler": sampler, "guidance": guidance, "ema": ema, "checkpoint": checkpoint,
            "code": code_version() if code is None else code}  # fmt: skip


def _shown(label: str, value) -> str:
    """A value for the one-line reason: hashes cut to their first 8 digits."""
    if value is None:
        return "none recorded"
    return f"{value:.8}…" if label.endswith("sha256") else str(value)


def comparable(records: Mapping[str, dict | None]) -> str | None:
    """None when every record (name → provenance, or None for an eval.json without one) has the same
    extractor and reference; else one line naming the first two that differ and how, e.g.
    `2 and 5: extractor sha256 ab12cd34… vs 9f3c0e11…`."""
    names = list(records)
    for label, (part, key) in IDENTITY:
        values = {name: ((records[name] or {}).get(part) or {}).get(key) for name in names}
        first = names[0] if names else None
        other = next((name for name in names if values[name] != values[first]), None)
        if other is not None:
            return f"{first} and {other}: {label} {_shown(label, values[first])} vs {_shown(label, values[other])}"
    return None
