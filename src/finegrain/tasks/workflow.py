"""Train, then evaluate: the one sequence the CLI's ``train``, the demo and experiment suites run."""

from __future__ import annotations

import logging
from pathlib import Path

from finegrain.config import ExperimentConfig, config_to_yaml
from finegrain.errors import FinegrainError
from finegrain.runs import RunDir, create_run
from finegrain.tasks.evaluate import evaluate_run
from finegrain.tasks.export import export_run

log = logging.getLogger(__name__)


def train_and_evaluate(
    cfg: ExperimentConfig,
    runs_root: Path = Path("runs"),
    resume: bool = False,
    override_stored: bool = False,
    evaluate: bool = True,
    deadline: float | None = None,
) -> tuple[RunDir, dict | None]:
    """Train ``cfg`` into ``runs_root/<name>`` (a kNN row trains nothing: its run is only created;
    a resumed run whose training already ended with this config is not trained again), then
    evaluate it on its test split (with ``eval.export_onnx``, exported first and evaluated on ONNX
    Runtime). Returns the run and its metrics (None when not evaluated, or on a DDP process other
    than the first). ``deadline``: the ``time.monotonic`` instant training must stop by (``--budget``)."""
    # optional: torch, Lightning (the train extra), imported only when this runs
    from finegrain.tasks.engine import fit

    run = RunDir(runs_root / cfg.name)
    trained = (
        resume
        and run.config_file.is_file()
        and run.training_finished()
        and run.config_file.read_text() == config_to_yaml(cfg)
    )
    global_zero = True
    if not cfg.trains or trained:
        run = create_run(cfg, runs_root, resume=resume, override_stored=override_stored)
    else:
        run, global_zero = fit(
            cfg, runs_root=runs_root, resume=resume, override_stored=override_stored, deadline=deadline
        )
    if not (evaluate and global_zero):
        return run, None
    if cfg.trains and cfg.eval.export_onnx:
        try:
            export_run(run.path)  # evaluation (engine auto) then runs the export
        except FinegrainError as e:  # say, ONNX Runtime not installed: the trained model still evaluates
            log.warning("eval.export_onnx: not exported (%s); evaluating with PyTorch", e)
    return run, evaluate_run(run.path)
