"""Every page reads whole, links where it says, and shows only commands the CLI takes as written."""

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


def shell_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, words) of each command in a page's shell blocks: continuations joined, comments dropped,
    `&&`/`||`/`;` split, `<placeholders>` kept as one word, leading VAR=value assignments and `export`
    lines skipped."""
    found = []
    for match in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        first = text[: match.start()].count("\n") + 2
        joined = match.group(1).replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            if line.lstrip().startswith("#"):
                continue
            line = re.sub(r"<[^>]+>", "PLACEHOLDER", line.split("  #")[0])
            for part in re.split(r"&&|\|\||;", line):
                try:
                    words = shlex.split(part)
                except ValueError:  # a shell construct of another command ($(...) with quotes): not ours
                    continue
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
                    words = words[1:]
                if words and words[0] != "export":
                    found.append((first + offset, words))
    return found


def inline_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, words) of each `dlops ...` in inline code outside shell blocks: synopses (KIND, CKPT\\|URI)."""
    outside = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    found = []
    for number, line in enumerate(outside.splitlines(), start=1):
        for span in re.findall(r"`(dlops [^`]+)`", line):
            found.append((number, span.replace("\\|", "|").split()))
    return found


def with_the_example_plug_in() -> click.Group:
    """dlops' commands plus those examples/tabular adds once installed (the pages show both)."""
    sys.path.insert(0, str(REPO / "examples" / "tabular"))
    try:
        from dlops_tabular.job import SPEC as TABULAR
    finally:
        sys.path.pop(0)
    group = click.Group("dlops", commands=dict(main.commands))
    train = click.Group("train", commands=dict(main.commands["train"].commands))
    group.add_command(train)
    train_command(TABULAR, train)
    for command in TABULAR.commands:
        group.add_command(command)
    return group


CLI = with_the_example_plug_in()
DLOPS = ("dlops", "../.venv/bin/dlops", ".venv/bin/dlops", "$(DLOPS)")
PLACEHOLDER_VALUE = re.compile(r"does not exist|PLACEHOLDER")  # a file the page names for the reader's own


def option_names(command: click.Command) -> set[str]:
    return {name for p in command.params for name in (*getattr(p, "opts", []), *getattr(p, "secondary_opts", []))}


def dlops_problem(words: list[str], *, synopsis: bool) -> str | None:
    """Why the real CLI refuses `dlops WORDS`, or None. A synopsis (KIND, CKPT|URI placeholders) is
    checked for its command and option names; a shell command is parsed whole, values and all."""
    command: click.Command = CLI
    path = ["dlops"]
    while isinstance(command, click.Group):
        if not words or words[0].startswith("-"):
            return None  # `dlops --help`, `dlops data`: a group
        name, words = words[0], words[1:]
        if synopsis and (name.isupper() or "..." in name):  # `dlops train KIND`: any of them
            return None
        group, alternatives = command, name.split("|") if synopsis else [name]  # `dlops keys show|rotate`
        missing = [a for a in alternatives if group.get_command(click.Context(CLI), a) is None]
        if missing:
            return f"{' '.join(path)} {missing[0]}: no such command"
        command = group.get_command(click.Context(CLI), alternatives[0])
        path.append(name)
    given = [w.split("=")[0] for w in words[: words.index("--") if "--" in words else None] if w.startswith("-")]
    unknown = sorted(set(given) - option_names(command) - {"--help", "-h"})
    if unknown:
        return f"{' '.join(path)}: {unknown} are not its options"
    if synopsis:
        return None
    try:
        command.make_context(" ".join(path), list(words), resilient_parsing=False)
    except click.exceptions.Exit:
        return None
    except click.BadParameter as e:
        return None if PLACEHOLDER_VALUE.search(e.format_message()) else f"{' '.join(path)}: {e.format_message()}"
    except click.UsageError as e:
        return f"{' '.join(path)} {' '.join(words)}: {e.format_message()}"
    return None


MAKEFILE = (REPO / "Makefile").read_text(encoding="utf-8")


def recipe(target: str) -> str | None:
    """The recipe lines of a Makefile target (None when there is no such target)."""
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n|\s*\n)*)", MAKEFILE, flags=re.M)
    return match.group(1) if match else None


def make_problem(words: list[str]) -> str | None:
    """Why `make TARGET VAR=...` would not do what a page says: an unknown target, or a variable its
    recipe never reads (`make train-lm DATA=...` where the recipe reads LM_DATA)."""
    targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
    for target in targets:
        if recipe(target) is None:
            return f"make {target}: no such target"
    for variable in (w.split("=")[0] for w in words[1:] if "=" in w):
        if not any(f"$({variable})" in recipe(t) for t in targets):
            return f"make {' '.join(targets)} {variable}=...: its recipe never reads {variable}"
    return None


def page_command_problems(name: str, text: str) -> list[str]:
    problems = []
    for line, words in shell_commands(text):
        if words[0] in DLOPS:
            problem = dlops_problem(words[1:], synopsis=False)
        elif words[0] == "make":
            problem = make_problem(words)
        else:
            continue
        if problem:
            problems.append(f"{name}:{line}: {problem}")
    for line, words in inline_commands(text):
        if problem := dlops_problem(words[1:], synopsis=True):
            problems.append(f"{name}:{line}: {problem}")
    return problems


def test_every_command_of_every_page_is_one_the_cli_takes():
    """Every `dlops ...` and `make ...` in README.md and docs/*.md: shell blocks parsed whole by the real
    CLI (with the example plug-in's commands), inline synopses checked for commands and options."""
    pages = {p.name: p.read_text(encoding="utf-8") for p in [README, *sorted(DOCS.glob("*.md"))]}
    counted = sum(len(shell_commands(text)) + len(inline_commands(text)) for text in pages.values())
    assert counted >= 60, counted
    problems = [problem for name, text in pages.items() for problem in page_command_problems(name, text)]
    assert not problems, "\n".join(problems)


def test_the_makefiles_own_examples_are_commands_it_takes():
    """`# make TARGET VAR=...` comments in the Makefile name targets and variables its recipes read."""
    examples = [part.strip().split() for line in MAKEFILE.splitlines() if line.startswith("# make ")
                for part in line[2:].split(";") if part.strip().startswith("make ")]  # fmt: skip
    cleaned = []
    for words in examples:  # make TARGET[:] VAR=... [VAR=...] (anything after that is prose)
        assignments = [w.strip("[]") for w in words[2:]]
        ends = next((i for i, w in enumerate(assignments) if not re.match(r"^[A-Z_]+=", w)), len(assignments))
        cleaned.append(["make", words[1].rstrip(":"), *assignments[:ends]])
    assert len(cleaned) >= 5
    problems = [problem for words in cleaned if (problem := make_problem(words))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("```bash\ndlops users set-role alice editor\n```\n", "Missing option '--role'"),
        ("```bash\ndlops train resnet data --no-such-option 1\n```\n", "['--no-such-option'] are not its options"),
        ("```bash\ndlops serve --amp fp64\n```\n", "'fp64' is not one of"),
        ("```bash\ndlops nonsense\n```\n", "dlops nonsense: no such command"),
        ("```bash\nmake train-lm DATA=corpus\n```\n", "its recipe never reads DATA"),
        ("Run `dlops predict IMAGE --topk 3` to ask.\n", "['--topk'] are not its options"),
    ],
)
def test_a_broken_command_in_a_page_fails_the_check(page, expected):
    assert any(expected in problem for problem in page_command_problems("page.md", page)), expected


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
