"""Encoding images with a loaded model: at every configured size, with flip averaging, in the
precision this machine runs fastest. The one place a trained model is run for inference."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from finegrain.inference.explain import NoMaps, maps_outputs
from finegrain.inference.load import LoadedModel
from finegrain.inference.outputs import (  # noqa: F401 - re-exported
    EncodingLoop,
    Outputs,
    eval_sizes,
    mean_of_halves,
    named_outputs,
)
from finegrain.machine import inference_precision, resolve_precision, set_threads
from finegrain.models.maps import forward_with_maps, maps_missing


def autocast_for(precision: str):
    """The autocast context of a resolved precision (``32`` runs without one)."""
    if precision == "bf16-mixed":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    if precision == "16-mixed" and torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def forward_tta(model: torch.nn.Module, x: torch.Tensor, tta_flip: bool) -> dict[str, torch.Tensor]:
    """The model's outputs; with ``tta_flip`` the mean of the image's and its mirror's, both in one
    batch (one pass of twice the batch keeps the cores busier than two, above all for one query)."""
    if not tta_flip:
        return model(x)
    return mean_of_halves(model(torch.cat([x, torch.flip(x, dims=[3])])), len(x))


class Encoder(EncodingLoop):
    """A loaded model and how it runs here: the config's sizes and flip averaging, and the
    precision of this machine (``auto`` unless ``precision`` is given), whatever it was trained in."""

    engine = "torch"

    def __init__(self, loaded: LoadedModel, precision: str | None = None) -> None:
        self.loaded = loaded
        self.cfg = loaded.cfg
        self.sizes: list[tuple[int, int]] = eval_sizes(self.cfg.data)
        self.tta_flip = self.cfg.eval.tta_flip
        self.precision = resolve_precision(precision) if precision else inference_precision()
        self.channels_last = self.cfg.train.channels_last
        self.model = loaded.model
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.device = next(self.model.parameters()).device

    @classmethod
    def of_model(cls, model: torch.nn.Module, cfg, precision: str | None = None) -> Encoder:
        """An encoder of a model that no run holds (benchmarks, probes)."""

        return cls(LoadedModel(model.eval(), cfg, [], Path("-"), "-"), precision)

    @torch.inference_mode()
    def forward(self, x) -> dict[str, np.ndarray]:
        """Outputs of one uint8 batch ``[B, 3, H, W]`` (tensor or array): features, embedding, logits
        (float32 arrays)."""
        x = torch.as_tensor(x).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.precision):
            out = forward_tta(self.model, x, self.tta_flip)
        return named_outputs({k: v.float().cpu().numpy() for k, v in out.items()})

    def maps_missing(self) -> str | None:
        """Why this model gives no maps, or None when it gives them."""
        return maps_missing(self.model)

    @torch.inference_mode()
    def forward_maps(self, x) -> dict[str, np.ndarray]:
        """:meth:`forward`'s outputs and the maps of :mod:`finegrain.inference.explain` (float32);
        :class:`~finegrain.inference.explain.NoMaps` for a model without them."""

        why = self.maps_missing()
        if why is not None:
            raise NoMaps(why)
        x = torch.as_tensor(x).to(self.device)
        n = len(x)
        if self.tta_flip:
            x = torch.cat([x, torch.flip(x, dims=[3])])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.precision):
            out = forward_with_maps(self.model, x)
        return maps_outputs({k: v.float().cpu().numpy() for k, v in out.items()}, n, self.tta_flip)

    def prepare(self, loader) -> None:
        set_threads(loader.num_workers)

    def use_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)  # process-wide: each concurrent caller runs on its own share
