"""What every training objective shares: the model, optimiser, schedule, two-stage freezing and
training on cached outputs of the frozen stages. Subclasses define the loss and the validation metric."""

from __future__ import annotations

import math

import lightning as L
import torch

from finegrain.config import ExperimentConfig
from finegrain.data.frozen_features import build_frozen_views
from finegrain.errors import FinegrainError, unknown_name
from finegrain.inference.encoder import autocast_for
from finegrain.models.build import build_from_config, num_outputs
from finegrain.registry import Registry

TASKS: Registry[type[FinegrainTask]] = Registry("trained task")
"""Task name → its LightningModule class, registered where each is defined (a kNN row trains nothing)."""


class FinegrainTask(L.LightningModule):
    """Base task. ``hparams`` hold the resolved config, the class names and the number of classes."""

    monitor: str = "val/acc"
    monitor_mode: str = "max"

    def __init__(
        self, config: dict, class_names: list[str], weights: str | None = None, train_labels: list[int] | None = None
    ) -> None:
        """``train_labels``: the classes of the training split (used by tasks that need them)."""
        super().__init__()
        self.save_hyperparameters({"config": config, "class_names": class_names})
        self.cfg = ExperimentConfig.model_validate(config)
        self.model = build_from_config(self.cfg, num_outputs(self.cfg, len(class_names)), weights)
        self._frozen_for_head_stage = False
        self._trainable_after_head_stage: dict[int, bool] = {}
        self.cache_precision: str | None = None
        """The precision the frozen cache is built in, when it differs from the trainer's
        (:mod:`finegrain.tasks.phase_precision`); None: the trainer's."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``all_gather`` of one tensor (Lightning types it for collections too)."""
        out = self.all_gather(t)
        assert isinstance(out, torch.Tensor)
        return out

    # ---------------------------------------------------------------- inputs
    @property
    def trains_from_cache(self) -> bool:
        """Whether training batches are the frozen stages' cached outputs (``train.frozen_cache_views``):
        ``training_step`` then passes ``frozen=True`` to :meth:`prepare_input` and the model."""
        return self.cfg.train.frozen_cache_views > 0

    def prepare_input(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """A batch of the loader as the model's input, channels-last when asked: uint8 images normalised,
        or with ``frozen`` the frozen stages' cached outputs (float16) as float32."""
        x = x.float() if frozen else self.model.normalise_input(x)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_fit_start(self) -> None:
        if self.cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def cache_frozen_outputs(self) -> None:
        """Compute the frozen stages' outputs of the training images once, for the data module's
        training loader (which asks when it is first built: the frozen weights never change, so a
        resumed run gets the same); in eval mode, without autograd, in :attr:`cache_precision` (else
        the training precision), channels-last as configured."""

        # Lightning sets Trainer.datamodule when fitting, without declaring it on the class
        dm, t = self.trainer.datamodule, self.cfg.train  # type: ignore[attr-defined]
        if not hasattr(dm, "frozen_views"):
            raise FinegrainError("train.frozen_cache_views needs the trainer fitted with a FinegrainDataModule")

        if t.channels_last:  # asked for before on_fit_start when the schedule counts the steps
            self.model.to(memory_format=torch.channels_last)

        def prefix(x: torch.Tensor) -> torch.Tensor:
            precision = (
                autocast_for(self.cache_precision)
                if self.cache_precision
                else self.trainer.precision_plugin.forward_context()
            )
            with torch.inference_mode(), precision:
                return self.model.frozen_prefix(self.prepare_input(x.to(self.device)))

        training = self.model.training
        self.model.eval()
        try:
            dm.frozen_views = build_frozen_views(
                dm.train_records, self.cfg.data, prefix, t.frozen_cache_views, t.seed, cache=dm.cache
            )
        finally:
            self.model.train(training)

    # ---------------------------------------------------------------- two-stage fine-tuning
    def on_train_epoch_start(self) -> None:
        head_stage = self.current_epoch < self.cfg.train.head_epochs
        if head_stage != self._frozen_for_head_stage:
            params = list(self.model.backbone.parameters())
            if head_stage:  # remember the freeze policy's choice, then freeze the whole backbone
                self._trainable_after_head_stage = {id(p): p.requires_grad for p in params}
                for p in params:
                    p.requires_grad_(False)
            else:  # back to what the freeze policy set (frozen BatchNorm stays frozen)
                for p in params:
                    p.requires_grad_(self._trainable_after_head_stage.get(id(p), True))
            self._frozen_for_head_stage = head_stage
        if head_stage:
            self.model.backbone.eval()

    # ---------------------------------------------------------------- optimisation
    def extra_param_groups(self, lr: float) -> list[dict]:
        """Parameters outside the model (e.g. loss proxies) with their learning rate."""
        return []

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        backbone = [p for p in self.model.backbone.parameters()]
        backbone_ids = {id(p) for p in backbone}
        heads = [p for p in self.model.parameters() if id(p) not in backbone_ids]
        groups = [
            {"params": backbone, "lr": o.lr * o.backbone_lr_mult, "name": "backbone"},
            {"params": heads, "lr": o.lr, "name": "head"},
            *self.extra_param_groups(o.lr),
        ]
        # Frozen parameters stay in the optimiser only when a later stage unfreezes them.
        keep_frozen = self.cfg.train.head_epochs > 0
        out = []
        for g in groups:
            params = [p for p in g["params"] if p.requires_grad or keep_frozen]
            if params and (g["lr"] > 0):
                out.append({**g, "params": params})
        return out

    def configure_optimizers(self):
        o, s = self.cfg.optim, self.cfg.schedule
        groups = self.param_groups()
        opt: torch.optim.Optimizer
        sched: torch.optim.lr_scheduler.LRScheduler
        if o.name == "adam":
            opt = torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
        elif o.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        elif o.name == "sgd":
            opt = torch.optim.SGD(
                groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
            )
        else:  # pragma: no cover - the config's Literal already refuses it
            raise unknown_name("optimizer", o.name, ["adam", "adamw", "sgd"])
        if s.name == "none":
            return opt
        if s.name == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if s.name == "onecycle":
            pct = min(0.5, max(0.05, s.warmup_epochs / max(1, self.cfg.train.epochs))) if s.warmup_epochs else 0.25
            total = max(total, 4)  # each of one-cycle's two phases needs 2 steps or more (a tiny dataset has fewer)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=[g["lr"] for g in groups],
                total_steps=total,
                pct_start=min(0.5, max(pct, 2 / total)),
            )
        else:  # cosine with linear warm-up, stepped per batch
            warm = int(total * s.warmup_epochs / max(1, self.cfg.train.epochs))

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                progress = (step - warm) / max(1, total - warm)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
