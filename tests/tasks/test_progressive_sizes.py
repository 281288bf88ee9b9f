"""Progressive resizing (``data.progressive_sizes``): each epoch's training size, a tiny run and its
resume at the size of the epoch it resumes in, ``data prepare``'s sizes, and the config's refusals."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Callback

from finegrain.config import build_config
from finegrain.data.module import sizes_read, train_size
from finegrain.errors import ConfigError
from finegrain.tasks import engine
from tests.conftest import CrashAt, tiny_config

STAGES = [[16, 20, 2], [24, 24, 1]]


class TrainingSizes(Callback):
    """The (epoch, height, width) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, *batch[0].shape[2:]))


def _config(tmp_path, name: str):
    return tiny_config(
        tmp_path,
        name=name,
        model={"backbone": "resnet18"},
        data={"augment": "light", "progressive_sizes": STAGES},
        train={"epochs": 5},
    )


def test_each_epoch_trains_at_its_stage_size_then_at_image_size():
    cfg = build_config({"data": {"image_size": [32, 48], "progressive_sizes": STAGES}, "train": {"epochs": 5}})
    assert [train_size(cfg.data, e) for e in range(5)] == [(16, 20), (16, 20), (24, 24), (32, 48), (32, 48)]
    assert train_size(build_config({}).data, 3) == (224, 224)  # no stages: always image_size
    # `data prepare` caches the stages' sizes too, after the training and evaluation sizes
    assert sizes_read(cfg.data) == [(32, 48), (16, 20), (24, 24)]


@pytest.mark.slow
def test_a_run_trains_each_stage_at_its_size_and_resumes_at_the_right_one(tmp_path, monkeypatch):
    original = engine.trainer_for
    spies: list[TrainingSizes] = []

    def spying_trainer(*args, **kwargs):
        t = original(*args, **kwargs)
        spies.append(TrainingSizes())
        t.callbacks.append(spies[-1])
        return t

    monkeypatch.setattr(engine, "trainer_for", spying_trainer)
    engine.fit(_config(tmp_path, "unbroken"), runs_root=tmp_path)
    expected = {0: (16, 20), 1: (16, 20), 2: (24, 24), 3: (32, 32), 4: (32, 32)}
    assert {e: (h, w) for e, h, w in spies[0].seen} == expected

    def crashing_trainer(*args, **kwargs):
        t = spying_trainer(*args, **kwargs)
        t.callbacks.append(CrashAt(epoch=2, batch=1))  # in the second stage
        return t

    monkeypatch.setattr(engine, "trainer_for", crashing_trainer)
    cfg = _config(tmp_path, "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.fit(cfg, runs_root=tmp_path)
    monkeypatch.setattr(engine, "trainer_for", spying_trainer)
    engine.fit(cfg, runs_root=tmp_path, resume=True)
    resumed = {e: (h, w) for e, h, w in spies[-1].seen}
    assert min(resumed) == 2 and resumed == {e: s for e, s in expected.items() if e >= 2}


@pytest.mark.parametrize(
    "sections, words",
    [
        ({"data": {"progressive_sizes": [[16, 16, 3]]}, "train": {"epochs": 3}}, "none would train at data.image_size"),
        ({"data": {"progressive_sizes": [[16, 16, 0]]}}, r"stage \[16, 16, 0\]"),
        ({"data": {"progressive_sizes": [[4, 16, 1]]}}, r"stage \[4, 16, 1\]"),
        (
            {
                "data": {"progressive_sizes": [[16, 16, 1]]},
                "model": {"freeze_stages": 2},
                "train": {"frozen_cache_views": 2},
            },
            "cannot be combined with train.frozen_cache_views",
        ),
    ],
)
def test_the_config_refuses_stages_it_cannot_train(sections, words):
    with pytest.raises(ConfigError, match=f"data.progressive_sizes.*{words}"):
        build_config(sections)
