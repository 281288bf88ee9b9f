"""Deep metric learning with pytorch-metric-learning losses and miners.

Validation is Recall@1 on the class-disjoint validation classes (the papers'
definition, self excluded), so the best checkpoint is never chosen on test.
"""

from __future__ import annotations

import torch

from finegrain.config.losses import ProxyLoss
from finegrain.errors import ConfigError
from finegrain.metrics.retrieval import retrieval_metrics
from finegrain.tasks.base import TASKS, FinegrainTask
from finegrain.tasks.losses import build_loss


@TASKS.register("metric_learning")
class MetricLearningTask(FinegrainTask):
    monitor = "val/recall@1"
    monitor_mode = "max"
    label_lookup: torch.Tensor  # a buffer: class id -> its index among the training classes

    def __init__(
        self, config: dict, class_names: list[str], weights: str | None = None, train_labels: list[int] | None = None
    ) -> None:
        super().__init__(config, class_names, weights)
        classes = sorted(set(train_labels or range(len(class_names))))
        self.save_hyperparameters({"train_labels": classes})
        lookup = torch.full((len(class_names),), -1, dtype=torch.long)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        self.register_buffer("label_lookup", lookup, persistent=False)
        dim = self.cfg.model.embedding_dim if self.cfg.model.has_embedder else self.model.feature_dim
        self.loss_fn, self.miner = build_loss(self.cfg.loss, len(classes), dim)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._check_xbm_fits(self.trainer.world_size if self.trainer is not None else 1)
        if self.trainer is not None and self.trainer.world_size > 1:
            # optional: pytorch-metric-learning (the train extra), imported only when this runs
            from pytorch_metric_learning.utils import distributed as pml_dist

            self.loss_fn = pml_dist.DistributedLossWrapper(self.loss_fn)
            if self.miner is not None:
                self.miner = pml_dist.DistributedMinerWrapper(self.miner)

    def _check_xbm_fits(self, world_size: int) -> None:
        """A cross-batch memory enqueues every step's embeddings, all devices' together (pml's
        distributed wrapper gathers them first): it must hold at least one such batch."""
        size = getattr(self.cfg.loss, "xbm_size", 0)
        batch = self.cfg.data.batch_size * world_size
        if size and size < batch:
            devices = f" x {world_size} devices" if world_size > 1 else ""
            raise ConfigError(
                f"loss.xbm_size ({size}) is smaller than a training batch ({batch} embeddings: "
                f"data.batch_size {self.cfg.data.batch_size}{devices}): the memory holds at least "
                f"one batch; raise loss.xbm_size to {batch} or more, or set it to 0"
            )

    def extra_param_groups(self, lr: float) -> list[dict]:
        params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if not params:
            return []
        if isinstance(self.cfg.loss, ProxyLoss):  # named for the learning-rate figure and log
            return [{"params": params, "lr": lr * self.cfg.loss.proxy_lr_mult, "name": "proxies"}]
        return [{"params": params, "lr": lr, "name": "loss"}]

    def training_step(self, batch, batch_idx):
        if batch is None:
            return None
        x, y, _ = batch
        frozen = self.trains_from_cache  # x: the frozen stages' cached outputs rather than images
        emb = self.model.embed(self.prepare_input(x, frozen), frozen).float()
        labels = self.label_lookup[y]
        pairs = self.miner(emb, labels) if self.miner is not None else None
        loss = self.loss_fn(emb, labels, pairs) if pairs is not None else self.loss_fn(emb, labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        x, y, _ = batch
        self._val.append((self.model.embed(self.prepare_input(x)).float(), y))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return

        emb = torch.cat([e for e, _ in self._val])
        labels = torch.cat([y for _, y in self._val])
        self._val.clear()
        emb, labels = self.gather(emb), self.gather(labels)
        emb, labels = emb.reshape(-1, emb.shape[-1]), labels.reshape(-1)
        m = retrieval_metrics(emb.cpu().numpy(), labels.cpu().numpy(), ks=(1,), metric="cosine")
        self.log("val/recall@1", float(m["recall@1"]), prog_bar=True, sync_dist=False)
        self.log("val/map@r", float(m["map@r"]), sync_dist=False)
