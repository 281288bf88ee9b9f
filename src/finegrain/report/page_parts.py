"""The pieces every report page is built from: its stylesheet, escaping, embedded PNG
figures, "not drawn" notes and key/value tables."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

from finegrain.errors import ConfigError

log = logging.getLogger(__name__)

REPORT_CSS = """
header { border-bottom: 2px solid #1a5fb4; margin-bottom: 1em; padding-bottom: .5em; }
header .desc { font-size: 1.05em; color: #444; margin: .2em 0 .6em; }
table.kv { border-collapse: collapse; font-size: .93em; }
table.kv th { text-align: left; padding: .2em 1.2em .2em 0; color: #555; font-weight: 500; vertical-align: top; }
table.kv td { padding: .2em 1.2em .2em 0; }
table.metrics { border-collapse: collapse; font-size: .93em; margin: .5em 0; }
table.metrics th, table.metrics td { border-bottom: 1px solid #ddd; padding: .3em .7em; text-align: left;
                                     vertical-align: top; }
table.metrics td.value { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600;
                         white-space: nowrap; }
table.metrics td.def { color: #555; font-size: .92em; }
table.metrics th { background: #f3f5f8; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; margin-top: .3em; }
p.skipped { color: #8a6d3b; background: #fcf8e3; padding: .4em .7em; border-left: 3px solid #e0c36b; }
details { margin: .6em 0; } summary { cursor: pointer; color: #1a5fb4; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 1em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em; }
.card h3 { margin: .1em 0 .3em; font-size: 1.05em; }
.card img { width: 100%; height: auto; }
.card .desc { color: #555; font-size: .9em; }
footer { margin-top: 2.5em; color: #777; font-size: .85em; border-top: 1px solid #ddd; padding-top: .5em; }
"""


def esc(x: Any) -> str:
    """``x`` as text escaped for HTML (quotes too)."""
    return html.escape(str(x), quote=True)


def png_data_uri(path: Path) -> str:
    """``data:image/png;base64,...`` of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure_html(png: Path, alt: str, caption: str) -> str:
    """A ``<figure>`` with ``png`` embedded and its caption."""
    return (
        f'<figure><img src="{png_data_uri(png)}" alt="{esc(alt)}">'
        f"<figcaption>{esc(caption)} Also saved as <code>{esc(png.name)}</code>.</figcaption></figure>"
    )


def skipped(what: str, why: str) -> str:
    """The note shown instead of a figure or section that could not be drawn."""
    return f'<p class="skipped"><b>{esc(what)}</b>: not drawn — {esc(why)}.</p>'


def kv_table(rows: list[tuple[str, str]]) -> str:
    """A two-column table of (label, value) rows."""
    return '<table class="kv">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>"


def try_figure(title: str, build, png: Path, caption: str) -> str:
    """Call ``build()`` to draw ``png`` and return it embedded, or a "not drawn" note when drawing fails."""
    try:
        build()
    except ConfigError as e:  # the figure does not apply to this run (a backbone without maps): say why
        log.info("%s: %s", title, e)
        return skipped(title, str(e))
    except Exception as e:  # noqa: BLE001 - one figure failing never loses the report
        log.warning("%s: %s", title, e)
        return skipped(title, f"drawing failed ({type(e).__name__}: {e})")
    return figure_html(png, title, caption)
