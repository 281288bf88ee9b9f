"""Reading YAML whose size once expanded is bounded: a few hundred bytes of nested anchors and
aliases (``&a [x, x, ...]``, ``&b [*a, *a, ...]``) would otherwise stand for billions of values
that every later step (validation, its error message, a diff) walks one by one."""

from __future__ import annotations

from typing import Any

import yaml

MAX_YAML_NODES = 100_000
"""The most values (scalars, lists and mappings, each alias counted at its expanded size) a YAML
document may stand for; a config holds a few hundred."""


class YamlTooLargeError(yaml.YAMLError):
    """A document that expands past :data:`MAX_YAML_NODES` values or refers to itself."""


def expanded_size(root: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """The number of values ``root`` stands for with every alias expanded; raises
    :class:`YamlTooLargeError` past ``limit`` or on an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > limit:
                raise YamlTooLargeError(
                    f"it expands to more than {limit:,} values (anchors and aliases nested to repeat themselves)"
                )
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YamlTooLargeError("an alias refers to the anchor that contains it")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml(text: str, limit: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load(text)``, refusing (:class:`YamlTooLargeError`) a document that stands for
    more than ``limit`` values once its aliases are expanded."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node, limit)
        return loader.construct_document(node)
    finally:
        loader.dispose()
