"""Classification: cross-entropy with label smoothing, mixup / cutmix, top-1 on the validation carve-out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from finegrain.errors import ConfigError
from finegrain.tasks.base import TASKS, FinegrainTask


@TASKS.register("classification")
class ClassificationTask(FinegrainTask):
    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(
        self, config: dict, class_names: list[str], weights: str | None = None, train_labels: list[int] | None = None
    ) -> None:
        super().__init__(config, class_names, weights)
        if self.cfg.loss.name != "cross_entropy":
            raise ConfigError(
                f"task classification trains with loss cross_entropy, not '{self.cfg.loss.name}' "
                "(config key 'loss.name'; metric-learning losses need task: metric_learning)"
            )
        t, n = self.cfg.train, len(class_names)
        mixers = []
        if t.mixup > 0:
            mixers.append(v2.MixUp(alpha=t.mixup, num_classes=n))
        if t.cutmix > 0:
            mixers.append(v2.CutMix(alpha=t.cutmix, num_classes=n))
        self.mixer = None if not mixers else (mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers))
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        if batch is None:  # every image of the batch was unreadable
            return None
        x, y, _ = batch
        frozen = self.trains_from_cache  # x: the frozen stages' cached outputs rather than images
        x, target = self.prepare_input(x, frozen), y
        if self.mixer is not None:  # mixes normalised images, or the cached maps (manifold mixup)
            x, target = self.mixer(x, y)
        logits = self.model.logits(x, frozen)
        loss = F.cross_entropy(logits, target, label_smoothing=getattr(self.cfg.loss, "label_smoothing", 0.0))
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        x, y, _ = batch
        self._val_logits.append(self.model.logits(self.prepare_input(x)).float())
        self._val_labels.append(y)

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = torch.cat(self._val_logits)
        labels = torch.cat(self._val_labels)
        self._val_logits.clear()
        self._val_labels.clear()
        logits, labels = self.gather(logits), self.gather(labels)
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=False, sync_dist=False)
        self.log("val/acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True, sync_dist=False)
