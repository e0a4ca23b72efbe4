"""The user documentation stays usable: the README is a short guide, every relative link in the
Markdown pages leads somewhere, and every documented command that runs a project script parses
with that script's own argument parser (and names a config that loads).

No Ray instance, no network: the pages are read, the scripts' modules imported, their parsers run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers import check_script_command

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOC_FILES = [
    README,
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "benchmarks" / "README.md",
    REPO / "infra" / "README.md",
]
README_MAX_LINES = 400
# The scripts a user runs; the README shows each of them once at least.
README_SCRIPTS = {
    "workflows/generate_synthetic.py",
    "workflows/preprocess.py",
    "workflows/train.py",
    "workflows/tune.py",
    "workflows/evaluate.py",
    "workflows/predict.py",
    "workflows/serve.py",
}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")
SCRIPT = re.compile(
    r"(?:^|[\s;&|(])((?:[\w.~-]*/)*python3?)\s+((?:workflows|benchmarks)/\w+\.py)(?=\s|$)"
)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def split_blocks(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code lines) of a Markdown file as (line number, text). Code is what fenced
    blocks hold and indented blocks (4 spaces after a blank line)."""
    prose, code = [], []
    fence = None
    indented = False
    previous_blank = True
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        marker = FENCE.match(line)
        if fence is not None:
            if marker and marker.group(1) == fence:
                fence = None
            else:
                code.append((number, line))
            previous_blank = False
            continue
        if marker:
            fence = marker.group(1)
            indented = False
            continue
        if line.startswith("    ") and (previous_blank or indented) and line.strip():
            indented = True
            code.append((number, line))
        elif line.strip():
            indented = False
            prose.append((number, line))
        previous_blank = not line.strip()
    return prose, code


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped but for - and spaces, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in split_blocks(path)[0]:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


# ----------------------------------------------------------------------------- README length


def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference "
        "material to docs/"
    )


# ----------------------------------------------------------------------------- links


class Link(NamedTuple):
    source: Path
    line: int
    target: str


def relative_links() -> list[Link]:
    links = []
    for path in DOC_FILES:
        for number, line in split_blocks(path)[0]:
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                if re.match(r"(?i)(https?:|mailto:)", target):
                    continue
                links.append(Link(path, number, target))
    return links


LINKS = relative_links()


def test_the_pages_have_relative_links():
    assert len(LINKS) >= 20, f"only {len(LINKS)} relative links found: is the parser broken?"


@pytest.mark.parametrize("link", LINKS, ids=lambda link: f"{rel(link.source)}:{link.line}")
def test_relative_link_resolves(link):
    where = f"{rel(link.source)}:{link.line}: [{link.target}]"
    file_part, _, anchor = link.target.partition("#")
    target = (link.source.parent / file_part).resolve() if file_part else link.source
    assert target.exists(), f"{where}: {file_part} does not exist"
    if anchor and target.suffix == ".md":
        assert anchor in anchors(target), (
            f"{where}: {rel(target)} has no heading with the anchor #{anchor}"
        )


# ----------------------------------------------------------------------------- commands


class Command(NamedTuple):
    source: Path
    line: int
    text: str
    argv: list[str]
    parse: bool


def logical_lines(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash-continued lines; each keeps the number of its first line."""
    out: list[tuple[int, str]] = []
    start, parts, last = 0, [], -1
    for number, line in code:
        if parts and number != last + 1:  # a continuation never crosses a gap between blocks
            out.append((start, " ".join(parts)))
            parts = []
        if not parts:
            start = number
        text = line.strip()
        last = number
        if text.endswith("\\"):
            parts.append(text[:-1].rstrip())
            continue
        parts.append(text)
        out.append((start, " ".join(parts)))
        parts = []
    if parts:
        out.append((start, " ".join(parts)))
    return out


def documented_commands() -> list[Command]:
    commands = []
    for path in DOC_FILES:
        for number, text in logical_lines(split_blocks(path)[1]):
            if text.startswith("#"):
                continue
            match = SCRIPT.search(text)
            if not match:
                continue
            rest = text[match.end(2) :]
            placeholder = "<" in rest or "..." in rest
            argv = [match.group(1), match.group(2)]
            if not placeholder:
                argv += shlex.split(rest, comments=True)
            commands.append(Command(path, number, text, argv, not placeholder))
    return commands


COMMANDS = documented_commands()


def test_the_pages_document_commands():
    assert len(COMMANDS) >= 10, f"only {len(COMMANDS)} commands found: is the parser broken?"
    assert sum(c.parse for c in COMMANDS) >= 10
    scripts = {c.argv[1] for c in COMMANDS}
    assert any(s.startswith("benchmarks/") for s in scripts), scripts
    in_readme = {c.argv[1] for c in COMMANDS if c.source == README}
    assert README_SCRIPTS <= in_readme, f"README.md shows no {sorted(README_SCRIPTS - in_readme)}"
    assert any(c.source == README and "ray job submit" in c.text for c in COMMANDS), (
        "README.md shows no `ray job submit` command"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{rel(c.source)}:{c.line}")
def test_documented_command_parses(command):
    check_script_command(
        command.argv, f"{rel(command.source)}:{command.line}: {command.text}", parse=command.parse
    )


def test_architecture_layout_names_every_module():
    """docs/ARCHITECTURE.md's layout table names every module of the production packages."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    modules = [
        p
        for pkg in ("pose2seg", "preprocessing", "workflows")
        for p in sorted((REPO / pkg).glob("*.py"))
        if p.name != "__init__.py"
    ]
    assert len(modules) > 40
    missing = [str(p.relative_to(REPO)) for p in modules if f"`{p.name}`" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"
