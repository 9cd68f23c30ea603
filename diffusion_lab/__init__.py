"""diffusion_lab: experiments on conditional diffusion models with Lightning and Hydra."""

__version__ = "0.1.0"

from pathlib import Path as _Path

# The Hydra config tree, as an absolute path so console scripts find it too (Hydra would otherwise
# look for a `conf` Python package). A wheel ships the repo's top-level conf/ inside the package
# (<package>/conf, see pyproject.toml); an editable install or a source checkout uses the repo's conf/.
_PKG_DIR = _Path(__file__).resolve().parent
CONFIG_DIR = str(_PKG_DIR / "conf" if (_PKG_DIR / "conf").is_dir() else _PKG_DIR.parent / "conf")
