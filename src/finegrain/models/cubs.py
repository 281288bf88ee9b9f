"""The CUBS blocks of seed 001 (REFERENCES.md §3): a channel gate and a pixel gate.

Both blocks compute a weight in (0, 1) and multiply the input feature map by it,
so the output has the input's shape ``[B, C, H, W]``.

**CUBS1 (channel gate).** ``g = mean_{H,W}(x)``: ``[B, C]``. Three linear layers
give, over ``N`` hidden units, a query ``[B, N, d]``, a key ``[B, N, d]`` and a
value ``[B, N]``. The similarity ``S[b, i, j] = t * cos(q_i, k_j)`` (``[B, N, N]``,
``t`` a learnable temperature) is soft-maxed column-wise (over ``i``, ``dim=1``,
so every column sums to one) and applied to the value:
``s_j = sum_i softmax(S)[i, j] * v_i`` (``[B, N]``). A linear layer maps ``s``
back to ``[B, C]``, ``g`` is added (skip), and a sigmoid gives the channel
weights ``w``; the output is ``x * w[:, :, None, None]``.

**CUBS2 (pixel gate).** Two 1x1 convolutions give query and key maps of width
``d`` and a third one a 1-channel value map. Over the ``HW`` positions
``S[b, i, j] = t * cos(q_i, k_j)`` (``[B, HW, HW]``), soft-maxed column-wise and
applied to the value gives ``[B, 1, HW]``; a sigmoid gives the pixel weights and
the output is ``x * w``.

Why the query/key width ``d > 1``: cosine similarity between scalars is just the
product of their signs, so every unit or position carries a small vector. The
learnable temperature (initialised at 10, stored as its log) keeps the softmax
of values in ``[-1, 1]`` from being flat.

**Where CUBS2 may be placed.** Its similarity matrix holds ``B * (HW)^2`` floats
(and autograd keeps a few of them). After ResNet stage 4 (7x7 at 224 px, 2x2 at
64 px) it costs nothing; after stage 1 at 224 px (56x56 = 3136 positions) it is
~39 MB per image, i.e. 2.5 GB for a batch of 64. CUBS2 therefore refuses to run
(:class:`~finegrain.errors.ConfigError`) when ``B * (HW)^2 * 4`` bytes exceed
``max_bytes`` (default: the environment variable ``FINEGRAIN_CUBS2_MAX_BYTES``,
else 2 GB) and warns above a quarter of that.

The seed's code used squared differences instead of cosine similarity and its
"CUBS2 only" variant was CUBS2 followed by CUBS1; this module follows the text:
``sum`` = CUBS-ResNet-1, ``cubs1`` = CUBS-ResNet-2, ``cubs2`` = CUBS-ResNet-3, and
offers the two sequential orders as extra variants.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import ConfigError, unknown_name
from finegrain.runs import human_bytes

VARIANTS: tuple[str, ...] = ("sum", "cubs1", "cubs2", "cubs1_then_cubs2", "cubs2_then_cubs1")
"""``sum`` = CUBS-ResNet-1, ``cubs1`` = CUBS-ResNet-2, ``cubs2`` = CUBS-ResNet-3."""

DEFAULT_CUBS2_MAX_BYTES = 2_000_000_000
ENV_CUBS2_MAX_BYTES = "FINEGRAIN_CUBS2_MAX_BYTES"
INIT_TEMPERATURE = 10.0
MAX_TEMPERATURE = 100.0


def cubs2_max_bytes() -> int:
    """The CUBS2 memory limit: ``$FINEGRAIN_CUBS2_MAX_BYTES`` if set, else 2 GB."""
    raw = os.environ.get(ENV_CUBS2_MAX_BYTES, "").strip()
    if not raw:
        return DEFAULT_CUBS2_MAX_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        raise ConfigError(f"{ENV_CUBS2_MAX_BYTES}={raw!r} is not a number of bytes") from None
    if value <= 0:
        raise ConfigError(f"{ENV_CUBS2_MAX_BYTES} must be a positive number of bytes (got {raw!r})")
    return value


class _Temperature(nn.Module):
    """A positive learnable scalar stored as its log (clamped at ``MAX_TEMPERATURE``)."""

    def __init__(self, init: float = INIT_TEMPERATURE) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.log_temperature.clamp(max=math.log(MAX_TEMPERATURE)).exp()


class CUBS1(nn.Module):
    """Channel gate: global pool, cosine self-similarity over ``hidden`` units, sigmoid.

    ``hidden`` (N) defaults to ``max(channels // 8, 8)`` and ``d`` (the query/key
    width of each unit) to 8. ``last_gate`` keeps the last channel weights
    ``[B, C]`` (detached).
    """

    def __init__(self, channels: int, hidden: int | None = None, d: int | None = None) -> None:
        super().__init__()
        if channels < 1:
            raise ConfigError(f"CUBS1 needs a positive number of channels (got {channels})")
        self.channels = channels
        self.hidden = int(hidden) if hidden is not None else max(channels // 8, 8)
        self.d = int(d) if d is not None else 8
        if self.hidden < 1 or self.d < 1:
            raise ConfigError(f"CUBS1: hidden and d must be positive (got {self.hidden}, {self.d})")
        self.query = nn.Linear(channels, self.hidden * self.d)
        self.key = nn.Linear(channels, self.hidden * self.d)
        self.value = nn.Linear(channels, self.hidden)
        self.out = nn.Linear(self.hidden, channels)
        self.temperature = _Temperature()
        self.last_gate: torch.Tensor | None = None

    def similarity(self, g: torch.Tensor) -> torch.Tensor:
        """The scaled cosine similarity ``[B, N, N]`` between query unit i and key unit j."""
        b = g.shape[0]
        q = F.normalize(self.query(g).view(b, self.hidden, self.d), dim=-1)
        k = F.normalize(self.key(g).view(b, self.hidden, self.d), dim=-1)
        return self.temperature() * torch.bmm(q, k.transpose(1, 2))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel weights ``[B, C]`` in (0, 1)."""
        g = x.mean(dim=(2, 3))
        attn = self.similarity(g).softmax(dim=1)  # column-wise: every column sums to 1
        v = self.value(g)
        s = torch.bmm(v.unsqueeze(1), attn).squeeze(1)  # s_j = sum_i attn[i, j] * v_i  -> [B, N]
        return torch.sigmoid(self.out(s) + g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"CUBS1({self.channels}) expects [B, {self.channels}, H, W], got {list(x.shape)}")
        w = self.gate(x)
        self.last_gate = w.detach()
        return x * w[:, :, None, None].to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, d={self.d}"


