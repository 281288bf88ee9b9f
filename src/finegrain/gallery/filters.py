"""Search filters: the label, or equality on one metadata field, checked before any backend sees them.

A filter is sent as a JSON object with one entry: ``{"label": "Tesla Model S"}`` or
``{"metadata.colour": "red"}``. Field names are plain identifiers; values are strings, numbers or
booleans. Backends never paste a value into a query: SQLite binds it as a parameter, Milvus gets
it as an escaped literal (:func:`milvus_literal`) in an expression built only from a checked name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from finegrain.errors import FinegrainError

FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
METADATA_PREFIX = "metadata."
MAX_VALUE_CHARS = 1000
Scalar = str | int | float | bool


@dataclass(frozen=True)
class Filter:
    """``field`` is ``label`` or ``metadata.<name>``; ``value`` what it must equal."""

    field: str
    value: Scalar

    @property
    def metadata_key(self) -> str | None:
        """The metadata field's name, or None for a label filter."""
        return self.field[len(METADATA_PREFIX) :] if self.field.startswith(METADATA_PREFIX) else None


def check_value(value: Any, what: str) -> Scalar:
    """A filter or metadata value: a string (at most 1,000 characters), a finite number or a boolean."""
    if isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**63):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= MAX_VALUE_CHARS:
        return value
    raise FinegrainError(f"{what} must be a string (at most {MAX_VALUE_CHARS} characters), a number or a boolean")


def make_filter(field: str, value: Any) -> Filter:
    """A checked :class:`Filter`."""
    key = field[len(METADATA_PREFIX) :] if field.startswith(METADATA_PREFIX) else None
    if field != "label" and (key is None or not FIELD_RE.fullmatch(key)):
        raise FinegrainError(
            "a filter names 'label' or 'metadata.NAME' (NAME: letters, digits and _, "
            f"at most 64); got {json.dumps(field[:40])}"
        )
    if field == "label" and not isinstance(value, str):
        raise FinegrainError("a label filter's value must be a string")
    return Filter(field, check_value(value, f"the value of filter {field}"))


def parse_filter(text: str | None) -> Filter | None:
    """The filter a client sent as JSON text (None for none or an empty string)."""
    if text is None or not text.strip():
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        raise FinegrainError(
            'the filter must be a JSON object such as {"label": "NAME"} or {"metadata.FIELD": VALUE}'
        ) from None
    if not isinstance(obj, dict) or len(obj) != 1:
        raise FinegrainError("the filter must be a JSON object with exactly one entry")
    [(field, value)] = obj.items()
    return make_filter(str(field), value)


def check_metadata(metadata: Any) -> dict[str, Scalar | None]:
    """Metadata as stored: a JSON object of at most 64 fields, plain names, scalar (or null) values."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise FinegrainError("metadata must be a JSON object")
    if len(metadata) > 64:
        raise FinegrainError("metadata holds at most 64 fields")
    out: dict[str, Scalar | None] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not FIELD_RE.fullmatch(key):
            raise FinegrainError(
                f"metadata field names are letters, digits and _ (at most 64); got {json.dumps(str(key)[:40])}"
            )
        out[key] = None if value is None else check_value(value, f"metadata field {key}")
    return out


def parse_metadata(text: str | None) -> dict[str, Scalar | None]:
    """Metadata sent as JSON text (empty: none)."""
    if text is None or not text.strip():
        return {}
    try:
        return check_metadata(json.loads(text))
    except ValueError:
        raise FinegrainError('metadata must be a JSON object such as {"sku": "A-12"}') from None


def check_label(label: Any) -> str:
    """A label: a string of at most 200 characters without control characters."""
    if not isinstance(label, str) or len(label) > 200 or any(ord(c) < 32 for c in label):
        raise FinegrainError("a label is text of at most 200 characters, without control characters")
    return label


def milvus_literal(value: Scalar) -> str:
    """A value as a Milvus expression literal: strings quoted with ``\\`` and ``"`` escaped (control
    characters refused), numbers and booleans as Milvus writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise FinegrainError("filter values on the milvus backend cannot hold control characters")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def milvus_expression(where: Filter) -> str:
    """A filter as a Milvus boolean expression, built only from a checked field name and an escaped literal."""
    key = where.metadata_key
    if key is not None and not FIELD_RE.fullmatch(key):  # make_filter checked it; never paste an unchecked name
        raise FinegrainError("bad metadata field name in a filter")
    field = "label" if key is None else f'metadata["{key}"]'
    return f"{field} == {milvus_literal(where.value)}"
