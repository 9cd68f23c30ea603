"""pyplot for the commands that draw figures into files, on the Agg backend: no display is needed (a
cluster node, a CI runner), and no window ever opens."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

__all__ = ["plt"]
