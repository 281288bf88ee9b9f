"""Train, then evaluate: the one sequence the CLI's ``train``, the demo and experiment suites run."""

from __future__ import annotations

from pathlib import Path

from finegrain.config import ExperimentConfig, config_to_yaml
from finegrain.runs import RunDir, create_run


def train_and_evaluate(cfg: ExperimentConfig, runs_root: Path = Path("runs"), resume: bool = False,
                       override_stored: bool = False, evaluate: bool = True) -> tuple[RunDir, dict | None]:
    """Train ``cfg`` into ``runs_root/<name>`` (a kNN row trains nothing: its run is only created;
    a resumed run whose training already ended with this config is not trained again), then
    evaluate it on its test split. Returns the run and its metrics (None when not evaluated,
    or on a DDP process other than the first)."""
    from finegrain.tasks.engine import fit
    from finegrain.tasks.evaluate import evaluate_run

    run = RunDir(runs_root / cfg.name)
    trained = (resume and run.config_file.is_file() and run.training_finished()
               and run.config_file.read_text() == config_to_yaml(cfg))
    global_zero = True
    if not cfg.trains or trained:
        run = create_run(cfg, runs_root, resume=resume, override_stored=override_stored)
    else:
        run, global_zero = fit(cfg, runs_root=runs_root, resume=resume, override_stored=override_stored)
    metrics = evaluate_run(run.path) if evaluate and global_zero else None
    return run, metrics
