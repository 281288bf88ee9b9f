"""Class-balanced batches (m images per class) that also work under DDP.

pytorch-metric-learning's :class:`MPerClassSampler` draws the index list; this
wrapper seeds it per epoch (so runs and resumes are reproducible) and deals its
batches out to the processes of a distributed run, each process getting whole
class-balanced batches.

The sampler takes no seed: it draws from the library's module-level random state,
``common_functions.NUMPY_RANDOM`` (numpy's global one unless replaced), which the library
exposes for replacing. :func:`pml_random_state` replaces it for one draw and puts it back, so
an epoch's draw is exactly the library's own after ``np.random.seed(epoch_seed(seed, epoch))``,
and numpy's global state is neither read nor advanced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from finegrain.faiss_import import import_faiss

import_faiss()  # before pytorch-metric-learning loads faiss with a slow BLAS kernel choice
from pytorch_metric_learning.samplers import MPerClassSampler  # noqa: E402 - after import_faiss
from pytorch_metric_learning.utils import common_functions as c_f  # noqa: E402 - after import_faiss
from torch.utils.data import Sampler  # noqa: E402 - after import_faiss

from finegrain.errors import ConfigError  # noqa: E402 - after import_faiss


def epoch_seed(seed: int, epoch: int) -> int:
    """The numpy seed of the draw of ``epoch`` in a run seeded ``seed``."""
    return (seed * 100_003 + epoch) % 2**32


@contextmanager
def pml_random_state(seed: int) -> Iterator[None]:
    """Within the block pytorch-metric-learning draws from a ``RandomState(seed)`` of its own."""
    saved = c_f.NUMPY_RANDOM
    c_f.NUMPY_RANDOM = np.random.RandomState(seed)
    try:
        yield
    finally:
        c_f.NUMPY_RANDOM = saved


class DistributedMPerClassSampler(Sampler[int]):
    """Every consecutive ``batch_size`` indices hold ``m`` images of ``batch_size // m`` classes.

    One epoch covers about ``len(labels)`` images in total across processes.
    Call :meth:`set_epoch` each epoch (Lightning does) for a new draw.
    """

    def __init__(
        self, labels: Sequence[int], m: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        label_array = np.asarray(labels)
        n_classes = len(np.unique(label_array))
        if batch_size % m:
            raise ConfigError(f"data.batch_size ({batch_size}) must be a multiple of data.m_per_class ({m})")
        if m * n_classes < batch_size:
            raise ConfigError(
                f"data.batch_size ({batch_size}) needs {batch_size // m} classes per batch but the training "
                f"split has {n_classes}; lower data.batch_size or raise data.m_per_class"
            )
        self.labels, self.m, self.batch_size = label_array, m, batch_size
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        total = max(len(labels), batch_size * num_replicas)
        self.batches_per_rank = total // (batch_size * num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def __iter__(self) -> Iterator[int]:
        length = self.batches_per_rank * self.batch_size * self.num_replicas
        sampler = MPerClassSampler(self.labels, self.m, batch_size=self.batch_size, length_before_new_iter=length)
        with pml_random_state(epoch_seed(self.seed, self.epoch)):
            order = list(sampler)  # the library draws the whole epoch here, eagerly
        b = self.batch_size
        batches = [order[i : i + b] for i in range(0, len(order), b)]
        mine = batches[self.rank :: self.num_replicas][: self.batches_per_rank]
        return iter([int(i) for batch in mine for i in batch])
