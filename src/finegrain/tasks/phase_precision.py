"""Precision ``auto`` for a run that trains on the frozen stages' cached outputs: building the cache
and the cached training steps are different workloads, and a CPU may run them fastest in different
precisions.

On an Intel Xeon with AMX (one thread, EfficientNet-Lite0 at 256x341, four stages frozen) the cache
is built 1.4x faster in bf16 than in fp32, yet the cached step (the trained stages' forward and
backward) runs 1.47x faster in fp32. So where ``auto`` picks bf16 for this CPU, a short probe before
training times the cached step both ways on a copy of the model, and training takes the faster.
Nothing is pinned: each machine decides, and says what it measured.

The cache is built in the precision the run's evaluation will run the frozen stages in
(:func:`finegrain.inference.engines.evaluation_precision`): fp32 when the run is evaluated on its
ONNX export (``eval.export_onnx`` with ONNX Runtime installed), else PyTorch inference's, bf16 here.
The trained stages then meet the same frozen maps in training and at test: on the Xeon a
bf16 cache under an fp32 test cost the classifier 0.9 points of top-1 over three seeds (retrieval's
seeds did not tell the two apart; BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from finegrain import machine
from finegrain.config import ExperimentConfig
from finegrain.inference.encoder import autocast_for
from finegrain.inference.engines import evaluation_precision
from finegrain.models.model import FinegrainModel

log = logging.getLogger(__name__)

PROBE_BATCH = 16
"""Images per probed step: enough to time the kernels, about a second per step on a slow CPU."""
PROBE_ROUNDS = 3
"""Timed steps per precision (after one warm-up each), interleaved; the median counts."""
CANDIDATES = ("bf16-mixed", "32")


@dataclass
class PhasePrecision:
    """The precision of each phase of a run: building the frozen cache, and the training steps."""

    requested: str
    cache: str
    steps: str
    images_per_second: dict[str, float] = field(default_factory=dict)
    """The probe's cached-step speed per precision (empty when nothing was probed)."""
    cpu: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def words(self) -> str:
        """The choice as the log line and the report word it (``report.run_sections.precision_words``)."""
        # optional: matplotlib (the train extra), imported only when this runs
        from finegrain.report.run_sections import precision_words

        if not self.images_per_second:
            return f"precision {self.steps}"
        return "precision " + precision_words(self.requested, self.as_dict())


def choose(cfg: ExperimentConfig, model: FinegrainModel) -> PhasePrecision:
    """Each phase's precision: ``train.precision`` resolved as usual for both, except that ``auto``
    on a CPU that picks bf16, in a one-process run that trains on the cache, times the cached
    training step in bf16 and in fp32 (:func:`time_cached_step`) and trains in the faster, and
    builds the cache in the evaluation's precision (fp32 on ONNX Runtime with ``eval.export_onnx``)."""
    requested = cfg.train.precision
    precision = machine.resolve_precision(requested)
    one_choice = requested != "auto" or precision != "bf16-mixed" or machine.cuda_available()
    # the processes of a multi-process run must train alike, and a probe in each could disagree
    several = cfg.train.num_nodes > 1 or (isinstance(cfg.train.devices, int) and cfg.train.devices > 1)
    if one_choice or several or cfg.train.frozen_cache_views <= 0:
        return PhasePrecision(requested, precision, precision)
    speeds = time_cached_step(model, cfg)
    steps = max(CANDIDATES, key=lambda p: speeds[p])
    cache = evaluation_precision(cfg.eval.export_onnx)
    chosen = PhasePrecision(requested, cache, steps, speeds, machine.cpu_model())
    log.info("%s", chosen.words())
    return chosen


def time_cached_step(
    model: FinegrainModel, cfg: ExperimentConfig, batch: int = PROBE_BATCH, rounds: int = PROBE_ROUNDS
) -> dict[str, float]:
    """Images per second of a cached training step (the stages after ``model.freeze_stages`` and the
    heads, forward and backward, at ``data.image_size``) in each of :data:`CANDIDATES`; on a copy of
    the model and random images, leaving the model and the random number generators untouched."""
    probe = copy.deepcopy(model).train()
    h, w = cfg.data.image_size
    times: dict[str, list[float]] = {p: [] for p in CANDIDATES}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.no_grad(), autocast_for(CANDIDATES[0]):
            image = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)
            maps = probe.frozen_prefix(probe.normalise_input(image)).float().repeat(batch, 1, 1, 1)
        if cfg.train.channels_last:
            probe.to(memory_format=torch.channels_last)
            maps = maps.contiguous(memory_format=torch.channels_last)
        for r in range(rounds + 1):
            for p in CANDIDATES:
                start = time.perf_counter()
                with autocast_for(p):
                    out = probe(maps, frozen=True)
                    score = out.get("logits", out.get("embedding", out["features"]))
                loss = score.float().square().mean()
                if loss.requires_grad:  # a fully frozen model has nothing to train
                    loss.backward()
                probe.zero_grad(set_to_none=True)
                if r:  # the first round warms up
                    times[p].append(time.perf_counter() - start)
    return {p: round(batch / statistics.median(t), 2) for p, t in times.items()}
