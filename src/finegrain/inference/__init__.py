"""Running a trained model: load a run's model with the config it was trained with, choose the
device and precision for this machine, and encode images at the configured sizes with flip
averaging. ``evaluate``, ``embed``, ``index``, ``search``, ``serve`` and kNN rows all go through it.

Layering: imports ``config``, ``data``, ``models`` and ``machine``; never ``tasks``,
``retrieval`` or ``serve``.
"""

from finegrain.inference.engines import ENGINES, open_encoder  # noqa: E402,F401 - torch-free: the one entry point
