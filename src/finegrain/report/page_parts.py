"""The pieces every report page is built from: the Jinja2 templates (``templates/``, package data)
that lay pages out and escape every value put in them, embedded PNG figures and "not drawn" notes."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from finegrain.errors import ConfigError
from finegrain.inference.explain import NoMaps

log = logging.getLogger(__name__)


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("finegrain.report", "templates"),
        autoescape=True,  # every value is text; the templates alone write markup
        undefined=jinja2.StrictUndefined,  # a name a template expects and is not given is an error
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    """The page ``templates/<template>`` filled with ``context``."""
    return _environment().get_template(template).render(**context)


def png_data_uri(path: Path) -> str:
    """``data:image/png;base64,...`` of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@dataclass(frozen=True)
class Figure:
    """A figure of a page: drawn (``uri`` is the embedded PNG, ``file`` its name beside the page)
    or not (``why`` says why)."""

    title: str
    caption: str = ""
    uri: str = ""
    file: str = ""
    why: str = ""


def skipped(what: str, why: str) -> Figure:
    """The note shown instead of a figure or section that could not be drawn."""
    return Figure(title=what, why=why)


def try_figure(title: str, build: Callable[[], Any], png: Path, caption: str) -> Figure:
    """Call ``build()`` to draw ``png`` and return it embedded, or a "not drawn" note when drawing fails."""
    try:
        build()
    except (ConfigError, NoMaps) as e:  # the figure does not apply to this run (a backbone without maps): say why
        log.info("%s: %s", title, e)
        return skipped(title, str(e))
    except Exception as e:  # noqa: BLE001 - one figure failing never loses the report
        log.warning("%s: %s", title, e)
        return skipped(title, f"drawing failed ({type(e).__name__}: {e})")
    return Figure(title=title, caption=caption, uri=png_data_uri(png), file=png.name)
