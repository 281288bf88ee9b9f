"""The documentation holds together: its links resolve, the commands it shows exist with the
options it gives them, and the user pages name no issue numbers or paths of our machines."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from finegrain.cli import app

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
ALL_DOCS = sorted(
    [*USER_DOCS, *(ROOT / name for name in ("CONTRIBUTING.md", "CHANGELOG.md", "RESULTS.md", "BENCHMARKS.md"))]
)
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)
SHELL_FENCE = re.compile(r"^[ \t]*```(?:bash|sh|shell|console)\n(.*?)^[ \t]*```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:^|\s)finegrain\s+(.+)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6}\s+(.+?)\s*$", line):
            slug = _slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("path", ALL_DOCS, ids=_rel)
def test_relative_links_and_anchors_resolve(path):
    broken = []
    for target in _links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {_rel(dest)})")
    assert not broken, f"{_rel(path)}: broken links: {broken}"


def test_the_slug_rule_matches_githubs():
    assert (
        _slug("ONNX Runtime: faster on a CPU, and serving without PyTorch")
        == "onnx-runtime-faster-on-a-cpu-and-serving-without-pytorch"
    )
    assert _slug("A new user's flow, old precision against new") == "a-new-users-flow-old-precision-against-new"
    assert _slug("Current: the shipped `cpu45` profiles") == "current-the-shipped-cpu45-profiles"


@pytest.mark.parametrize("path", USER_DOCS, ids=_rel)
def test_user_docs_name_no_issue_numbers_or_our_paths(path):
    text = path.read_text()
    assert "../shared" not in text and "/work/" not in text
    assert not re.search(r"\bissues? #?\d+", text, re.I), re.search(r".{0,40}\bissues? #?\d+.{0,40}", text, re.I)


def _commands(path: Path) -> list[str]:
    """Every ``finegrain ...`` command line the page shows, in shell code blocks and inline code."""
    text = path.read_text()
    spans = [block.replace("\\\n", " ") for block in SHELL_FENCE.findall(text)]  # continued lines joined
    spans += [code.strip("`") for code in INLINE_CODE.findall(FENCE.sub("", text))]
    out = []
    for span in spans:
        for line in span.splitlines():
            line = line.split(" #", 1)[0].replace("\\|", "|")
            if match := COMMAND.search(line):
                out.append(match.group(1).strip())
    return out


def _resolve(root: Any, words: list[str]) -> tuple[Any, list[str]]:
    """The (click) sub-command the words name, and the words after it."""
    command = root
    while words and words[0] in getattr(command, "commands", {}):
        command, words = command.commands[words[0]], words[1:]
    return command, words


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}


@pytest.mark.parametrize("path", [*USER_DOCS, ROOT / "CONTRIBUTING.md", ROOT / "RESULTS.md"], ids=_rel)
def test_documented_commands_and_options_exist(path):
    root = typer.main.get_command(app)
    wrong = []
    for line in _commands(path):
        words = [w.strip("[]") for w in shlex.split(line.replace("[", " ").replace("]", " "))]
        command, rest = _resolve(root, words)
        if command is root:
            wrong.append(f"'finegrain {line}': no command '{words[0] if words else ''}'")
            continue
        unknown = {w.split("=", 1)[0] for w in rest if w.startswith("-") and w != "-"} - _options(command)
        if unknown:
            wrong.append(f"'finegrain {line}': no option {sorted(unknown)}")
    assert not wrong, f"{_rel(path)}: {wrong}"


def test_the_command_check_sees_a_wrong_command_and_option(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `finegrain trian CONFIG` or\n\n```bash\nfinegrain index RUN --kinds flat  # typo\n```\n\n"
        "```text\nfinegrain demo: results (output, not a command)\n```\n"
    )
    assert _commands(page) == ["index RUN --kinds flat", "trian CONFIG"]
    root = typer.main.get_command(app)
    command, rest = _resolve(root, ["index", "RUN", "--kinds", "flat"])
    assert command.name == "index" and "--kinds" not in _options(command) and "--kind" in _options(command)
    assert _resolve(root, ["trian", "CONFIG"])[0] is root
