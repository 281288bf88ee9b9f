"""Cross-batch memory (XBM, Wang et al. 2020) as an option of the multi-similarity loss: ``loss.xbm_size``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pytorch_metric_learning import losses, miners

from finegrain import config as C
from finegrain.errors import ConfigError
from finegrain.tasks.losses import build_loss
from tests.conftest import tiny_config, tiny_metric_config


def _ms(**loss) -> C.MultiSimilarityLoss:
    return C.build_config({"name": "x", "task": "metric_learning", "loss": {"name": "multi_similarity", **loss}}).loss


def _batch(seed: int, n: int = 12, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1), torch.arange(n) % 3


def test_without_xbm_the_loss_and_its_miner_are_unchanged():
    loss, miner = build_loss(_ms(), num_classes=3, dim=8)
    assert type(loss) is losses.MultiSimilarityLoss and isinstance(miner, miners.MultiSimilarityMiner)


def test_xbm_wraps_the_loss_and_mines_itself():
    cfg = _ms(xbm_size=64, alpha=3.0, miner_epsilon=0.2)
    loss, miner = build_loss(cfg, num_classes=3, dim=8)
    assert miner is None  # the memory mines, against the batch and the memory
    assert isinstance(loss, losses.CrossBatchMemory)
    assert loss.memory_size == 64 and loss.embedding_size == 8 and loss.embedding_memory.shape == (64, 8)
    assert type(loss.loss) is losses.MultiSimilarityLoss and loss.loss.alpha == 3.0
    assert isinstance(loss.miner, miners.MultiSimilarityMiner) and loss.miner.epsilon == pytest.approx(0.2)


def test_the_memory_counts_past_batches():
    xbm, _ = build_loss(_ms(xbm_size=64), num_classes=3, dim=8)
    plain, miner = build_loss(_ms(), num_classes=3, dim=8)
    (a, ya), (b, yb) = _batch(0), _batch(1)
    # an empty memory: the batch against itself, as without one
    assert xbm(a, ya).item() == pytest.approx(plain(a, ya, miner(a, ya)).item(), rel=1e-5)
    with_memory = xbm(b, yb)
    # b's pairs with a count too
    assert with_memory.item() != pytest.approx(plain(b, yb, miner(b, yb)).item(), rel=1e-3)
    assert xbm.queue_idx == len(a) + len(b) and not xbm.has_been_filled
    torch.testing.assert_close(xbm.embedding_memory[:24], torch.cat([a, b]))
    torch.testing.assert_close(xbm.label_memory[:24], torch.cat([ya, yb]))


def test_the_memory_keeps_the_newest_embeddings_and_is_not_in_the_state_dict():
    xbm, _ = build_loss(_ms(xbm_size=16), num_classes=3, dim=8)
    batches = [_batch(seed) for seed in range(3)]
    for e, y in batches:
        assert torch.isfinite(xbm(e, y))
    assert xbm.has_been_filled and xbm.queue_idx == 36 % 16
    # 36 embeddings through 16 slots: read from the queue's head, the last 4 of the second batch, then the third
    newest = torch.cat([batches[1][0], batches[2][0]])[-16:]
    torch.testing.assert_close(torch.roll(xbm.embedding_memory, -xbm.queue_idx, dims=0), newest)
    # pml does not save where the queue stands: a restored memory would be ignored, so none is saved
    assert xbm.state_dict() == {}
    assert {n for n, _ in xbm.named_buffers()} == {"embedding_memory", "label_memory"}  # moved with the module


def test_xbm_under_bf16_autocast():
    xbm, _ = build_loss(_ms(xbm_size=32), num_classes=3, dim=8)
    lin = torch.nn.Linear(8, 8)
    for seed in range(3):
        e, y = _batch(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = lin(e)  # bf16 under autocast; the training step casts it to float32
            value = xbm(emb.float(), y)
        assert torch.isfinite(value)
        value.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert xbm.embedding_memory.dtype == torch.float32


def test_the_config_takes_xbm_size_and_refuses_a_negative_one():
    assert _ms(xbm_size=512).xbm_size == 512
    assert _ms().xbm_size == 0
    # the discriminated union puts the loss's name in the path: 'loss.multi_similarity.xbm_size'
    with pytest.raises(
        ConfigError, match=r"'loss\.(multi_similarity\.)?xbm_size'.*greater than or equal to 0 \(got -1\)"
    ):
        _ms(xbm_size=-1)
    with pytest.raises(ConfigError, match=r"loss\.xbm_size"):  # a setting of multi_similarity only
        C.build_config({"name": "x", "task": "metric_learning", "loss": {"name": "triplet", "xbm_size": 64}})


def _task(tmp_path, xbm_size: int):
    from finegrain.tasks.metric_learning import MetricLearningTask

    cfg = tiny_config(
        tmp_path,
        task="metric_learning",
        data={"batch_size": 8},
        model={"head": "embedding", "embedding_dim": 16},
        loss={"name": "multi_similarity", "xbm_size": xbm_size},
    )
    return MetricLearningTask(cfg.model_dump(mode="json"), [f"c{i}" for i in range(4)])


def test_the_memory_must_hold_a_batch_of_every_device(tmp_path):
    task = _task(tmp_path, xbm_size=16)
    assert task.miner is None and task.loss_fn.embedding_memory.shape == (16, 16)
    assert not any(k.startswith("loss_fn.") for k in task.state_dict())
    task.trainer = SimpleNamespace(world_size=2)  # 2 x 8 embeddings, gathered: fits
    task.setup("fit")
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    assert isinstance(task.loss_fn, DistributedLossWrapper) and isinstance(task.loss_fn.loss, losses.CrossBatchMemory)
    task = _task(tmp_path, xbm_size=16)
    task.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ConfigError, match=r"loss\.xbm_size \(16\).*24 embeddings.*data\.batch_size 8 x 3 devices"):
        task.setup("fit")
    task = _task(tmp_path, xbm_size=4)
    task.trainer = SimpleNamespace(world_size=1)
    with pytest.raises(ConfigError, match=r"loss\.xbm_size \(4\).*raise loss\.xbm_size to 8 or more, or set it to 0"):
        task.setup("fit")


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.5])  # an average of the weights copies (and averages) the memory too
def test_metric_learning_trains_an_epoch_with_xbm(tmp_path, monkeypatch, ema):
    from finegrain.tasks import engine
    from finegrain.tasks.losses import CrossBatchMemory

    seen: list[int] = []  # the memory's fill after each step
    forward = CrossBatchMemory.forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen.append(self.memory_size if self.has_been_filled else self.queue_idx)
        return out

    monkeypatch.setattr(CrossBatchMemory, "forward", spy)
    cfg = tiny_metric_config(tmp_path, name="xbm", loss={"xbm_size": 32}, train={"ema_decay": ema})
    run, _ = engine.fit(cfg, runs_root=tmp_path)
    assert seen[:5] == [8, 16, 24, 32, 32], seen  # batches of 8 fill the memory of 32, then it stays full
    rows = engine.read_history(run.history)
    assert len(rows) == 1 and float(rows[0]["train/loss"]) > 0, rows
    state = torch.load(run.last_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("loss_fn.") for k in state)  # the memory is not checkpointed
