"""Precision ``auto`` per phase (finegrain.tasks.phase_precision): where the CPU computes bf16 natively,
the frozen cache is built in the evaluation's precision (fp32 on the ONNX export, else bf16) and the
cached training steps run in whichever precision a probe found faster; elsewhere, and for explicit
precisions, one precision for both. The CPU's detection and
the probe's timings are patched both ways: the decision must follow them, whatever CPU runs the tests."""

from __future__ import annotations

import json

import pytest
import torch

from finegrain import machine
from finegrain.inference import engines
from finegrain.models.build import build_from_config, num_outputs
from finegrain.tasks import engine, phase_precision
from tests.conftest import tiny_config

SHORT = {"32": "fp32", "bf16-mixed": "bf16"}
"""How the log line and the report name Lightning's precisions."""
CACHED = {"model": {"backbone": "resnet18", "freeze_stages": 3}, "train": {"epochs": 1, "frozen_cache_views": 2}}


@pytest.fixture
def cpu(monkeypatch):
    """Set whether this (GPU-less) machine's CPU computes bf16 natively."""
    monkeypatch.setattr(machine, "cuda_available", lambda: False)

    def native(has: bool) -> None:
        monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: has)

    return native


@pytest.fixture
def probe(monkeypatch):
    """Make the probe report ``faster`` as the faster precision, and count its calls."""
    calls = []

    def set_faster(faster: str) -> list:
        def timed(model, cfg):
            calls.append(cfg.data.image_size)
            return {p: (30.0 if p == faster else 20.0) for p in phase_precision.CANDIDATES}

        monkeypatch.setattr(phase_precision, "time_cached_step", timed)
        return calls

    return set_faster


def model_of(cfg):
    return build_from_config(cfg, num_outputs(cfg, 4), None)


@pytest.mark.parametrize(
    "export_onnx, onnxruntime, cache",
    [
        (False, True, "bf16-mixed"),
        (True, True, "32"),  # evaluated on ONNX Runtime, in fp32
        (True, False, "bf16-mixed"),  # no ONNX Runtime: the evaluation runs on PyTorch, in bf16 here
    ],
)
@pytest.mark.parametrize("faster", ["32", "bf16-mixed"])
def test_auto_on_a_native_bf16_cpu_caches_as_the_evaluation_runs_and_trains_in_the_faster(
    tmp_path, cpu, probe, monkeypatch, faster, export_onnx, onnxruntime, cache
):
    cpu(True)
    monkeypatch.setattr(engines, "onnxruntime_available", lambda: onnxruntime)
    calls = probe(faster)
    cfg = tiny_config(tmp_path, **CACHED, eval={"export_onnx": export_onnx})
    chosen = phase_precision.choose(cfg, model_of(cfg))
    assert (chosen.cache, chosen.steps) == (cache, faster)
    assert chosen.images_per_second[faster] == 30.0 and len(calls) == 1
    assert chosen.words().startswith(
        f"precision auto: frozen cache in {SHORT[cache]}, training steps in {SHORT[faster]} ("
    )


@pytest.mark.parametrize(
    "native, precision, sections, expected",
    [
        (False, "auto", CACHED, "32"),  # auto is fp32 everywhere on this CPU: nothing to choose
        (True, "auto", {"train": {"epochs": 1}}, "bf16-mixed"),  # no cache: one workload
        (True, "32", CACHED, "32"),  # explicit precisions are obeyed in both phases
        (True, "bf16-mixed", CACHED, "bf16-mixed"),
        (True, "auto", {**CACHED, "train": {**CACHED["train"], "devices": 2}}, "bf16-mixed"),  # processes train alike
    ],
)
def test_no_probe_where_there_is_nothing_to_choose(tmp_path, cpu, probe, native, precision, sections, expected):
    cpu(native)
    calls = probe("32" if expected != "32" else "bf16-mixed")  # the probe would disagree, were it asked
    cfg = tiny_config(tmp_path, **{**sections, "train": {**sections["train"], "precision": precision}})
    chosen = phase_precision.choose(cfg, model_of(cfg))
    assert (chosen.cache, chosen.steps, chosen.images_per_second) == (expected, expected, {})
    assert calls == []


@pytest.mark.slow
def test_the_probe_times_both_and_leaves_the_model_and_the_random_state_alone(tmp_path):
    cfg = tiny_config(tmp_path, **CACHED)
    model = model_of(cfg)
    from finegrain.models.freezing import apply_freeze

    apply_freeze(model, "none", 3)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    speeds = phase_precision.time_cached_step(model, cfg, batch=2, rounds=1)
    assert set(speeds) == set(phase_precision.CANDIDATES) and all(v > 0 for v in speeds.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training  # the probe trained a copy
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("faster, export_onnx", [("32", False), ("bf16-mixed", False), ("bf16-mixed", True)])
def test_a_run_builds_its_cache_as_evaluated_and_trains_in_the_probes_choice(
    tmp_path, cpu, probe, monkeypatch, faster, export_onnx
):
    cpu(True)
    monkeypatch.setattr(engines, "onnxruntime_available", lambda: True)
    probe(faster)
    seen: dict[str, object] = {"cache": []}
    make_task, trainer_for = engine.make_task, engine.trainer_for

    def spying_task(*args, **kwargs):
        task = make_task(*args, **kwargs)
        prefix = task.model.frozen_prefix

        def recorded(x):
            seen["cache"].append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            return prefix(x)

        task.model.frozen_prefix = recorded
        return task

    def spying_trainer(*args, **kwargs):
        trainer = trainer_for(*args, **kwargs)
        seen["trainer"] = trainer.precision
        return trainer

    monkeypatch.setattr(engine, "make_task", spying_task)
    monkeypatch.setattr(engine, "trainer_for", spying_trainer)
    run, _ = engine.fit(tiny_config(tmp_path, **CACHED, eval={"export_onnx": export_onnx}), runs_root=tmp_path)

    assert seen["trainer"] == {"32": "32-true"}.get(faster, faster)  # Lightning's name for fp32
    cache = "32" if export_onnx else "bf16-mixed"
    # every cache batch ran in bf16, or without autocast for an fp32 ONNX test
    assert seen["cache"] and set(seen["cache"]) == {torch.bfloat16 if cache == "bf16-mixed" else False}
    recorded = json.loads(run.precision_file.read_text())
    assert (recorded["requested"], recorded["cache"], recorded["steps"]) == ("auto", cache, faster)
    assert run.training_finished()

    # evaluation keeps the choice beside the metrics, and the report says it
    from finegrain.report.run_sections import config_brief
    from finegrain.tasks.evaluate import evaluate_run

    metrics = evaluate_run(run.path)
    assert metrics["training_precision"]["steps"] == faster
    row = dict(config_brief(run.load_config(), metrics))["precision"]
    assert row.startswith(f"auto: frozen cache in {SHORT[cache]}, training steps in {SHORT[faster]}"), row


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", '{"images_per_second": "fast"}'])
def test_a_strangers_precision_file_is_ignored_not_fatal(tmp_path, trained_run, content):
    import shutil

    from finegrain.report.run_sections import precision_words
    from finegrain.runs import open_run

    run = open_run(shutil.copytree(trained_run, tmp_path / "run"))
    run.precision_file.write_text(content)
    phases = run.training_precision()
    assert phases is None or precision_words("auto", phases) == "auto"
