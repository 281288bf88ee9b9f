"""The ``finegrain`` command line: one entry point, one sub-command per job.

The commands live by what they do in :mod:`~finegrain.cli.data`, :mod:`~finegrain.cli.train`,
:mod:`~finegrain.cli.retrieval` and :mod:`~finegrain.cli.info`, and are registered here in the
order ``finegrain --help`` lists them. Library modules are imported inside each command so that
``finegrain --help`` stays fast. Every :class:`~finegrain.errors.FinegrainError` is printed as one
line and ends the program with exit code 2.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from finegrain.cli import data, info, retrieval, train
from finegrain.cli.common import console, err_console, setup_logging
from finegrain.errors import FinegrainError

__all__ = ["app", "console", "err_console", "main"]

app = typer.Typer(
    name="finegrain",
    help="Fine-grained image recognition and retrieval: train, evaluate, index, search, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect, prepare, synthesise and download datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
experiments_app = typer.Typer(help="Run the experiment catalogue and compare the results.", no_args_is_help=True)
app.add_typer(experiments_app, name="experiments")


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging.")] = False) -> None:
    setup_logging(verbose)


for _name, _command in (
    ("train", train.train), ("evaluate", train.evaluate),
    ("embed", retrieval.embed), ("index", retrieval.index), ("search", retrieval.search),
    ("demo", train.demo), ("report", train.report), ("export", train.export), ("serve", retrieval.serve),
    ("configs", train.configs), ("info", info.info),
):
    app.command(_name)(_command)
for _name, _command in (
    ("check", data.data_check), ("prepare", data.data_prepare), ("synth", data.data_synth),
    ("download", data.data_download),
):
    data_app.command(_name)(_command)
experiments_app.command("run")(train.experiments_run)
del _name, _command


def main() -> None:
    """Console entry point."""
    try:
        app()
    except FinegrainError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # one line
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: checkpoints already written are kept; use --resume to continue")
        sys.exit(130)
