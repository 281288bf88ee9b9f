"""What every command shares: the consoles, the common options and ``--json`` printing."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.logging import RichHandler
from rich.rule import Rule

PIPE_WIDTH = 10_000  # columns of stdout when it is not a terminal: no file name is cut or folded
RULE_WIDTH = 100  # a rule (section line) in a log file


class PipeConsole(Console):
    """A rich console that, when its output is not a terminal (``> log.txt``, a pipe, nohup), is
    :data:`PIPE_WIDTH` columns wide unless a width was given, so tables print every file name
    whole instead of cutting it at 80 columns with an ellipsis; rules stay :data:`RULE_WIDTH` wide."""

    _fixed_width = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fixed_width = kwargs.get("width") is not None

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if not self._fixed_width and not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self.width, self.height = new_size  # Console's own setters, as its size setter does

    def rule(self, title: Any = "", *, characters: str = "─", style: Any = "rule.line", align: Any = "center") -> None:

        self.print(
            Rule(title=title, characters=characters, style=style, align=align),
            width=None if self.is_terminal else RULE_WIDTH,
        )


console = PipeConsole(stderr=False)
err_console = Console(stderr=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set optim.lr=0.01 (repeatable)."),
]
ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="A profile of the config, e.g. quick.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (for scripts), nothing else.")]
EngineOpt = Annotated[
    str,
    typer.Option(
        help="What runs the model: torch, onnx (RUN/export/model.onnx, `finegrain export RUN`), onnx-int8, or auto "
        "(onnx when the run has an export of its current checkpoint, else torch)."
    ),
]
RunsOpt = Annotated[Path, typer.Option(help="Folder that holds run directories.")]
IndexDirOpt = Annotated[Path | None, typer.Option("--index", help="Index folder (default RUN/index).")]


def jsonable(obj: Any) -> Any:
    """``obj`` with paths as strings, numpy numbers as Python's and NaN/infinity as null (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def print_json(data: Any) -> None:
    """``data`` as one JSON document on stdout."""
    typer.echo(json.dumps(jsonable(data), indent=2, ensure_ascii=False))


@contextlib.contextmanager
def stdout_for(as_json: bool) -> Iterator[None]:
    """With ``--json``, whatever the work prints (progress, library messages) goes to stderr,
    so stdout carries the JSON document alone."""
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def setup_logging(verbose: bool) -> None:
    """Log records on stderr: rich's layout on a terminal; in a file or a pipe one plain line a
    record, as rich would fold it at 80 columns (cutting paths, padding every line with spaces)."""
    handler: logging.Handler
    if err_console.is_terminal:
        handler = RichHandler(console=err_console, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in ("PIL", "matplotlib", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
