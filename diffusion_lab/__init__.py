"""diffusion_lab: experiments on conditional diffusion models with Lightning and Hydra."""

__version__ = "0.1.0"
