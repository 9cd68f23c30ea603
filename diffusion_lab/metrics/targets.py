"""What `dlab-eval` asks a model for, and what each sample should then show.

A class model is asked for balanced labels. A caption model is asked for held-out captions of captioned
MNIST (the `val` metadata written by `dlab-make-captions`), each with the digit and the attribute classes
it describes, so samples can be scored for digit accuracy and for caption fidelity (`attributes.agreement`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_lab.condition import cycle
from diffusion_lab.errors import DataError
from diffusion_lab.metrics.attributes import ATTRIBUTES


@dataclass
class Targets:
    inputs: torch.Tensor | list[str]  # what the model is given: labels or captions
    digits: torch.Tensor  # (N,) the digit each sample should show
    attributes: dict[str, list[str]] | None = None  # caption models: the class each sample should show


def held_out_captions(path: str | Path) -> list[dict]:
    """The rows of a captioned-MNIST `metadata.jsonl` (or of the one in folder `path`), checked to carry
    `text`, `label` and every attribute column."""
    path = Path(path).expanduser()
    path = path / "metadata.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(
            f"captions={path}: no such metadata.jsonl. Caption fidelity needs held-out captioned MNIST: "
            "run `dlab-make-captions out=<folder>` and pass captions=<folder>/val"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    needed = {"text", "label", *ATTRIBUTES}
    if not rows or not needed <= rows[0].keys():
        raise DataError(
            f"{path}: caption fidelity needs the columns {sorted(needed)}, found "
            f"{sorted(rows[0]) if rows else 'no rows'}; use the val folder written by dlab-make-captions"
        )
    return rows


def targets_for(module, n: int, captions: str | Path | None = None) -> Targets:
    """`n` targets: balanced labels, or the first `n` held-out captions (cycled). `captions` defaults to
    the validation folder the model was trained with (`data.val_root` of its run config)."""
    if module.encoder.input_key == "label":
        labels = module.encoder.default_inputs(n)
        return Targets(labels, labels)
    captions = captions or (module.run_config or {}).get("data", {}).get("val_root")
    if not captions:
        raise DataError("this caption model was trained without data.val_root: pass captions=<val folder>")
    rows = cycle(held_out_captions(captions), n)
    texts = [r["text"][0] if isinstance(r["text"], list) else r["text"] for r in rows]
    return Targets(
        texts,
        torch.tensor([r["label"] for r in rows]),
        {name: [r[name] for r in rows] for name in ATTRIBUTES},
    )
