"""The README and docs/ stay short, linked and true to the CLI.

README.md is a page (at most 220 lines); every relative link in it and in docs/*.md reaches a file (and a heading,
when it names an anchor); every `nirvana …` and `nirvana-client …` command in a ```bash block names a subcommand and
long options that the typer apps' own `--help` lists.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
OPTION = re.compile(r"--[A-Za-z0-9][\w-]*")
# A wide help screen: rich's boxes stay on one line per option, so no option name is cut short.
HELP_ENV = {"TERMINAL_WIDTH": "300", "COLUMNS": "300", "NO_COLOR": "1"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _split_fences(text: str) -> tuple[list[str], list[tuple[str, list[tuple[int, str]]]]]:
    """The page's prose lines (code blocks blanked) and its fenced blocks as (language, [(line number, line)])."""
    prose: list[str] = []
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    current: tuple[str, list[tuple[int, str]]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line.strip())
        if fence and current is None:
            current = (fence.group(1), [])
            prose.append("")
        elif line.strip().startswith("```") and current is not None:
            blocks.append(current)
            current = None
            prose.append("")
        elif current is not None:
            current[1].append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks included) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def _anchors(path: Path) -> frozenset[str]:
    prose, _ = _split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return frozenset(anchors)


def test_readme_is_a_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move reference material into docs/"


def test_docs_exist() -> None:
    assert DOCS, "docs/*.md is empty"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page: Path) -> None:
    prose, _ = _split_fences(page.read_text(encoding="utf-8"))
    broken = []
    for number, line in enumerate(prose, start=1):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{_rel(page)}:{number}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_rel(page)}:{number}: {target} (no heading #{anchor} in {_rel(dest)})")
    assert not broken, "\n".join(broken)


# --- commands in ```bash blocks -------------------------------------------------------------------------------


def _apps():
    from nirvana_cli.main import app as nirvana_app
    from nirvana_client.cli import app as client_app

    return {"nirvana": nirvana_app, "nirvana-client": client_app}


@cache
def _help(program: str, path: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
    """(subcommands, long options) that `program *path --help` lists, read from the help screen itself."""
    result = CliRunner().invoke(_apps()[program], [*path, "--help"], env=HELP_ENV)
    assert result.exit_code == 0, f"{program} {' '.join(path)} --help failed:\n{result.output}"
    commands: set[str] = set()
    options: set[str] = set()
    panel = ""
    for line in result.output.splitlines():
        header = re.match(r"^\s*[╭+]─+\s*(.+?)\s*─", line)
        if header:
            panel = header.group(1)
            continue
        row = re.match(r"^\s*│ (.*)", line)
        if not row:
            continue
        cells = row.group(1)
        if panel == "Commands":
            name = re.match(r"^([a-z][\w-]*)\s", cells)
            if name:
                commands.add(name.group(1))
        elif panel == "Options":
            # "*  --out  -o  <path>  Directory …": names come before the metavar (or the text, for --help).
            for token in cells.lstrip("* ").split():
                if not token.startswith("-"):
                    break
                options.update(OPTION.findall(token))
    return frozenset(commands), frozenset(options)


def _commands(block: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """Each shell command of a bash block as (line number, words): continuations joined, comments, quoted strings
    and `$(…)` dropped, split at `&&`, `||`, `;`, `|` and `&`."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in block:
        text = line if pending is None else pending[1] + " " + line.strip()
        start = number if pending is None else pending[0]
        if text.rstrip().endswith("\\"):
            pending = (start, text.rstrip()[:-1])
            continue
        pending = None
        joined.append((start, text))
    if pending is not None:
        joined.append(pending)
    commands = []
    for number, text in joined:
        text = re.sub(r"'[^']*'|\"[^\"]*\"", " STR ", text)
        text = re.sub(r"\$\([^)]*\)", "X", text)
        text = re.sub(r"(^|\s)#.*$", "", text)
        for part in re.split(r"\s(?:&&|\|\||;|\||&)(?=\s|$)|;", text):
            words = part.split()
            while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value before the command
                words.pop(0)
            if words:
                commands.append((number, words))
    return commands


def _cli_uses() -> list[tuple[str, str, list[str], list[str]]]:
    """(where, program, [subcommand, …], [--option, …]) for every nirvana/nirvana-client command in bash blocks."""
    uses = []
    for page in PAGES:
        _, blocks = _split_fences(page.read_text(encoding="utf-8"))
        for language, block in blocks:
            if language not in ("bash", "sh", "shell", "console"):
                continue
            for number, words in _commands(block):
                program = words[0].rsplit("/", 1)[-1]
                if program not in ("nirvana", "nirvana-client"):
                    continue
                rest = words[1:]
                path: list[str] = []
                if rest and not rest[0].startswith("-"):
                    path.append(rest.pop(0))
                    subcommands, _ = _help(program, ())
                    if path[0] in subcommands:
                        group, _ = _help(program, tuple(path))
                        if group and rest and rest[0] in group:
                            path.append(rest.pop(0))
                options = []
                for word in rest:
                    word = word.strip("[]")
                    if word == "--":
                        break
                    if word.startswith("--"):
                        options.append(word.split("=", 1)[0])
                uses.append((f"{_rel(page)}:{number}", program, path, options))
    return uses


def test_bash_blocks_have_cli_commands() -> None:
    programs = {program for _, program, _, _ in _cli_uses()}
    assert programs == {"nirvana", "nirvana-client"}


def test_cli_commands_in_docs_exist() -> None:
    wrong = []
    for where, program, path, options in _cli_uses():
        if not path:
            continue
        subcommands, _ = _help(program, ())
        if path[0] not in subcommands:
            wrong.append(f"{where}: `{program} {path[0]}`: no such subcommand (have {sorted(subcommands)})")
            continue
        group, known = _help(program, tuple(path))
        if group and len(path) == 1:
            wrong.append(f"{where}: `{program} {path[0]}` needs one of {sorted(group)}")
            continue
        for option in options:
            if option not in known and option != "--help":
                wrong.append(f"{where}: `{program} {' '.join(path)} {option}`: no such option")
    assert not wrong, "\n".join(wrong)


def test_the_contract_table_of_nirvana_lists_every_tensor_of_its_spec_with_its_type() -> None:
    """docs/serving.md's table of the `nirvana` model: one row per input and output of `nirvana_spec`, in Triton's
    type names (TYPE_STRING shown as STRING), and no row for a tensor the model does not have."""
    from nirvana.contract.specs import nirvana_spec
    from nirvana.contract.tensors import TRITON_DTYPES

    text = (ROOT / "docs" / "serving.md").read_text()
    section = text.split("## Triton tensor contract of `nirvana`", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([A-Z0-9]+) \|", section, flags=re.MULTILINE)
    spec = nirvana_spec((64, 64))
    expected = {t.name: TRITON_DTYPES[t.dtype].removeprefix("TYPE_") for t in (*spec.inputs, *spec.outputs)}
    assert dict(rows) == expected and len(rows) == len(expected)
