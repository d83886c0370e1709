"""The README stays a short guide whose commands exist as written, and every docs/ page is reachable."""

from __future__ import annotations

import re
import shlex
import sys

import click
import pytest

from tests.conftest import REPO
from training.cli import main, train_command

README = REPO / "README.md"
DOCS = REPO / "docs"


def links(page) -> set[str]:
    return set(re.findall(r"\]\(([^)#]+)\)", page.read_text(encoding="utf-8")))


def test_the_readme_is_a_short_guide_linking_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    linked = {link for link in links(README) if not link.startswith("http")}
    assert all((REPO / link).exists() for link in linked), [link for link in linked if not (REPO / link).exists()]
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages <= linked, f"pages no README link reaches: {sorted(pages - linked)}"
    for page in DOCS.glob("*.md"):  # links between pages and to pictures resolve too
        for link in links(page):
            assert link.startswith("http") or (DOCS / link).exists(), f"{page.name}: {link}"


def readme_commands() -> list[list[str]]:
    """Each `dlops ...` command in the README's shell blocks, split as a shell would."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):  # a comment line
            continue
        for part in re.split(r"&&", line.split("  #")[0]):
            words = shlex.split(part)
            if words and words[0] == "dlops":
                commands.append(words[1:])
    return commands


def with_the_example_plug_in() -> click.Group:
    """dlops' commands plus those examples/tabular adds once installed (the README shows both)."""
    sys.path.insert(0, str(REPO / "examples" / "tabular"))
    try:
        from dlops_tabular.job import SPEC as TABULAR
    finally:
        sys.path.pop(0)
    group = click.Group("dlops", commands=dict(main.commands))
    train = click.Group("train", commands=dict(main.commands["train"].commands))
    train_command(TABULAR, train)
    group.add_command(train)
    for command in TABULAR.commands:
        group.add_command(command)
    return group


def test_every_readme_command_names_a_real_command_and_real_options():
    commands = readme_commands()
    assert len(commands) >= 12
    cli = with_the_example_plug_in()
    for words in commands:
        command: click.Command = cli
        ctx = click.Context(cli)
        while isinstance(command, click.Group):
            name, words = words[0], words[1:]
            command = command.get_command(ctx, name)
            assert command is not None, f"dlops {name}: no such command"
        declared = {opt for param in command.params for opt in getattr(param, "opts", [])}
        given = {word.split("=")[0] for word in words[: words.index("--") if "--" in words else None]}
        unknown = {word for word in given if word.startswith("-") and word not in declared}
        assert not unknown, f"dlops {command.name}: {unknown} are not its options"


# --- every page reads whole -----------------------------------------------------------------------


def blocks(text: str) -> list[tuple[int, str]]:
    """A Markdown page's blocks (paragraphs, tables, list items, headings) outside code fences, each
    with its first line number: what a reader reads as one piece."""
    found, current, start, fenced = [], [], 0, False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            fenced = not fenced
            if current:
                found.append((start, "\n".join(current)))
            if fenced:
                found.append((number, "```"))  # a code block: what may follow a line ending in a colon
            current = []
            continue
        if fenced:
            continue
        starts_new = line.startswith(("#", "- ", "* ", "|")) and not (line.startswith("|") and current and
                                                                       current[-1].startswith("|"))  # fmt: skip
        if not line.strip() or starts_new:
            if current:
                found.append((start, "\n".join(current)))
            current = []
        if line.strip():
            if not current:
                start = number
            current.append(line)
    if current:
        found.append((start, "\n".join(current)))
    return found


def unopened_bracket(text: str) -> bool:
    """A ")" before any "(" in a paragraph's first sentence: the paragraph began inside a parenthesis."""
    depth = 0
    for char in text.split(". ")[0]:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return True
    return False


def page_problems(name: str, text: str) -> list[str]:
    """What makes a page not read whole: a paragraph that starts mid-sentence, a table with no line
    introducing it, a heading that skips a level."""
    problems, level = [], 0
    previous = ""
    for line, block in blocks(text):
        first = block.lstrip()
        if previous.endswith(":") and not first.startswith(("|", "```", "- ", "* ", "1.", "!")):
            problems.append(f"{name}:{line}: the line before ends in a colon, and no table, list or code follows")
        if first.startswith("```"):
            previous = first
            continue
        if first.startswith("#"):
            depth = len(first) - len(first.lstrip("#"))
            if level and depth > level + 1:
                problems.append(f"{name}:{line}: heading level {depth} after level {level}")
            level = depth
        elif first.startswith("|"):
            if previous.startswith("#") or not previous:
                problems.append(f"{name}:{line}: a table with no line introducing it")
        elif not first.startswith(("- ", "* ", "!", "<", "`", "**", "[", "_", "$")):
            if first[0].islower() or first[0] in ")]},;.:" or unopened_bracket(first):
                problems.append(f"{name}:{line}: a paragraph starting mid-sentence: {first[:50]!r}")
            if block.rstrip()[-1] not in '.:!?)`"*':  # a sentence cut where a page was split
                problems.append(f"{name}:{line}: a paragraph ending mid-sentence: ...{block.rstrip()[-50:]!r}")
        previous = first
    return problems


def repeated_paragraphs(pages: dict[str, str]) -> list[str]:
    """Paragraphs of three or more lines said twice, within a page or across pages."""
    seen: dict[str, str] = {}
    repeated = []
    for name, text in pages.items():
        for line, block in blocks(text):
            if block.count("\n") >= 2 and not block.lstrip().startswith("|"):
                key = " ".join(block.split())
                if key in seen:
                    repeated.append(f"{name}:{line} repeats {seen[key]}")
                seen.setdefault(key, f"{name}:{line}")
    return repeated


def all_pages() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in [README, *sorted(DOCS.glob("*.md"))]}


def test_every_page_reads_whole():
    pages = all_pages()
    problems = [problem for name, text in pages.items() for problem in page_problems(name, text)]
    problems += repeated_paragraphs(pages)
    linked = {link.rsplit("/", 1)[-1] for text in pages.values() for link in re.findall(r"\]\(([^)#]+)", text)}
    problems += [f"{name}: no page links to it" for name in pages if name != "README.md" and name not in linked]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("# A\n\nIntro.\n\nchannels_last on each device...\n", "starting mid-sentence"),
        ("# A\n\nIntro.\n\n) and more.\n", "starting mid-sentence"),
        ("# A\n\nIntro.\n\nCL = channels_last), both kinds.\n", "starting mid-sentence"),
        ("# A\n\nIntro.\n\nIt is even and 1.1-1.3x faster\n", "ending mid-sentence"),
        ("# A\n\n## B\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", "no line introducing it"),
        ("# A\n\nText.\n\n### C\n\nMore.\n", "heading level 3 after level 1"),
        ("# A\n\nMachine (2 cores):\n\nThe next paragraph.\n", "ends in a colon"),
    ],
)
def test_the_check_catches_each_kind_of_break(page, expected):
    assert any(expected in problem for problem in page_problems("page.md", page))


def test_the_check_catches_a_repeated_paragraph_and_an_orphan_page():
    said = "One line of a paragraph,\nits second line,\nand its third.\n"
    assert repeated_paragraphs({"a.md": f"# A\n\n{said}", "b.md": f"# B\n\n{said}"})
    assert not repeated_paragraphs({"a.md": f"# A\n\n{said}"})
