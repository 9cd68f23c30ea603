"""diffusion_lab: experiments on conditional diffusion models with Lightning and Hydra."""

__version__ = "0.1.0"

from pathlib import Path as _Path

# The Hydra config tree (`conf/` at the repo root). An absolute path, so console scripts find it
# too (Hydra would otherwise look for a `conf` Python package).
CONFIG_DIR = str(_Path(__file__).resolve().parent.parent / "conf")
