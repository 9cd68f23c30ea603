"""`dlab-phema`: post-hoc EMA (EDM2). The EMA of any length, rebuilt after training from the snapshots of a
`dlab-train callbacks=post_hoc_ema` run, written as a normal checkpoint per length into the run's
`post_hoc_ema/` folder (not `checkpoints/`, where `last` and a resume look).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from diffusion_lab.callbacks.post_hoc_ema import post_hoc_checkpoints
from diffusion_lab.cli import hydra_app
from diffusion_lab.errors import ConfigError
from diffusion_lab.utils import checks

log = logging.getLogger("diffusion_lab")


def sigma_rels(cfg: DictConfig) -> list[float]:
    """`sigma_rel=`: one length or a list of them (their range is checked with the maths)."""
    value = cfg.get("sigma_rel")
    lengths = checks.as_list(value)
    if not lengths or not all(checks.is_number(s) for s in lengths):
        raise ConfigError(
            f"sigma_rel={value!r}: expected a number or a list of them, e.g. sigma_rel=[0.05,0.1,0.15]"
        )
    return [float(s) for s in lengths]


def run(cfg: DictConfig) -> list:
    path, written = post_hoc_checkpoints(cfg.ckpt_path, sigma_rels(cfg), cfg.paths.train_runs)
    for out, info in written:
        print(
            f"sigma_rel {info['sigma_rel']:g} (gamma {info['gamma']:.2f}) at step {info['step']} from "
            f"{len(info['snapshots'])} snapshots: wrote {out}"
        )
    print(f"from {path}; sample one with: dlab-sample ckpt_path={written[0][0]}")
    return [out for out, _ in written]


@hydra_app("phema")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
