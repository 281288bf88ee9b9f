"""``finegrain demo``: the whole flow on the built-in synthetic data (or ``--data PATH``).

Trains a small classifier and an embedding model, evaluates both, builds the
gallery index, runs a sample search and prints a summary. Finished runs are
reused, so running it again is quick.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finegrain.config import ExperimentConfig, data_override, load_config
from finegrain.data.images import open_rgb
from finegrain.report.contact_sheet import contact_sheet
from finegrain.retrieval.gallery import build_index
from finegrain.retrieval.searcher import Searcher
from finegrain.runs import RunDir
from finegrain.tasks.workflow import train_and_evaluate


def _train_or_reuse(cfg: ExperimentConfig, runs_root: Path, console: Console) -> RunDir:

    run = RunDir(runs_root / cfg.name)
    if run.is_finished():
        console.print(f"[dim]{run.path} is already trained and evaluated; reusing it (delete it to retrain)[/]")
        return run
    console.rule(f"[bold]{cfg.name}[/]: {cfg.description}")
    # an interrupted demo continues, with this call's settings (say, another --epochs)
    run, _ = train_and_evaluate(cfg, runs_root, resume=run.has_started(), override_stored=True)
    return run


def _data_overrides(data: Path | None) -> list[str]:
    if data is None:
        return []
    # your test split is the test; where there is none, a stratified half of train (classification) or the
    # second half of the classes (retrieval; the built-in data's retrieval test is always its unseen classes)
    return [data_override(data), "data.num_workers=2", "data.holdout=auto", "data.holdout_fraction=0.5"]


def run_demo(
    console: Console, data: Path | None = None, runs_root: Path = Path("runs"), epochs: int | None = None
) -> dict:
    """Run the demo; returns the headline numbers."""

    t0 = time.perf_counter()
    sets = _data_overrides(data)
    if epochs:
        sets.append(f"train.epochs={epochs}")
    suffix = "" if data is None else "-" + Path(data).resolve().name.replace(".", "_")
    clf_cfg = load_config("demo-classifier", overrides=sets + [f"name=demo-classifier{suffix}"])
    ret_cfg = load_config("demo-retrieval", overrides=sets + [f"name=demo-retrieval{suffix}"])

    clf = _train_or_reuse(clf_cfg, runs_root, console)
    ret = _train_or_reuse(ret_cfg, runs_root, console)

    console.rule("[bold]index and search[/]")
    index_dir, info = build_index(ret.path, gallery="test")
    unseen = ret.read_metrics().get("tested_on", {}).get("source") == "held-out classes"
    console.print(
        f"indexed {info['n']} test images{' of the unseen classes' if unseen else ''} ({info['dim']}-d) in {index_dir}"
    )
    searcher = Searcher(ret.path)
    query_path = searcher.index.paths[0]
    query, _ = open_rgb(query_path)
    hits, _ = searcher.search(query, k=min(8, searcher.gallery_size))
    sheet = contact_sheet(query, hits, ret.report / "sample_search.png", query_label=hits[0].label if hits else None)
    same = sum(h.label == hits[0].label for h in hits[1:])
    console.print(
        f"sample search for {query_path}: the image itself first (score {hits[0].score:.3f}), "
        f"{same} of the next {len(hits) - 1} from the same class; contact sheet {sheet}"
    )

    c = clf.read_metrics()["classification"]
    r = ret.read_metrics()["retrieval"]
    table = Table(title="finegrain demo: results on the test split", show_lines=False)
    for col in ("run", "protocol", "top-1", "F1 (macro)", "Recall@1", "Recall@4", "MAP@R"):
        table.add_column(col, justify="right" if col not in ("run", "protocol") else "left")
    table.add_row(clf.name, "classification", f"{c['top1']:.1%}", f"{c['f1_macro']:.1%}", "", "", "")
    table.add_row(
        ret.name,
        "retrieval (unseen classes)" if unseen else "retrieval",
        "",
        "",
        f"{r['recall@1']:.1%}",
        f"{r['recall@4']:.1%}",
        f"{r['map@r']:.1%}",
    )
    console.print(table)
    # optional: matplotlib (the train extra), imported only when this runs
    from finegrain.report.html import write_multi_report

    report = write_multi_report([clf.path, ret.path], runs_root / f"demo{suffix}-report.html", title="finegrain demo")
    console.print(f"run directories: {clf.path}, {ret.path}")
    console.print(f"report: [bold]{report}[/] (each run's own report is linked from it)")
    console.print(f"done in {time.perf_counter() - t0:.0f} s")
    return {"classification": c, "retrieval": r}
