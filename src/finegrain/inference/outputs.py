"""What encoding gives, and how sizes are combined: shared by both engines, without PyTorch
(the ONNX engine serves on installs that have no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Outputs:
    """Model outputs over records, in record order (unreadable images dropped)."""

    labels: np.ndarray          # [N] int
    indices: np.ndarray         # [N] index into the records
    features: np.ndarray        # [N, feature_dim] float32
    embeddings: np.ndarray      # [N, D] float32 (the embedding head, else the features)
    logits: np.ndarray | None   # [N, C] float32 when the model has a classifier
    seconds: float              # wall time of the forward passes

    @property
    def images_per_second(self) -> float:
        return len(self.labels) / self.seconds if self.seconds > 0 else float("nan")

    def arrays(self) -> dict[str, np.ndarray]:
        """The outputs by name, as :meth:`Encoder.forward` gives them."""
        d = {"features": self.features, "embedding": self.embeddings}
        if self.logits is not None:
            d["logits"] = self.logits
        return d


def mean_over_sizes(outs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Multi-scale testing: the outputs of the same images at each size, averaged."""
    return {k: np.mean([o[k] for o in outs], axis=0).astype(np.float32) for k in outs[0]}


def eval_sizes(data) -> list[tuple[int, int]]:
    """The (height, width) sizes images are evaluated, embedded and searched at (outputs averaged);
    the same rule as :func:`finegrain.data.module.eval_sizes`, which imports torch."""
    return [tuple(s) for s in data.eval_image_sizes] or [tuple(data.image_size)]