class CUBS2(nn.Module):
    """Pixel gate: cosine similarity between the ``H*W`` positions, sigmoid.

    ``d`` (the query/key width) defaults to ``max(channels // 8, 8)``. The
    similarity matrix is ``[B, HW, HW]``: the forward pass raises
    :class:`ConfigError` when ``B * (HW)^2 * 4`` bytes exceed ``max_bytes`` and
    warns above a quarter of it (see the module docstring). ``last_gate`` keeps
    the last pixel weights ``[B, 1, H, W]`` (detached).
    """

    def __init__(self, channels: int, d: int | None = None, max_bytes: int | None = None) -> None:
        super().__init__()
        if channels < 1:
            raise ConfigError(f"CUBS2 needs a positive number of channels (got {channels})")
        self.channels = channels
        self.d = int(d) if d is not None else max(channels // 8, 8)
        if self.d < 1:
            raise ConfigError(f"CUBS2: d must be positive (got {self.d})")
        self.max_bytes = max_bytes
        self.query = nn.Conv2d(channels, self.d, kernel_size=1)
        self.key = nn.Conv2d(channels, self.d, kernel_size=1)
        self.value = nn.Conv2d(channels, 1, kernel_size=1)
        self.temperature = _Temperature()
        self.last_gate: torch.Tensor | None = None
        self._warned: set[tuple[int, int]] = set()

    @staticmethod
    def memory_bytes(batch: int, height: int, width: int) -> int:
        """Bytes of one float32 similarity matrix ``[B, HW, HW]``."""
        return int(batch) * (int(height) * int(width)) ** 2 * 4

    def limit(self) -> int:
        return int(self.max_bytes) if self.max_bytes is not None else cubs2_max_bytes()

    def check_memory(self, batch: int, height: int, width: int) -> None:
        """Refuse (ConfigError) or warn when the similarity matrix would be too large."""
        need, limit = self.memory_bytes(batch, height, width), self.limit()
        hw = height * width
        what = (
            f"CUBS2 on a {height}x{width} map (HW={hw}) with batch {batch} needs a "
            f"[{batch}, {hw}, {hw}] similarity matrix of {human_bytes(need)}"
        )
        if need > limit:
            raise ConfigError(
                f"{what}, over the limit of {human_bytes(limit)}. Place CUBS2 after a later stage "
                f"(smaller map, e.g. model.cubs_stages: [4]), use smaller images or batches, use cubs: cubs1, "
                f"or raise the limit with {ENV_CUBS2_MAX_BYTES}."
            )
        if need > limit / 4 and (batch, hw) not in self._warned:
            self._warned.add((batch, hw))
            warnings.warn(
                f"{what} (over a quarter of the {human_bytes(limit)} limit); autograd keeps several such matrices",
                stacklevel=3,
            )

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled cosine similarity ``[B, HW, HW]`` between query position i and key position j."""
        b = x.shape[0]
        q = F.normalize(self.query(x).reshape(b, self.d, -1), dim=1)
        k = F.normalize(self.key(x).reshape(b, self.d, -1), dim=1)
        return self.temperature() * torch.bmm(q.transpose(1, 2), k)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The pixel weights ``[B, 1, H, W]`` in (0, 1)."""
        b, _, h, w = x.shape
        self.check_memory(b, h, w)
        attn = self.similarity(x).softmax(dim=1)  # column-wise: every column sums to 1
        v = self.value(x).reshape(b, 1, h * w)
        s = torch.bmm(v, attn)  # s_j = sum_i v_i * attn[i, j]  -> [B, 1, HW]
        return torch.sigmoid(s).reshape(b, 1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"CUBS2({self.channels}) expects [B, {self.channels}, H, W], got {list(x.shape)}")
        w = self.gate(x)
        self.last_gate = w.detach()
        return x * w.to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, d={self.d}"


class CUBSBlock(nn.Module):
    """One arrangement of the CUBS gates (``variant`` in :data:`VARIANTS`).

    - ``sum``: ``CUBS1(x) + CUBS2(x)`` (CUBS-ResNet-1);
    - ``cubs1``: ``CUBS1(x)`` (CUBS-ResNet-2);
    - ``cubs2``: ``CUBS2(x)`` (CUBS-ResNet-3);
    - ``cubs1_then_cubs2``: ``CUBS2(CUBS1(x))`` (CBAM's channel-then-spatial order);
    - ``cubs2_then_cubs1``: ``CUBS1(CUBS2(x))`` (what the seed's "CUBS2 only" code did).

    Extra keyword arguments go to CUBS2 (``d``, ``max_bytes``).
    """

    def __init__(self, channels: int, variant: str, **cubs2_kwargs) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(str(unknown_name("CUBS variant", variant, VARIANTS)))
        self.channels = channels
        self.variant = variant
        self.cubs1 = CUBS1(channels) if variant != "cubs2" else None
        self.cubs2 = CUBS2(channels, **cubs2_kwargs) if variant != "cubs1" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, one, two = self.variant, self.cubs1, self.cubs2
        if v == "cubs1" and one is not None:
            return one(x)
        if v == "cubs2" and two is not None:
            return two(x)
        if one is None or two is None:  # pragma: no cover - __init__ builds what the variant uses
            raise ConfigError(f"CUBS variant {v!r} is missing a block")
        if v == "sum":
            return one(x) + two(x)
        if v == "cubs1_then_cubs2":
            return two(one(x))
        return one(two(x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, variant={self.variant!r}"
