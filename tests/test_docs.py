"""The README stays a short guide whose commands exist as written, and every docs/ page is reachable."""

from __future__ import annotations

import re
import shlex

import click

from tests.conftest import REPO
from training.cli import main

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
        for part in re.split(r"&&", line.split("  #")[0]):
            words = shlex.split(part)
            if words and words[0] == "dlops":
                commands.append(words[1:])
    return commands


def test_every_readme_command_names_a_real_command_and_real_options():
    commands = readme_commands()
    assert len(commands) >= 12
    for words in commands:
        command: click.Command = main
        ctx = click.Context(main)
        while isinstance(command, click.Group):
            name, words = words[0], words[1:]
            command = command.get_command(ctx, name)
            assert command is not None, f"dlops {name}: no such command"
        declared = {opt for param in command.params for opt in getattr(param, "opts", [])}
        given = {word.split("=")[0] for word in words[: words.index("--") if "--" in words else None]}
        unknown = {word for word in given if word.startswith("-") and word not in declared}
        assert not unknown, f"dlops {command.name}: {unknown} are not its options"
